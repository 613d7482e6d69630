"""The event log: one readable line per backend event.

Events are formatted by their `type` name (the same on local events and on events rebuilt
from a remote server's SSE), so this module needs no import from the backend. Load progress
gets a line at 0 % and each time it crosses 25/50/75/100 % (llama.cpp's progress can jump, so
a crossing, not an exact value, counts); every other event is one line. The widget keeps the
events it showed and writes them again after a theme change so old lines take new colours.
"""

from __future__ import annotations

import time
from collections import deque
from typing import TYPE_CHECKING, Any

from rich.text import Text
from textual.widgets import RichLog

from .gauges import component_style, format_bytes

if TYPE_CHECKING:
    from corral.backend.events import Event

PROGRESS_STEP = 25
STATES = ("available", "loading", "ready", "busy", "unloading", "failed")


def _ts(ts: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(ts)) if ts else "--:--:--"


class EventLog(RichLog):
    """A RichLog that formats corral events; `add_event` is its one input."""

    COMPONENT_CLASSES = {
        "event-log--time",
        "event-log--model",
        "event-log--muted",
        "event-log--info",
        "event-log--warning",
        "event-log--error",
        *(f"event-log--{state}" for state in STATES),
    }

    def __init__(self, *, max_lines: int = 1000, id: str | None = None,
                 classes: str | None = None) -> None:
        super().__init__(max_lines=max_lines, min_width=20, wrap=True, markup=False,
                         highlight=False, auto_scroll=True, id=id, classes=classes)
        self._shown: deque[Event | tuple[float, str, str]] = deque(maxlen=max_lines)
        self._progress: dict[str | None, int] = {}  # last progress mark shown, per model

    def add_event(self, event: Event) -> bool:
        """Write `event` if it is worth a line; returns whether it was written."""
        e: Any = event
        if e.type == "load_progress":
            mark = e.percent // PROGRESS_STEP * PROGRESS_STEP
            if e.percent != 0 and mark <= self._progress.get(e.model, -1):
                return False
            self._progress[e.model] = mark
        line = self.format_event(event)
        self._shown.append(event)
        self.write(line)
        return True

    def add_note(self, message: str, level: str = "info", ts: float | None = None) -> None:
        """A line from the console itself (not a backend event)."""
        entry = (ts if ts is not None else time.time(), level, message)
        self._shown.append(entry)
        self.write(self._note_line(*entry))

    def restyle(self) -> None:
        """Write every kept line again with the current theme's colours."""
        self._rich_style_cache.clear()
        self.clear()
        for entry in self._shown:
            self.write(self._note_line(*entry) if isinstance(entry, tuple) else self.format_event(entry))

    # -- formatting --------------------------------------------------------------------------

    def _style(self, component: str) -> Any:
        return component_style(self, f"event-log--{component}")

    def _head(self, ts: float, model: str | None) -> Text:
        text = Text(no_wrap=False)
        text.append(_ts(ts), self._style("time"))
        text.append("  ")
        if model:
            text.append(model, self._style("model"))
            text.append("  ")
        return text

    def _note_line(self, ts: float, level: str, message: str) -> Text:
        line = self._head(ts, None)
        line.append(message, self._style(level if level in ("warning", "error") else "muted"))
        return line

    def _state(self, state: str) -> Any:
        return self._style(state) if state in STATES else self._style("muted")

    def format_event(self, event: Event) -> Text:
        """The line for `event` (`add_event` decides which progress steps get one)."""
        kind = getattr(event, "type", "event")
        e: Any = event
        line = self._head(e.ts, e.model)
        if kind == "state":
            line.append(e.old, self._state(e.old))
            line.append(" → ")
            line.append(e.new, self._state(e.new))
            if e.reason:
                reason_style = self._style("error") if e.new == "failed" else self._style("muted")
                line.append(f"  ({e.reason})", reason_style)
        elif kind == "load_progress":
            line.append(f"loading {e.percent}%", self._style("loading"))
        elif kind == "loaded":
            line.append(f"loaded in {e.seconds:.2f} s", self._style("ready"))
            line.append(f"  memory est. {format_bytes(e.estimate_bytes)}, "
                        f"measured {format_bytes(e.measured_bytes)}")
        elif kind == "pin":
            line.append("pinned" if e.pinned else "unpinned")
        elif kind == "request_started":
            line.append(f"request {e.request_id or '?'} started", self._style("muted"))
            line.append(f"  {e.prompt_tokens} prompt tokens, waited {e.queue_wait_s:.2f} s",
                        self._style("muted"))
        elif kind == "request_finished":
            failed = bool(e.error) or e.finish_reason == "error"
            line.append(f"request {e.request_id or '?'} {e.finish_reason}",
                        self._style("error") if failed else None)
            speed = f", {e.tokens_per_s:.1f} tok/s" if e.tokens_per_s else ""
            line.append(f"  {e.prompt_tokens}+{e.completion_tokens} tokens{speed}, "
                        f"{e.duration_s:.2f} s")
            if e.error:
                line.append(f"  {e.error}", self._style("error"))
        elif kind == "notice":
            level = e.level if e.level in ("info", "warning", "error") else "info"
            line.append(e.message, self._style(level))
        elif kind == "dropped":
            line.append(f"{e.count} event(s) dropped (the console fell behind)",
                        self._style("warning"))
        else:
            line.append(kind, self._style("muted"))
        return line
