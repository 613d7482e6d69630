"""The queue panel: per loaded model, requests waiting, slots in use and the oldest wait.

It draws from the same `ModelInfo` list as the models table (each status poll), so it costs
nothing extra to keep current; the columns fit the panel's width, shortening model names
first, so it reads at 80 columns as well as at 160.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from rich.text import Text
from textual.widget import Widget

from .gauges import NA, component_style

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
    """One line per loaded model: `name  waiting  active/slots  oldest wait`."""

    COMPONENT_CLASSES = {"queue-panel--header", "queue-panel--name", "queue-panel--muted",
                         "queue-panel--waiting"}

    def __init__(self, *, id: str | None = None, classes: str | None = None) -> None:
        super().__init__(id=id, classes=classes)
        self.models: tuple[ModelInfo, ...] = ()

    def update_models(self, models: Iterable[ModelInfo]) -> None:
        """Show the queues of the loaded models among `models`."""
        loaded = tuple(m for m in models if m.loaded or m.state == "unloading")
        if loaded != self.models:
            self.models = loaded
            self.refresh(layout=True)

    def get_content_height(self, container: object, viewport: object, width: int) -> int:
        return 1 + max(1, len(self.models))

    def render(self) -> Text:
        figures = sum(width + 1 for _, width in FIGURES)
        name_width = max(MIN_NAME, self.content_size.width - figures)
        text = Text(no_wrap=True, overflow="ellipsis")
        header = "model".ljust(name_width) + "".join(f" {h:>{w}}" for h, w in FIGURES)
        text.append(header, component_style(self, "queue-panel--header"))
        if not self.models:
            text.append("\nno model loaded", component_style(self, "queue-panel--muted"))
            return text
        for m in self.models:
            name = m.name if len(m.name) <= name_width else m.name[:name_width - 1] + "…"
            waiting_style = component_style(self, "queue-panel--waiting" if m.queued else "queue-panel--muted")
            text.append("\n")
            text.append(name.ljust(name_width), component_style(self, "queue-panel--name"))
            text.append(f" {m.queued:>4}", waiting_style)
            text.append(f" {f'{m.active}/{m.n_parallel}':>5}")
            text.append(f" {format_wait(m.oldest_wait_s):>6}", waiting_style)
        return text
