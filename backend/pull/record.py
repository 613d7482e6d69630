"""What corral pulled: `pulled.json` beside the state file.

`corral rm` deletes a model's files only when this record says corral downloaded them, so a
file a person put in a model folder, a `[[models]]` entry or another tool's store is never
deleted by it. A pull run again finds here that its file is already in place. Everything here
blocks (file reads and writes): callers run it in a worker thread.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..files import resolved, write_atomic

log = logging.getLogger("corral.pull")


@dataclass(frozen=True)
class Pulled:
    """One pulled model: its files (every shard, first first) and where they came from."""

    name: str
    source: str
    files: tuple[str, ...]  # absolute paths
    urls: tuple[str, ...]
    sha256: tuple[str, ...]
    size: int
    pulled_at: float

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Pulled:
        return cls(name=str(data["name"]), source=str(data["source"]), files=tuple(map(str, data["files"])),
                   urls=tuple(map(str, data["urls"])), sha256=tuple(map(str, data["sha256"])),
                   size=int(data["size"]), pulled_at=float(data["pulled_at"]))


class PullRecord:
    """The pulled models, kept in `path` as JSON (None: in memory, for this process only)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._models: list[Pulled] | None = None

    def all(self) -> list[Pulled]:
        with self._lock:
            return list(self._loaded())

    def owner(self, file: Path) -> Pulled | None:
        """The pulled model that `file` is one of the files of, if corral pulled it."""
        wanted = resolved(file)
        return next((m for m in self.all() if any(resolved(Path(f)) == wanted for f in m.files)), None)

    def source_names(self) -> dict[str, str]:
        """The names clients pulled models by, lower-cased, each to its catalog name: an ollama
        client that pulled `hf.co/owner/repo:Q4_K_M` then chats with that same name, and the
        `hf://` spelling works as well."""
        names = {}
        for model in self.all():
            if model.source.startswith("hf://"):
                names[model.source.lower()] = model.name
                names["hf.co/" + model.source.removeprefix("hf://").lower()] = model.name
        return names

    def add(self, model: Pulled) -> None:
        """Keep `model`, replacing an older record of the same files."""
        with self._lock:
            models = [m for m in self._loaded() if m.files[0] != model.files[0]] + [model]
            self._save(models)

    def remove(self, model: Pulled) -> None:
        with self._lock:
            self._save([m for m in self._loaded() if m.files[0] != model.files[0]])

    def _loaded(self) -> list[Pulled]:
        """Read again on every use when kept in a file: another process (`corral pull` beside
        `corral serve`) may have changed it."""
        if self._models is None or self.path is not None:
            self._models = self._read()
        return self._models

    def _read(self) -> list[Pulled]:
        if self.path is None:
            return []
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            return [Pulled.from_dict(entry) for entry in data["models"]]
        except FileNotFoundError:
            return []
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("%s: unreadable record of pulled models (%s); `corral rm` will refuse what it lists",
                        self.path, exc)
            return []

    def _save(self, models: list[Pulled]) -> None:
        self._models = models
        if self.path is not None:
            write_atomic(self.path, json.dumps({"models": [asdict(m) for m in models]}, indent=1) + "\n")
