"""What a running pull reports: one plain record that crosses every boundary.

The CLI draws its progress bar from it, the admin API streams it as JSON, ollama's route
turns it into ollama's progress objects, and `RemoteBackend` rebuilds it from the wire, so a
console attached to a server shows a pull exactly as an embedded one does. Plain data only:
the console imports this module.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

# The stages of a pull, in order; a failed or cancelled pull raises instead of reporting one.
RESOLVING = "resolving"  # reading the source: the repository's file list, sizes and hashes
DOWNLOADING = "downloading"
VERIFYING = "verifying"  # sha256 compared, GGUF header read, files moved into the model folder
DONE = "done"


@dataclass(frozen=True)
class PullStatus:
    """One moment of a pull. Byte counts cover every file of the pull (all shards)."""

    id: str
    source: str
    status: str  # resolving | downloading | verifying | done
    model: str | None = None  # the catalog name it will have, once the source is resolved
    directory: str | None = None  # where its files go
    completed: int = 0  # bytes on disk, a part resumed from an earlier run included
    total: int | None = None  # None while a size is unknown
    resumed: int = 0  # bytes this run found on disk from an earlier one
    rate: float | None = None  # bytes per second over the last seconds
    eta_s: float | None = None
    file: str | None = None  # the file being transferred
    files: int = 0  # how many files the model has (a split GGUF has several)
    sha256: str | None = None  # the expected sha256 of `file` (the hub's or --sha256), when known
    paths: tuple[str, ...] = ()  # the model's files, once done
    already: bool = False  # done without downloading: the same source was pulled there before

    @property
    def percent(self) -> int | None:
        """Whole percent done, None while the total is unknown."""
        if not self.total:
            return None
        return min(100, self.completed * 100 // self.total)

    @property
    def finished(self) -> bool:
        return self.status == DONE

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "paths": list(self.paths)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PullStatus:
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in names}
        values["paths"] = tuple(values.get("paths") or ())
        return cls(**values)
