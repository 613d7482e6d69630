"""Small one-line gauges and sparklines for the host bar, and the number formats the console
shares.

A `Gauge` draws `LABEL ━━━━━━━━━━ VALUE` in whatever width it is given (the filled part
in the bar colour, the rest dimmed). A `Trend` draws the last minutes of one figure as a
sparkline on a fixed 0-1 scale (Textual's Sparkline scales to the data's own range, so a
flat 3 % CPU would look like a full bar). Their colours come from component classes styled
in app.tcss with theme variables, so a theme switch restyles them. The bar turns to the
warning and then the error colour above `warn_at` and `high_at`.

Both are fed every status poll (1 Hz) and repaint only when what they draw changes: RAM in
use moves by a few kilobytes every second, which at the bar's resolution is nothing, and an
idle console that repainted on every poll cost a steady share of a core.
"""

from __future__ import annotations

import itertools
import math
import time
from collections import deque

from rich.style import Style
from rich.text import Text
from textual.widget import Widget

from corral.backend.memory import format_bytes

BAR_FULL = "━"
BAR_EMPTY = "━"
NA = "–"
SPARKS = "▁▂▃▄▅▆▇█"
HISTORY = 300  # samples a Trend keeps: five minutes at the console's 1 Hz status


def format_pair(used: int | float | None, total: int | float | None) -> str:
    """`used/total` sharing the total's unit: "5.2/15.6 GiB"."""
    if used is None or total is None:
        return f"{format_bytes(used)}/{format_bytes(total)}"
    number, unit = format_bytes(total).split(" ")
    scale = {"B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}[unit]
    shown = f"{used / scale:.0f}" if unit == "B" else f"{used / scale:.1f}"
    return f"{shown}/{number} {unit}"


def format_duration(seconds: float | None) -> str:
    """A short duration: 42s, 4m05s, 1h03m, 2d04h."""
    if seconds is None:
        return NA
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def format_clock(ts: float) -> str:
    """A local wall-clock time, `15:06:40`; `--:--:--` for an unknown (zero) time."""
    return time.strftime("%H:%M:%S", time.localtime(ts)) if ts else "--:--:--"


def format_ago(then: float | None, now: float) -> str:
    """How long ago `then` was, relative to `now` (both unix seconds)."""
    if then is None:
        return "never"
    delta = now - then
    if delta < 1:
        return "just now"
    s = int(delta)
    if s < 60:
        return f"{s}s ago"
    if s < 3600:
        return f"{s // 60}m ago"
    if s < 86400:
        return f"{s // 3600}h ago"
    return f"{s // 86400}d ago"


def component_style(widget: Widget, component: str) -> Style:
    """A component class's text style for use inside the widget's own background.

    Textual's partial component styles drop a colour's alpha, so `$foreground-muted` would
    come out as full foreground; the full style has the colour blended over the background,
    and we keep that colour and the text attributes but not the background itself.
    """
    full = widget.get_component_rich_style(component)
    return Style(color=full.color) + full.without_color


class Gauge(Widget):
    """`LABEL ━━━━━━━━ VALUE`: a fraction in [0, 1] (or None for n/a) with its text."""

    COMPONENT_CLASSES = {
        "gauge--label",
        "gauge--bar",
        "gauge--bar-warn",
        "gauge--bar-high",
        "gauge--empty",
        "gauge--value",
    }

    def __init__(self, label: str, *, warn_at: float = 0.75, high_at: float = 0.9,
                 value_width: int = 0, id: str | None = None, classes: str | None = None) -> None:
        super().__init__(id=id, classes=classes)
        self.label = label
        self.warn_at = warn_at
        self.high_at = high_at
        self.value_width = value_width
        self.fraction: float | None = None
        self.value_text = NA

    def set(self, fraction: float | None, text: str) -> None:
        """Show `fraction` (clamped to [0, 1]) and `text`; repaint only if that changes the bar
        or the text at the current width."""
        before = self._look()
        self.fraction = None if fraction is None else min(1.0, max(0.0, fraction))
        self.value_text = text
        if self._look() != before:
            self.refresh()

    def _bar_width(self) -> int:
        """Columns left for the bar; under 4 there is no bar, only the label and the text."""
        return self.content_size.width - len(self.label) - 2 - max(len(self.value_text), self.value_width)

    def _bar(self) -> tuple[int, str]:
        """Cells filled and the component class that colours them."""
        fraction = self.fraction
        filled = 0 if fraction is None else round(fraction * self._bar_width())
        if fraction is not None and fraction >= self.high_at:
            return filled, "gauge--bar-high"
        if fraction is not None and fraction >= self.warn_at:
            return filled, "gauge--bar-warn"
        return filled, "gauge--bar"

    def _look(self) -> tuple[str, int, str]:
        return (self.value_text, *self._bar())

    def render(self) -> Text:
        value = self.value_text.rjust(self.value_width)
        label = f"{self.label} "
        bar_width = self._bar_width()
        text = Text(no_wrap=True, overflow="ellipsis")
        text.append(label, component_style(self, "gauge--label"))
        if bar_width >= 4:
            filled, component = self._bar()
            empty_style = component_style(self, "gauge--empty")
            text.append(BAR_FULL * filled, component_style(self, component))
            text.append(BAR_EMPTY * (bar_width - filled), empty_style)
            text.append(" ")
        text.append(value, component_style(self, "gauge--value"))
        return text


class Trend(Widget):
    """`LABEL ▁▂▃▅▇▆`: recent fractions in [0, 1], newest at the right.

    When more samples are kept than columns fit, each column shows the highest sample of
    its stretch, so a short spike stays visible when the whole history is squeezed in."""

    COMPONENT_CLASSES = {"trend--label", "trend--line", "trend--empty"}

    def __init__(self, label: str, *, history: int = HISTORY, id: str | None = None,
                 classes: str | None = None) -> None:
        super().__init__(id=id, classes=classes)
        self.label = label
        self.samples: deque[float | None] = deque(maxlen=history)

    def push(self, fraction: float | None) -> None:
        """Add one sample (None: not available then); redraw if the line it draws changed."""
        before = self._line()
        self.samples.append(None if fraction is None else min(1.0, max(0.0, fraction)))
        if self._line() != before:
            self.refresh()

    def columns(self, width: int) -> list[float | None]:
        """The samples squeezed into at most `width` columns, oldest first."""
        samples = list(self.samples)
        if width <= 0:
            return []
        step = max(1, math.ceil(len(samples) / width))
        start = len(samples) - (len(samples) // step) * step  # whole stretches, newest kept
        columns = []
        for i in range(start, len(samples), step):
            known = [v for v in samples[i:i + step] if v is not None]
            columns.append(max(known) if known else None)
        return columns

    def _line(self) -> str:
        """The sparkline at the current width, right-aligned: `·` where a sample was missing."""
        width = self.content_size.width - len(self.label) - 1
        line = "".join("·" if value is None else SPARKS[round(value * (len(SPARKS) - 1))]
                       for value in self.columns(width))
        return line.rjust(width)

    def render(self) -> Text:
        text = Text(no_wrap=True, overflow="crop")
        text.append(f"{self.label} ", component_style(self, "trend--label"))
        drawn = self._line()
        glyphs = drawn.lstrip(" ")
        text.append(drawn[:len(drawn) - len(glyphs)])
        line, empty = component_style(self, "trend--line"), component_style(self, "trend--empty")
        for gap, run in itertools.groupby(glyphs, key=lambda glyph: glyph == "·"):
            text.append("".join(run), empty if gap else line)  # a span per run, not per column
        return text
