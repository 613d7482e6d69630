"""The llama.cpp lines of one model's loads and runs, kept for the console's log view.

llama.cpp says why a load failed, and warns about a context it had to shrink, only in its
log lines (llamalog.py routes them away from the terminal). Each model keeps the latest of
them in a bounded ring that outlives a failed load and an unload, so the operator can read
"why did it fail" from the details view, locally or through `GET /api/models/{name}/logs`.

Plain data with no llama.cpp import: the console and the remote backend use `LogLine` too.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any

# One load of the default model logs about 150 lines at info level and up (its metadata, the
# tensors' buffers, the context; the debug lines are left out): the ring holds many loads and
# whatever warnings their runs add.
LOG_LINES = 3000


@dataclass(frozen=True)
class LogLine:
    """One whole line: when it was logged, llama.cpp's level ("info", "warning", "error";
    "corral" for corral's lines where a load starts and where one failed) and its text."""

    ts: float
    level: str
    text: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LogLine:
        return cls(ts=float(data["ts"]), level=str(data["level"]), text=str(data["text"]))


class ModelLog:
    """A bounded ring of one model's lines, oldest first; appended from the threads that load
    and run the model, read from the backend's loop."""

    def __init__(self, size: int = LOG_LINES) -> None:
        self._lines: deque[LogLine] = deque(maxlen=size)
        self._lock = threading.Lock()

    def add(self, level: str, text: str) -> None:
        line = LogLine(time.time(), level, text)
        with self._lock:
            self._lines.append(line)

    def lines(self) -> list[LogLine]:
        with self._lock:
            return list(self._lines)
