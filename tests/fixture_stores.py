"""Model stores laid out exactly as ollama, the Hugging Face cache and LM Studio lay them out,
filled with tiny GGUFs (tests/ggufs.py), for corral to read in place.

- ollama: `manifests/<registry>/<namespace>/<model>/<tag>` holds a manifest of ollama's shape
  (schemaVersion 2, a config blob, layers with mediaType, `sha256:` digest and size), and every
  blob is `blobs/sha256-<hex>` named by the sha256 of its bytes.
- Hugging Face: `models--owner--repo/blobs/<sha256>` with `snapshots/<revision>/<file>` as
  relative symlinks into `blobs/`, and `refs/main` naming a revision.
- LM Studio: `<publisher>/<repo>/<file>.gguf`.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

OLLAMA_MEDIA = "application/vnd.ollama.image."


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _ollama_blob(root: Path, data: bytes, media_type: str) -> dict[str, Any]:
    digest = sha256(data)
    blob = root / "blobs" / f"sha256-{digest}"
    blob.parent.mkdir(parents=True, exist_ok=True)
    if not blob.exists():
        blob.write_bytes(data)
    return {"mediaType": media_type, "digest": f"sha256:{digest}", "size": len(data)}


def write_ollama_model(root: Path, gguf: Path, model: str, tag: str = "latest", *, namespace: str = "library",
                       registry: str = "registry.ollama.ai", params: dict[str, Any] | None = None,
                       template: str | None = None, system: str | None = None,
                       extra_layers: tuple[tuple[str, bytes], ...] = ()) -> Path:
    """A model as `ollama pull` leaves it under `root` (OLLAMA_MODELS): the GGUF, its template,
    system and params layers as blobs, and the manifest; returns the manifest's path."""
    layers = [_ollama_blob(root, gguf.read_bytes(), OLLAMA_MEDIA + "model")]
    if template is not None:
        layers.append(_ollama_blob(root, template.encode(), OLLAMA_MEDIA + "template"))
    if system is not None:
        layers.append(_ollama_blob(root, system.encode(), OLLAMA_MEDIA + "system"))
    if params is not None:
        layers.append(_ollama_blob(root, json.dumps(params).encode(), OLLAMA_MEDIA + "params"))
    layers += [_ollama_blob(root, data, OLLAMA_MEDIA + kind) for kind, data in extra_layers]
    config = json.dumps({"model_format": "gguf", "model_family": "llama", "model_families": ["llama"],
                         "model_type": "1M", "file_type": "F32", "architecture": "amd64", "os": "linux",
                         "rootfs": {"type": "layers", "diff_ids": [layer["digest"] for layer in layers]}})
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
                "config": _ollama_blob(root, config.encode(), "application/vnd.docker.container.image.v1+json"),
                "layers": layers}
    path = root / "manifests" / registry / namespace / model / tag
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(manifest))
    return path


def write_hf_file(cache: Path, repo: str, revision: str, filename: str, source: Path, *, main: bool = True) -> Path:
    """One file of `repo` at `revision` as huggingface_hub caches it under `cache` (HF_HUB_CACHE):
    the bytes in blobs/ under their sha256, the snapshot entry a relative symlink to them;
    `main` makes refs/main name `revision`. Returns the snapshot entry."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    data = source.read_bytes()
    blob = folder / "blobs" / sha256(data)
    blob.parent.mkdir(parents=True, exist_ok=True)
    if not blob.exists():
        blob.write_bytes(data)
    link = folder / "snapshots" / revision / filename
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(os.path.relpath(blob, link.parent))
    if main:
        (folder / "refs").mkdir(exist_ok=True)
        (folder / "refs" / "main").write_text(revision)
    return link


def write_lmstudio_file(root: Path, publisher: str, repo: str, filename: str, source: Path) -> Path:
    """One file in LM Studio's models folder `root`: publisher/repo/file.gguf."""
    path = root / publisher / repo / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(source.read_bytes())
    return path


def tree(root: Path) -> dict[str, tuple[int, int, str]]:
    """Every file and link under `root` with its size, mtime and (for links) target: compared
    before and after corral used a store, to show it wrote nothing there."""
    found = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            st = path.lstat()
            found[str(path.relative_to(root))] = (st.st_size, st.st_mtime_ns,
                                                  os.readlink(path) if path.is_symlink() else "")
    return found
