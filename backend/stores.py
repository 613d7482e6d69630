"""Other tools' model stores, read where they are: ollama's, the Hugging Face cache, LM Studio's.

An operator's models are usually already on disk in one of these, and copying gigabytes to
run them would be a waste, so corral lists their GGUF files in place, at every catalog scan,
and never writes into their folders (removing or updating a model there is its tool's job).

- ollama: `manifests/<registry>/<namespace>/<model>/<tag>` are JSON manifests whose
  `application/vnd.ollama.image.model` layer is the GGUF, `blobs/sha256-<hex>`. Names are
  ollama's (`llama3.2:3b`): `library/` is left out for registry.ollama.ai, other registries
  keep their host and path (`hf.co/owner/repo:Q4_K_M`), and the tag `latest` is left out
  (`llama3.2`), as everywhere in corral; its ollama API shows it as `llama3.2:latest`. The
  params layer gives the model's defaults, the system layer its system prompt; the template
  layer is shown (chats use the GGUF's own template). The blob's name is its sha256.
- The Hugging Face cache: `models--owner--repo/snapshots/<revision>/**.gguf`, symlinks into
  `blobs/`. The revision `refs/main` names is read first, then older ones newest first; a
  file is listed once, from the first revision that has it. Named `owner/repo/file`.
- LM Studio: `<publisher>/<repo>/<file>.gguf`, named `publisher/repo/file`.

Hugging Face and LM Studio names are lowercased like every file name in the catalog; split
GGUFs count once (the first shard) and multimodal projector files are left out. A manifest
that cannot be used is listed as an unusable model with the reason, like a broken file.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError

from .catalog import CatalogEntry, Source, entry_for, file_model_name, is_projector
from .config import SamplingDefaults
from .generation import MAX_TOKENS
from .snapshot import STORE_SOURCES, StoreInfo

log = logging.getLogger("corral.stores")

OLLAMA_REGISTRY = "registry.ollama.ai"
MODEL_LAYER = "application/vnd.ollama.image.model"
_LAYERS = "application/vnd.ollama.image."
MAX_LAYER_TEXT = 1 << 20  # a params, system or template layer larger than this is not read
_DIGEST = re.compile(r"sha256:([0-9a-f]{64})")
# ollama's params with a corral counterpart; the others are shown but not applied.
_PARAMS = {"temperature": "temperature", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p",
           "repeat_penalty": "repeat_penalty", "seed": "seed", "stop": "stop", "num_predict": "max_tokens",
           "num_ctx": "n_ctx"}

Switch = bool | str | Path  # a [stores] value: on, off, "auto" or a folder (config.parse_store_switch)


class _StoreDefaults(SamplingDefaults):
    """The defaults a store may set: the sampling options and the context (config's limits)."""

    n_ctx: int | None = Field(None, ge=64, le=1 << 20)


class _Unusable(Exception):
    """A manifest corral cannot run: the message says why and what to do."""


@dataclass(frozen=True)
class _Layer:
    media: str  # the part after application/vnd.ollama.image.
    sha256: str
    size: int


# -- where each store is ---------------------------------------------------------------------


def scan_stores(switches: Mapping[str, Switch], env: Mapping[str, str] | None = None) -> list[CatalogEntry]:
    """Every model in the stores that are on, store by store in the clash rule's order.
    `env` (default: the process's environment) says where they are. Blocking: it reads folders
    and the headers of their files."""
    env = os.environ if env is None else env
    entries: list[CatalogEntry] = []
    for source in STORE_SOURCES:
        folder = store_folder(source, switches[source], env)
        if folder is not None:
            entries += _SCANS[source](folder)
    return entries


def store_folder(source: str, switch: Switch, env: Mapping[str, str]) -> Path | None:
    """The folder store `source` is read from; None when it is off, or on "auto" and absent."""
    if switch is False:
        return None
    candidates = [switch] if isinstance(switch, Path) else _PLACES[source](env)
    found = next((path for path in candidates if path.is_dir()), None)
    if found is None and switch != "auto":
        log.warning("the %s store is on but no folder exists at %s; give its path in [stores] %s, or turn it off",
                    source, " or ".join(str(p) for p in candidates), source)
    return found


def _home(env: Mapping[str, str]) -> Path:
    return Path(env["HOME"]) if env.get("HOME") else Path.home()


def _ollama_places(env: Mapping[str, str]) -> list[Path]:
    """ollama's own order: $OLLAMA_MODELS when set (nothing else), else the user's store, else
    the system service's."""
    if env.get("OLLAMA_MODELS"):
        return [Path(env["OLLAMA_MODELS"]).expanduser()]
    return [_home(env) / ".ollama" / "models", Path("/usr/share/ollama/.ollama/models")]


def _huggingface_places(env: Mapping[str, str]) -> list[Path]:
    """huggingface_hub's own order: $HF_HUB_CACHE, $HF_HOME/hub, $XDG_CACHE_HOME/huggingface/hub,
    ~/.cache/huggingface/hub."""
    if env.get("HF_HUB_CACHE"):
        return [Path(env["HF_HUB_CACHE"]).expanduser()]
    if env.get("HF_HOME"):
        return [Path(env["HF_HOME"]).expanduser() / "hub"]
    cache = Path(env["XDG_CACHE_HOME"]) if env.get("XDG_CACHE_HOME") else _home(env) / ".cache"
    return [cache / "huggingface" / "hub"]


def _lmstudio_places(env: Mapping[str, str]) -> list[Path]:
    """The folder LM Studio's `~/.lmstudio-home-pointer` names (LM Studio writes it), then its
    current and its older default home."""
    home = _home(env)
    try:
        pointed = Path((home / ".lmstudio-home-pointer").read_text(encoding="utf-8").strip())
    except (OSError, UnicodeDecodeError):
        pointed = None
    places = [pointed / "models"] if pointed is not None and pointed.is_absolute() else []
    return places + [home / ".lmstudio" / "models", home / ".cache" / "lm-studio" / "models"]


_PLACES: dict[str, Callable[[Mapping[str, str]], list[Path]]] = {
    "ollama": _ollama_places, "huggingface": _huggingface_places, "lmstudio": _lmstudio_places}


def _listing(folder: Path) -> list[Path]:
    """What a folder holds, sorted, without hidden entries; an unreadable folder is logged."""
    try:
        return sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    except OSError as exc:
        log.warning("cannot list %s: %s; skipping it", folder, exc)
        return []


def _model_file(name: str, path: Path, source: Source, digest: str | None = None) -> CatalogEntry | None:
    """The entry for a GGUF file of a store; None for a projector file, which is no model."""
    entry = entry_for(name, path, source, digest=digest)
    return None if is_projector(path, entry.info) else entry


# -- ollama ----------------------------------------------------------------------------------


def scan_ollama(root: Path) -> list[CatalogEntry]:
    """One model per manifest under `root`/manifests."""
    manifests = root / "manifests"
    entries: list[CatalogEntry] = []
    for registry in _listing(manifests) if manifests.is_dir() else ():
        for namespace in _listing(registry) if registry.is_dir() else ():
            for model in _listing(namespace) if namespace.is_dir() else ():
                for tag in _listing(model) if model.is_dir() else ():
                    if tag.is_file():
                        name = ollama_name(registry.name, namespace.name, model.name, tag.name)
                        entries.append(_ollama_entry(name, tag, root / "blobs"))
    return entries


def ollama_name(registry: str, namespace: str, model: str, tag: str) -> str:
    """corral's name for an ollama model: ollama's, with `library/` and the tag `latest` left out."""
    if registry != OLLAMA_REGISTRY:
        base = f"{registry}/{namespace}/{model}"
    else:
        base = model if namespace == "library" else f"{namespace}/{model}"
    return base if tag == "latest" else f"{base}:{tag}"


def _ollama_entry(name: str, manifest: Path, blobs: Path) -> CatalogEntry:
    try:
        layers = _layers(manifest)
        model = _model_layer(layers)
        blob = blobs / f"sha256-{model.sha256}"
        _check_blob(blob, model.size)
    except _Unusable as exc:
        return CatalogEntry(name, None, "ollama", None, f"{manifest}: {exc}", store=StoreInfo(str(manifest)))
    store = _store_info(manifest, layers, blobs)
    return entry_for(name, blob, "ollama", digest=model.sha256, store=store)


def _layers(manifest: Path) -> list[_Layer]:
    """The manifest's layers (`layers`, as ollama writes them), each checked."""
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise _Unusable(f"not a readable JSON manifest ({exc}); pull the model again with ollama") from None
    layers = data.get("layers") if isinstance(data, dict) else None
    if not isinstance(layers, list):
        raise _Unusable("the manifest has no list of layers; pull the model again with ollama")
    found = []
    for i, layer in enumerate(layers):
        media = layer.get("mediaType") if isinstance(layer, dict) else None
        digest = _DIGEST.fullmatch(str(layer.get("digest"))) if isinstance(layer, dict) else None
        size = layer.get("size") if isinstance(layer, dict) else None
        if not isinstance(media, str) or digest is None or type(size) is not int:
            raise _Unusable(f"layer {i} lacks a mediaType, a sha256 digest or a size; pull the model again "
                            "with ollama")
        found.append(_Layer(media.removeprefix(_LAYERS), digest[1], size))
    return found


def _model_layer(layers: list[_Layer]) -> _Layer:
    models = [layer for layer in layers if layer.media == "model"]
    if len(models) != 1:
        raise _Unusable(f"{len(models)} model layers ({MODEL_LAYER}) where one GGUF was expected: not a model "
                        "corral can run")
    if any(layer.media == "adapter" for layer in layers):
        raise _Unusable("it applies a LoRA adapter layer, which corral does not; run its base model")
    return models[0]


def _check_blob(blob: Path, size: int) -> None:
    try:
        actual = blob.stat().st_size
    except OSError:
        raise _Unusable(f"its model blob {blob} is missing; pull the model again with ollama") from None
    if actual != size:
        raise _Unusable(f"its model blob {blob} has {actual} bytes where the manifest says {size}: an "
                        "unfinished or damaged download; pull the model again with ollama")


def _store_info(manifest: Path, layers: list[_Layer], blobs: Path) -> StoreInfo:
    """The params, system and template layers (the last of each kind, as ollama reads them)."""
    texts = {layer.media: _layer_text(blobs, layer, manifest) for layer in layers
             if layer.media in ("params", "system", "template")}
    params: dict[str, Any] = {}
    if texts.get("params"):
        try:
            loaded = json.loads(texts["params"] or "")
        except ValueError as exc:
            log.warning("%s: its params layer is not JSON (%s); the model gets corral's defaults", manifest, exc)
        else:
            params = loaded if isinstance(loaded, dict) else {}
    return StoreInfo(manifest=str(manifest), params=params, defaults=store_defaults(params, str(manifest)),
                     system=texts.get("system") or None, template=texts.get("template") or None)


def _layer_text(blobs: Path, layer: _Layer, manifest: Path) -> str | None:
    if layer.size > MAX_LAYER_TEXT:
        log.warning("%s: its %s layer has %d bytes, more than %d; not read", manifest, layer.media, layer.size,
                    MAX_LAYER_TEXT)
        return None
    try:
        return (blobs / f"sha256-{layer.sha256}").read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        log.warning("%s: cannot read its %s layer: %s", manifest, layer.media, exc)
        return None


def store_defaults(params: Mapping[str, Any], where: str) -> dict[str, Any]:
    """ollama's params (`num_ctx`, `temperature`, `stop`, ...) as corral's settings (`n_ctx`,
    `temperature`, `stop`, ...). A value outside corral's limits is left out with a warning;
    params corral has no setting for are only shown."""
    defaults: dict[str, Any] = {}
    for key, value in params.items():
        target = _PARAMS.get(key)
        if target is None:
            continue
        if target == "max_tokens" and type(value) is int and value < 0:
            value = MAX_TOKENS  # ollama's -1 and -2: until the context is full
        try:
            checked = _StoreDefaults.model_validate({target: value})
        except ValidationError as exc:
            log.warning("%s: params %s = %r left out: %s", where, key, value, exc.errors()[0]["msg"])
            continue
        defaults[target] = getattr(checked, target)
    return defaults


# -- the Hugging Face cache ------------------------------------------------------------------


def scan_huggingface(root: Path) -> list[CatalogEntry]:
    """One model per GGUF (first shard) in the cached model repositories under `root`."""
    entries = []
    for repo in _listing(root):
        if not repo.name.startswith("models--") or not repo.is_dir():
            continue
        prefix = "/".join(repo.name.removeprefix("models--").split("--")).lower()
        seen: set[str] = set()
        for snapshot in _revisions(repo):
            for path in _gguf_files_under(snapshot):
                name, where = file_model_name(path), path.relative_to(snapshot).as_posix().lower()
                if name is None or where in seen:
                    continue
                seen.add(where)
                entry = _model_file(f"{prefix}/{name}", path, "huggingface", _blob_sha256(path))
                if entry is not None:
                    entries.append(entry)
    return entries


def _revisions(repo: Path) -> list[Path]:
    """The repository's snapshots: the revision refs/main names first, then the newest."""
    try:
        main = (repo / "refs" / "main").read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        main = None

    def modified(path: Path) -> float:
        try:
            return path.stat().st_mtime
        except OSError:
            return 0.0

    snapshots = [p for p in _listing(repo / "snapshots") if p.is_dir()] if (repo / "snapshots").is_dir() else []
    return sorted(snapshots, key=lambda p: (p.name != main, -modified(p), p.name))


def _gguf_files_under(snapshot: Path) -> list[Path]:
    """GGUF files anywhere in a snapshot (quantizations are often in subfolders), sorted."""
    found = []
    for folder, dirs, files in os.walk(snapshot):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [Path(folder) / f for f in files if f.lower().endswith(".gguf") and not f.startswith(".")]
    return sorted(found)


def _blob_sha256(path: Path) -> str | None:
    """A large file's blob is named by its sha256 (Git LFS); small files' by a git hash."""
    try:
        name = path.resolve().name
    except (OSError, RuntimeError):
        return None
    return name if re.fullmatch(r"[0-9a-f]{64}", name) else None


# -- LM Studio -------------------------------------------------------------------------------


def scan_lmstudio(root: Path) -> list[CatalogEntry]:
    """One model per GGUF (first shard) in `root`/publisher/repo/."""
    entries = []
    for publisher in _listing(root):
        for repo in _listing(publisher) if publisher.is_dir() else ():
            for path in _listing(repo) if repo.is_dir() else ():
                name = file_model_name(path)
                if name is None or path.suffix.lower() != ".gguf" or path.is_dir():
                    continue
                entry = _model_file(f"{publisher.name}/{repo.name}/{name}".lower(), path, "lmstudio")
                if entry is not None:
                    entries.append(entry)
    return entries


_SCANS: dict[str, Callable[[Path], list[CatalogEntry]]] = {
    "ollama": scan_ollama, "huggingface": scan_huggingface, "lmstudio": scan_lmstudio}
