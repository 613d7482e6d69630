"""The event log: one readable line per backend event, optionally narrowed to one session.

Events are formatted by their `type` name (the same on local events and on events rebuilt
from a remote server's SSE), so this module needs no import from the backend. Load progress
gets a line at 0 % and each time it crosses 25/50/75/100 % (llama.cpp's progress can jump, so
a crossing, not an exact value, counts); every other event is one line. The widget keeps the
events it showed and writes them again after a theme change (so old lines take new colours)
and when the session filter changes (so narrowing to one session and back loses nothing).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from rich.text import Text
from textual.widgets import RichLog

from .gauges import component_style, format_bytes, format_clock

if TYPE_CHECKING:
    from corral.backend.events import Event

PROGRESS_STEP = 25
STATES = ("available", "loading", "ready", "busy", "unloading", "failed")
DIFF_LINES_SHOWN = 3  # a config change's first lines; the config screen has them all


def compact_diff(diff: Sequence[str], lines: int = DIFF_LINES_SHOWN) -> str:
    """A config version's diff on one line: the first `lines` changes, then how many more."""
    if not diff:
        return "no changes"
    shown = "; ".join(diff[:lines])
    more = len(diff) - lines
    return f"{shown}; +{more} more" if more > 0 else shown


class EventLog(RichLog):
    """A RichLog that formats corral events; `add_event` is its one input."""

    COMPONENT_CLASSES = {
        "event-log--time",
        "event-log--model",
        "event-log--muted",
        "event-log--info",
        "event-log--warning",
        "event-log--error",
        "event-log--config",
        *(f"event-log--{state}" for state in STATES),
    }

    def __init__(self, *, max_lines: int = 1000, id: str | None = None,
                 classes: str | None = None) -> None:
        super().__init__(max_lines=max_lines, min_width=20, wrap=True, markup=False,
                         highlight=False, auto_scroll=True, id=id, classes=classes)
        self._shown: deque[Event | tuple[float, str, str]] = deque(maxlen=max_lines)
        self._progress: dict[str | None, int] = {}  # last progress mark shown, per model
        self.session = ""  # when set, only events whose session id contains it are shown

    def add_event(self, event: Event) -> bool:
        """Keep `event` if it is worth a line, and write it when the session filter lets it
        through; returns whether it was kept."""
        e: Any = event
        if e.type in ("load_progress", "pull_progress"):
            key = e.model if e.type == "load_progress" else e.pull_id
            mark = e.percent // PROGRESS_STEP * PROGRESS_STEP
            if e.percent != 0 and mark <= self._progress.get(key, -1):
                return False
            self._progress[key] = mark
        self._keep(event)
        return True

    def add_note(self, message: str, level: str = "info", ts: float | None = None) -> None:
        """A line from the console itself (not a backend event)."""
        self._keep((ts if ts is not None else time.time(), level, message))

    def set_session(self, session: str) -> None:
        """Show only the events of sessions whose id contains `session` (case-insensitive;
        "" shows everything again). Lines without a session, such as state changes, are
        hidden while it is set: the point is to follow one client's requests."""
        session = session.strip().lower()
        if session != self.session:
            self.session = session
            self._rewrite()

    def restyle(self) -> None:
        """Write every kept line again with the current theme's colours."""
        self._rich_style_cache.clear()
        self._rewrite()

    def _keep(self, entry: Event | tuple[float, str, str]) -> None:
        self._shown.append(entry)
        if self._passes(entry):
            self.write(self._line(entry))

    def _rewrite(self) -> None:
        self.clear()
        for entry in self._shown:
            if self._passes(entry):
                self.write(self._line(entry))

    def _passes(self, entry: Event | tuple[float, str, str]) -> bool:
        if not self.session:
            return True
        if isinstance(entry, tuple):
            return False
        return self.session in (entry.session_id or "").lower()

    def _line(self, entry: Event | tuple[float, str, str]) -> Text:
        return self._note_line(*entry) if isinstance(entry, tuple) else self.format_event(entry)

    # -- formatting --------------------------------------------------------------------------

    def _style(self, component: str) -> Any:
        return component_style(self, f"event-log--{component}")

    def _head(self, ts: float, model: str | None) -> Text:
        text = Text(no_wrap=False)
        text.append(format_clock(ts), self._style("time"))
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
            by = f" by {e.cancelled_by}" if e.cancelled_by else ""
            line.append(f"request {e.request_id or '?'} {e.finish_reason}{by}",
                        self._style("error") if failed else None)
            speed = f", {e.tokens_per_s:.1f} tok/s" if e.tokens_per_s else ""
            line.append(f"  {e.prompt_tokens}+{e.completion_tokens} tokens{speed}, "
                        f"{e.duration_s:.2f} s")
            if e.error:
                line.append(f"  {e.error}", self._style("error"))
        elif kind == "config_applied":
            line.append(f"config v{e.version} applied, from {e.source}", self._style("config"))
            line.append(f"  {compact_diff(e.diff)}")
            if e.actions:
                line.append(f"  → {'; '.join(e.actions)}", self._style("muted"))
        elif kind == "config_rejected":
            line.append(f"config rejected, from {e.source}: {e.error}", self._style("error"))
        elif kind == "notice":
            level = e.level if e.level in ("info", "warning", "error") else "info"
            line.append(e.message, self._style(level))
        elif kind == "pull_progress":
            size = f" of {format_bytes(e.total)}" if e.total else ""
            line.append(f"pulling {e.percent}%", self._style("loading"))
            line.append(f"  {format_bytes(e.completed)}{size} from {e.source}", self._style("muted"))
        elif kind == "pull_finished":
            line.append("pulled" if not e.already else "already pulled", self._style("ready"))
            line.append(f"  {format_bytes(e.size)} in {', '.join(e.files)}")
        elif kind == "pull_failed":
            line.append("pull cancelled" if e.cancelled else f"pull failed: {e.error}",
                        self._style("warning" if e.cancelled else "error"))
            if e.partial:
                line.append(f"  (kept {e.partial}: pulling {e.source} again resumes)", self._style("muted"))
        elif kind == "removed":
            line.append(f"removed {', '.join(e.files)}")
        elif kind == "dropped":
            line.append(f"{e.count} event(s) dropped (the console fell behind)",
                        self._style("warning"))
        else:
            line.append(kind, self._style("muted"))
        if kind in ("request_started", "request_finished") and e.api:
            line.append(f"  via {e.api}", self._style("muted"))
        if kind in ("request_started", "request_finished") and e.session_id:
            line.append(f"  session {e.session_id}", self._style("muted"))
        return line
