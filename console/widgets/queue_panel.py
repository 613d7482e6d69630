"""The queue panel: per loaded model, requests waiting, slots in use and the oldest wait;
under them, the loads waiting for their turn (loads go one at a time), next first.

It draws from the same `ModelInfo` list as the models table (each status poll), so it costs
nothing extra to keep current, and repaints only when a figure it shows changes (a loaded
model's info changes every second: its keep-alive counts down); the columns fit the panel's
width, shortening model names first, so it reads at 80 columns as well as at 160. Aliases
share their base model's queue and load, so only base models get lines.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from rich.text import Text
from textual.widget import Widget

from .gauges import NA, component_style
from .models_table import backing_models, is_waiting

if TYPE_CHECKING:
    from corral.backend.snapshot import ModelInfo

FIGURES = (("wait", 4), ("slots", 5), ("oldest", 6))  # header and width of each figure column
MIN_NAME = 6


def format_wait(seconds: float) -> str:
    """The oldest queued request's wait: "–" when nothing waits, else "0.4s", "12s", "3m05s"."""
    if seconds <= 0:
        return NA
    if seconds < 10:
        return f"{seconds:.1f}s"
    if seconds < 60:
        return f"{seconds:.0f}s"
    return f"{int(seconds) // 60}m{int(seconds) % 60:02d}s"


class QueuePanel(Widget):
    """One line per loaded model, `name  waiting  active/slots  oldest wait`, then one per
    waiting load, `name  load waiting #N`."""

    COMPONENT_CLASSES = {"queue-panel--header", "queue-panel--name", "queue-panel--muted",
                         "queue-panel--waiting"}

    def __init__(self, *, id: str | None = None, classes: str | None = None) -> None:
        super().__init__(id=id, classes=classes)
        self.models: tuple[ModelInfo, ...] = ()
        self.waiting: tuple[ModelInfo, ...] = ()

    def update_models(self, models: Iterable[ModelInfo]) -> None:
        """Show the queues of the loaded models among `models`, and their waiting loads."""
        own = backing_models(models)
        loaded = tuple(m for m in own if m.loaded or m.state == "unloading")
        waiting = tuple(sorted((m for m in own if is_waiting(m)), key=lambda m: m.load_position or 0))
        before = self._figures()
        self.models, self.waiting = loaded, waiting
        after = self._figures()
        if after != before:
            self.refresh(layout=len(after) != len(before))

    def _figures(self) -> tuple[tuple[object, ...], ...]:
        """What the panel shows, one tuple per line under the header."""
        return (*((m.name, m.queued, m.active, m.n_parallel, format_wait(m.oldest_wait_s)) for m in self.models),
                *((m.name, m.load_position) for m in self.waiting))

    def get_content_height(self, container: object, viewport: object, width: int) -> int:
        return 1 + max(1, len(self.models) + len(self.waiting))

    def render(self) -> Text:
        figures = sum(width + 1 for _, width in FIGURES)
        name_width = max(MIN_NAME, self.content_size.width - figures)
        text = Text(no_wrap=True, overflow="ellipsis")
        header = "model".ljust(name_width) + "".join(f" {h:>{w}}" for h, w in FIGURES)
        text.append(header, component_style(self, "queue-panel--header"))
        if not self.models and not self.waiting:
            text.append("\nno model loaded", component_style(self, "queue-panel--muted"))
            return text
        for m in self.models:
            waiting_style = component_style(self, "queue-panel--waiting" if m.queued else "queue-panel--muted")
            self._start_line(text, m.name, name_width)
            text.append(f" {m.queued:>4}", waiting_style)
            text.append(f" {f'{m.active}/{m.n_parallel}':>5}")
            text.append(f" {format_wait(m.oldest_wait_s):>6}", waiting_style)
        for m in self.waiting:
            self._start_line(text, m.name, name_width)
            text.append(f" {f'load waiting #{m.load_position}':>{figures - 1}}",
                        component_style(self, "queue-panel--waiting"))
        return text

    def _start_line(self, text: Text, name: str, width: int) -> None:
        """Start a line with `name`, shortened with … to fit `width`."""
        short = name if len(name) <= width else name[:width - 1] + "…"
        text.append("\n")
        text.append(short.ljust(width), component_style(self, "queue-panel--name"))
