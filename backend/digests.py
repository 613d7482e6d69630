"""What a model's file is: its GGUF header's facts and the sha256 of all of it (`ModelDetails`).

Hashing a model reads gigabytes, so each file is hashed once per version (resolved path, size,
mtime) and the digest is kept in memory and, beside the warm-restart state, on disk for the
next process. Everything here blocks: callers run it in a worker thread, never on a loop.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import threading
from pathlib import Path

from .errors import ModelFileError
from .kinds import model_kind
from .files import write_atomic
from .ggufmeta import Scalar, read_gguf
from .snapshot import ModelDetails, StoreInfo

log = logging.getLogger("corral.digests")

READ_SIZE = 1 << 20  # hash in 1 MiB reads
MAX_METADATA_TEXT = 1024  # longer header strings are cut in ModelDetails.metadata
_HIDDEN_KEYS = frozenset({"tokenizer.chat_template"})  # ModelDetails.chat_template has the one in use


class Digests:
    """sha256 of model files, each computed once per (resolved path, size, mtime_ns).

    With a `path`, digests persist there as JSON (the latest version of each file), so a
    restart does not read every model again; an unreadable file there is ignored."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._known: dict[str, dict[str, int | str]] | None = None  # resolved path → its version and digest
        self._lock = threading.Lock()  # guards _known, _hashing and the file
        self._hashing: dict[str, threading.Lock] = {}  # one per file: concurrent callers hash it once

    def sha256(self, file: Path) -> str:
        """The hex sha256 of `file`'s contents; OSError when it cannot be read."""
        resolved = str(file.resolve())
        with self._lock:
            known = self._loaded()
            file_lock = self._hashing.setdefault(resolved, threading.Lock())
        with file_lock:
            st = os.stat(resolved)
            version = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
            entry = known.get(resolved)
            if entry is not None and all(entry.get(k) == v for k, v in version.items()):
                return str(entry["sha256"])
            digest = _hash(resolved)
            with self._lock:
                known[resolved] = {**version, "sha256": digest}
                self._save(known)
            return digest

    def _loaded(self) -> dict[str, dict[str, int | str]]:
        """The known digests, read from `path` on first use (under `_lock`)."""
        if self._known is None:
            self._known = self._read()
        return self._known

    def _read(self) -> dict[str, dict[str, int | str]]:
        if self.path is None:
            return {}
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            return {str(k): v for k, v in data.items() if _valid(v)}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, AttributeError) as exc:
            log.warning("%s: unreadable digest cache (%s); model files will be hashed again", self.path, exc)
            return {}

    def _save(self, known: dict[str, dict[str, int | str]]) -> None:
        if self.path is None:
            return
        try:
            write_atomic(self.path, json.dumps(known, indent=1, sort_keys=True) + "\n")
        except OSError as exc:
            log.warning("cannot save model digests to %s: %s", self.path, exc)


def _valid(entry: object) -> bool:
    """A cache entry this version can trust: its file's version and a sha256 in hex."""
    if not isinstance(entry, dict):
        return False
    digest = entry.get("sha256")
    return (all(type(entry.get(k)) is int for k in ("size", "mtime_ns")) and isinstance(digest, str)
            and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest))


def _hash(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(READ_SIZE):
            digest.update(block)
    return digest.hexdigest()


def describe(name: str, path: Path | None, digests: Digests, *, n_ctx: int, chat_template: str | None,
             alias_of: str | None = None, source: str | None = None, known_digest: str | None = None,
             store: StoreInfo | None = None) -> ModelDetails:
    """The details of the model file at `path` under `name`; what cannot be read (a missing or
    broken file) is None, so a broken model can still be described. A `known_digest` its store
    already names the file by (ollama's and Hugging Face's blobs) spares hashing it."""
    info, size, modified, digest = None, None, None, None
    if path is not None:
        try:
            info = read_gguf(path)
        except ModelFileError as exc:
            log.info("details of %s: %s", name, exc)
        try:
            st = path.stat()
            size, modified, digest = st.st_size, st.st_mtime, known_digest or digests.sha256(path)
        except OSError as exc:
            log.info("details of %s: cannot read %s: %s", name, path, exc)
    return ModelDetails(
        name=name, path=str(path) if path else None, file_size=size, modified_at=modified, digest=digest,
        architecture=info.architecture if info else None, parameters=info.parameter_count if info else None,
        quantization=info.file_type if info else None, context_length=info.context_length if info else None,
        n_ctx=n_ctx, chat_template=chat_template,
        metadata={k: _json_safe(v) for k, v in info.metadata.items() if k not in _HIDDEN_KEYS} if info else {},
        alias_of=alias_of, source=source, store=store, kind=model_kind(info),
    )


def _json_safe(value: Scalar) -> Scalar:
    """A header value as strict JSON carries it: long text cut, NaN and infinities as text."""
    if isinstance(value, str) and len(value) > MAX_METADATA_TEXT:
        return value[:MAX_METADATA_TEXT]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value
