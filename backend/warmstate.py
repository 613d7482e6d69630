"""The loaded and pinned set on disk, so that a restarted corral loads the same models again.

Writes run in order on one thread of their own, off the manager's loop, and each is atomic: a
crash mid-write leaves the previous file, never half of one."""

from __future__ import annotations

import asyncio
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .events import EventBus, Notice
from .files import write_atomic

log = logging.getLogger("corral.manager")


class WarmState:
    def __init__(self, path: Path | None, bus: EventBus) -> None:
        self.path = path
        self._bus = bus
        self._saved: dict[str, list[str]] | None = None
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="corral-state")
        self._closed = False

    def read(self) -> dict[str, list[str]]:
        """Blocking: the last saved set; an unreadable file is a warning and a cold start."""
        if self.path is None:
            return {}
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            state = {k: [str(n) for n in data.get(k, [])] for k in ("loaded", "pinned")}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, AttributeError, TypeError) as exc:
            self._bus.publish(Notice(level="warning", message=f"{self.path}: unreadable warm-restart "
                                     f"state ({exc}); starting cold"))
            return {}
        self._saved = state
        return state

    def save(self, loaded: list[str], pinned: list[str]) -> None:
        """Queue a write of the set, when it changed."""
        if self.path is None or self._closed:
            return
        state = {"loaded": sorted(loaded), "pinned": sorted(pinned)}
        if state == self._saved:
            return
        self._saved = state
        self._writer.submit(_write, self.path, json.dumps(state, indent=1) + "\n")

    async def flushed(self) -> None:
        """Wait for the writes queued so far: an operator's action is on disk when its call
        returns, so a crash right after it still restarts with it."""
        if self.path is not None and not self._closed:
            await asyncio.wrap_future(self._writer.submit(lambda: None))

    def close(self) -> None:
        self._closed = True
        self._writer.shutdown(wait=False)  # queued writes still run


def _write(path: Path, text: str) -> None:
    try:
        write_atomic(path, text)
    except OSError as exc:
        log.warning("cannot save warm-restart state to %s: %s", path, exc)
