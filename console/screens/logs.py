"""A model's log view: llama.cpp's own lines of its loads and runs, newest last.

Opened with one key from the details view, so "why did the load fail" is there to read
without leaving the console (llama.cpp gives the reason only in these lines). The lines come
from `Backend.logs`, so the view works the same attached to a server. It fetches them when it
opens and again whenever the model's state or load progress changes (the app's
`status_signal`), adding only the lines it has not shown yet; it never polls on its own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import RichLog, Static

from ..errors import describe_error
from ..widgets.gauges import component_style, format_clock

if TYPE_CHECKING:
    from corral.backend.modellog import LogLine
    from corral.backend.snapshot import ModelInfo, Status

    from ..app import CorralApp

LEVELS = ("info", "warning", "error", "corral")


class ModelLogView(RichLog):
    """The lines, each `15:06:40 level text`, the level in its colour; `show` adds new ones."""

    COMPONENT_CLASSES = {"model-log--time", *(f"model-log--{level}" for level in LEVELS)}

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(min_width=20, wrap=True, markup=False, highlight=False, auto_scroll=True, id=id)
        self.shown: list[LogLine] = []

    def show(self, lines: list[LogLine]) -> None:
        """Write the lines after the last one shown; all of them again if it is gone (the
        ring moved past it)."""
        last = self.shown[-1] if self.shown else None
        start = next((i + 1 for i in range(len(lines) - 1, -1, -1) if lines[i] == last), None)
        if start is None:
            self.clear()
            start = 0
        for line in lines[start:]:
            self.write(self._line(line))
        self.shown = list(lines)

    def restyle(self) -> None:
        self._rich_style_cache.clear()
        lines, self.shown = self.shown, []
        self.show(lines)

    def _line(self, line: LogLine) -> Text:
        level = line.level if line.level in LEVELS else "info"
        style = component_style(self, f"model-log--{level}")
        text = Text(no_wrap=False)
        text.append(format_clock(line.ts), component_style(self, "model-log--time"))
        text.append(f"  {level:<7}  ", style)
        text.append(line.text, style)
        return text


class LogScreen(ModalScreen[None]):
    """One model's llama.cpp lines; see the module docstring."""

    BINDINGS = [
        Binding("escape,q,l", "close", "Close", id="corral.logs.close"),
    ]

    def __init__(self, model: ModelInfo) -> None:
        super().__init__(classes="dialog")
        self.model = model
        self._seen = (model.state, model.load_percent)

    @property
    def corral(self) -> CorralApp:
        return cast("CorralApp", self.app)

    def compose(self) -> ComposeResult:
        with Vertical(id="logs-box", classes="dialog-box") as box:
            box.border_title = f"{self.model.name} · llama.cpp log"
            box.border_subtitle = "esc to close"
            yield Static("", id="logs-note", markup=False)
            yield ModelLogView(id="logs-lines")

    def on_mount(self) -> None:
        self.corral.status_signal.subscribe(self, self.apply_status)
        self.app.theme_changed_signal.subscribe(self, lambda _theme: self.query_one(ModelLogView).restyle())
        self.query_one(ModelLogView).focus()
        self.fetch()

    def apply_status(self, status: Status) -> None:
        model = next((m for m in status.models if m.name == self.model.name), None)
        if model is not None and (model.state, model.load_percent) != self._seen:
            self._seen = (model.state, model.load_percent)
            self.fetch()

    def fetch(self) -> None:
        self.run_worker(self._fetch(), group="logs", exclusive=True, exit_on_error=False)

    async def _fetch(self) -> None:
        try:
            lines = await self.corral.backend.logs(self.model.name)
        except Exception as error:  # shown in place: the view stays open, the app keeps running
            self.query_one("#logs-note", Static).update(f"could not read the log: {describe_error(error)}")
            return
        self.query_one(ModelLogView).show(lines)
        note = (f"{len(lines)} lines from llama.cpp, newest last" if lines else
                f"no llama.cpp lines yet: {self.model.name} has not been loaded since the backend started")
        self.query_one("#logs-note", Static).update(note)

    def action_close(self) -> None:
        self.dismiss(None)
