"""Small file helpers shared by the backend's parts that keep state on disk."""

from __future__ import annotations

import os
from pathlib import Path


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file and a rename, so readers (and a restart
    after a crash) see the old file or the new one, never a torn one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temp, path)


def resolved(path: Path) -> Path:
    """`path` with its links resolved, as far as the file system allows: the same file reached
    by two paths compares equal."""
    try:
        return path.resolve()
    except (OSError, RuntimeError):  # RuntimeError: a symlink loop on Python 3.11/3.12
        return path.absolute()
