"""The dashboard: host gauges and their sparklines, GPUs, the models table (with its filter
and a load progress bar), the queue panel and the event log (with its session filter).

The screen only shows what the app hands it: it subscribes to the app's `status_signal`
(each poll) and `event_signal` (each backend event) and never calls the backend itself.
Its keys come from the command table (scope "dashboard"); the ones that act on a model read
the selected row and ask the app to run the backend call in a worker.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

from rich.markup import escape
from textual import events, on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Input, ProgressBar, Static

from ..commands import DASHBOARD, bindings_for
from ..widgets import EventLog, Gauge, ModelsTable, QueuePanel, Trend
from ..widgets.gauges import NA, format_bytes, format_pair
from ..widgets.models_table import backing_models
from .config import ConfigScreen
from .confirm import ConfirmScreen
from .details import DetailsScreen
from .prompt import PromptScreen
from .requests import RequestsScreen

if TYPE_CHECKING:
    from corral.backend.events import Event
    from corral.backend.snapshot import ModelInfo, Status
    from corral.backend.telemetry import GPUStats, HostStats

    from ..app import CorralApp

COMPACT_FOOTER_BELOW = 100  # columns


def _fraction(part: float | None, whole: float | None) -> float | None:
    if part is None or not whole:
        return None
    return part / whole


def show_text(widget: Static, text: str) -> None:
    """Put `text` in `widget` if it is not there already: `Static.update` lays the whole screen
    out again even for the same text, and these are updated on every 1 Hz poll."""
    if widget.content != text:
        widget.update(text)


class GpuRow(Vertical):
    """One GPU: name, utilisation and VRAM gauges, temperature and power; under them the
    sparklines of utilisation, VRAM and temperature (as a share of 100 °C)."""

    def __init__(self, index: int) -> None:
        super().__init__(classes="gpu-row")
        self.index = index

    def compose(self) -> ComposeResult:
        with Horizontal(classes="gpu-gauges"):
            yield Static(f"GPU{self.index}", classes="gpu-name")
            yield Gauge("util", value_width=4, classes="gpu-util")
            yield Gauge("VRAM", value_width=15, classes="gpu-vram")
            yield Static(NA, classes="gpu-extra")
        with Horizontal(classes="gpu-trends"):
            yield Static("", classes="gpu-name")
            yield Trend("util", classes="gpu-util trend-util")
            yield Trend("VRAM", classes="gpu-vram trend-vram")
            yield Trend("°C", classes="gpu-extra trend-temp")

    def show(self, gpu: GPUStats, sample: bool) -> None:
        """Draw `gpu`; with `sample`, also add its figures to the sparklines."""
        show_text(self.query_one(".gpu-gauges .gpu-name", Static), f"GPU{gpu.index} {gpu.name}")
        util = gpu.util_percent
        vram = _fraction(gpu.mem_used, gpu.mem_total)
        self.query_one(".gpu-util", Gauge).set(
            None if util is None else util / 100, NA if util is None else f"{util:.0f}%")
        self.query_one(".gpu-vram", Gauge).set(vram, format_pair(gpu.mem_used, gpu.mem_total))
        if sample:
            self.query_one(".trend-util", Trend).push(None if util is None else util / 100)
            self.query_one(".trend-vram", Trend).push(vram)
            temp = gpu.temperature_c
            self.query_one(".trend-temp", Trend).push(None if temp is None else temp / 100)
        extra = [f"{gpu.temperature_c:.0f}°C" if gpu.temperature_c is not None else f"{NA}°C"]
        if gpu.power_w is not None:
            limit = f"/{gpu.power_limit_w:.0f}" if gpu.power_limit_w else ""
            extra.append(f"{gpu.power_w:.0f}{limit} W")
        show_text(self.query_one(".gpu-gauges .gpu-extra", Static), "  ".join(extra))


class GpuPanel(Vertical):
    """One row per GPU, or the telemetry's note when there is none ("no GPU (...)")."""

    def compose(self) -> ComposeResult:
        yield Static("GPU: waiting for the first sample", id="gpu-note")

    def show(self, gpus: tuple[GPUStats, ...], note: str, sample: bool = True) -> None:
        rows = list(self.query(GpuRow))
        note_widget = self.query_one("#gpu-note", Static)
        if not gpus:
            for row in rows:
                row.remove()
            show_text(note_widget, note or "no GPU")
            note_widget.display = True
            return
        note_widget.display = False
        if [row.index for row in rows] != [gpu.index for gpu in gpus]:
            for row in rows:
                row.remove()
            rows = [GpuRow(gpu.index) for gpu in gpus]
            self.mount_all(rows)
            self.call_after_refresh(self.show, gpus, note, sample)
            return
        for row, gpu in zip(rows, gpus):
            row.show(gpu, sample)


class HostBar(Vertical):
    """CPU, RAM, the process's RSS, the RAM budget; the sparklines of the first three; then
    the GPU panel.

    A sparkline gets a sample per distinct telemetry timestamp, not per poll: a poll woken
    early by an event sees the same sample again, and a fixed test clock gives one sample."""

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self._sampled_at: float | None = None

    def compose(self) -> ComposeResult:
        with Horizontal(id="host-gauges"):
            yield Gauge("CPU", value_width=4, id="gauge-cpu")
            yield Gauge("RAM", value_width=13, id="gauge-ram")
            yield Gauge("RSS", value_width=9, id="gauge-rss")
            yield Gauge("budget", value_width=13, id="gauge-budget")
        with Horizontal(id="host-trends"):
            yield Trend("CPU", id="trend-cpu")
            yield Trend("RAM", id="trend-ram")
            yield Trend("RSS", id="trend-rss")
            yield Static("sparklines: last 5 min", id="trend-span")
        yield GpuPanel(id="gpus")

    def show(self, status: Status) -> None:
        host: HostStats = status.host
        ram = _fraction(host.ram_used, host.ram_total)
        rss = _fraction(host.process_rss, host.ram_total)
        self.query_one("#gauge-cpu", Gauge).set(host.cpu_percent / 100, f"{host.cpu_percent:.0f}%")
        self.query_one("#gauge-ram", Gauge).set(ram, format_pair(host.ram_used, host.ram_total))
        self.query_one("#gauge-rss", Gauge).set(rss, format_bytes(host.process_rss))
        sample = host.ts != self._sampled_at
        if sample:
            self._sampled_at = host.ts
            self.query_one("#trend-cpu", Trend).push(host.cpu_percent / 100)
            self.query_one("#trend-ram", Trend).push(ram)
            self.query_one("#trend-rss", Trend).push(rss)
        loaded = sum(1 for m in backing_models(status.models) if m.state in ("ready", "busy", "loading"))
        budget = self.query_one("#gauge-budget", Gauge)
        budget.set(_fraction(status.ram_reserved, status.ram_budget),
                   format_pair(status.ram_reserved, status.ram_budget))
        tooltip = f"RAM reserved by models / budget; {loaded}/{status.max_loaded} loaded"
        if budget.tooltip != tooltip:
            budget.tooltip = tooltip
        subtitle = f"{loaded}/{status.max_loaded} models loaded"
        if self.border_subtitle != subtitle:  # setting it repaints, even to the same text
            self.border_subtitle = subtitle
        self.query_one(GpuPanel).show(host.gpus, host.gpu_note, sample)


class FilterInput(Input):
    """A filter box (the models table's, the event log's session): it narrows as it is
    typed; enter keeps the filter and goes back to the table, esc clears it."""

    BINDINGS = [Binding("escape", "clear_filter", "Clear filter", id="corral.filter.clear")]

    def action_clear_filter(self) -> None:
        self.value = ""
        self.screen.query_one(ModelsTable).focus()


class LoadBar(Horizontal):
    """A progress bar for a model being loaded; hidden when none is."""

    def compose(self) -> ComposeResult:
        yield Static("", id="load-label", markup=False)
        yield ProgressBar(total=100, show_eta=False, id="load-progress")

    def show(self, models: list[ModelInfo]) -> None:
        loading = [m for m in backing_models(models) if m.state == "loading"]
        if self.display != bool(loading):
            self.display = bool(loading)
        if loading:
            first = loading[0]
            more = f" (+{len(loading) - 1})" if len(loading) > 1 else ""
            show_text(self.query_one("#load-label", Static), f"loading {first.name}{more}")
            self.query_one(ProgressBar).update(progress=first.load_percent or 0)


class DashboardScreen(Screen[None]):
    """The console's home screen."""

    SCOPE = DASHBOARD
    BINDINGS = bindings_for(DASHBOARD)
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (100, "-wide")]

    @property
    def corral(self) -> CorralApp:
        return cast("CorralApp", self.app)

    def compose(self) -> ComposeResult:
        yield Header(icon="◆")
        host = HostBar(id="host")
        host.border_title = "host"
        yield host
        filter_input = FilterInput(id="filter", placeholder="filter models: name, state or quant")
        filter_input.display = False
        yield filter_input
        table = ModelsTable(id="models", clock=self.corral.clock)
        table.border_title = "models"
        yield table
        yield LoadBar(id="loading")
        with Horizontal(id="bottom"):
            with Vertical(id="log-column"):
                session = FilterInput(id="session", placeholder="session id (or part of it); esc shows all")
                session.display = False
                yield session
                log = EventLog(id="events")
                log.border_title = "events"
                yield log
            queue = QueuePanel(id="queues")
            queue.border_title = "queues"
            yield queue
        yield Footer()

    def on_resize(self, event: events.Resize) -> None:
        """Below COMPACT_FOOTER_BELOW columns the footer drops its spacing, so the prompt key,
        which leads it, and the help key still fit at 80 columns."""
        self.query_one(Footer).compact = event.size.width < COMPACT_FOOTER_BELOW

    def on_mount(self) -> None:
        app = self.corral
        app.status_signal.subscribe(self, self.apply_status)
        app.event_signal.subscribe(self, self.apply_event)
        app.theme_changed_signal.subscribe(self, self._theme_changed)
        self.query_one(ModelsTable).focus()
        if app.status is not None:
            self.apply_status(app.status)

    # -- what the app hands us --------------------------------------------------------------

    def apply_status(self, status: Status) -> None:
        self.query_one(HostBar).show(status)
        table = self.query_one(ModelsTable)
        table.update_models(status.models)
        self.query_one(QueuePanel).update_models(status.models)
        self.query_one(LoadBar).show(table.all_models)

    def apply_event(self, event: Event) -> None:
        self.query_one(EventLog).add_event(event)
        e: Any = event
        table = self.query_one(ModelsTable)
        if e.type == "load_progress" and e.model:
            table.patch(e.model, state="loading", load_percent=e.percent)
        elif e.type == "state" and e.model:
            table.patch(e.model, state=e.new, **({} if e.new == "loading" else {"load_percent": None}))
        elif e.type == "pin" and e.model:
            table.patch(e.model, pinned=e.pinned)
        if e.type in ("load_progress", "state"):
            self.query_one(LoadBar).show(table.all_models)

    def _theme_changed(self, _theme: object) -> None:
        self.query_one(ModelsTable).restyle()
        self.query_one(EventLog).restyle()
        for widget in [*self.query(Gauge), *self.query(Trend), *self.query(QueuePanel)]:
            widget.refresh()

    # -- commands ---------------------------------------------------------------------------

    def _selected(self) -> ModelInfo | None:
        """The model under the cursor; says so when there is none."""
        model = self.query_one(ModelsTable).selected
        if model is None:
            self.notify("No model selected.", severity="warning")
        return model

    def action_load(self) -> None:
        model = self._selected()
        if model is not None:
            self.corral.load_model(model.name)

    def action_evict(self) -> None:
        model = self._selected()
        if model is None:
            return
        if model.state == "failed":
            self.corral.evict_model(model.name)  # clears the failure: nothing to lose
            return
        if model.state not in ("ready", "busy", "loading"):
            self.notify(f"{model.name} is not loaded ({model.state}).", severity="warning",
                        markup=False)
            return
        detail = []
        if model.pinned:
            detail.append("It is pinned: this forces it out.")
        if model.in_flight:
            detail.append(f"{model.in_flight} request(s) in flight finish first.")

        def answered(yes: bool | None) -> None:
            if yes:
                self.corral.evict_model(model.name, force=model.pinned)

        self.app.push_screen(ConfirmScreen(f"Evict {model.name}?", title="Evict",
                                           yes_label="Evict", detail=" ".join(detail)), answered)

    def action_toggle_pin(self) -> None:
        model = self._selected()
        if model is not None:
            self.corral.pin_model(model.name, not model.pinned)

    def action_prompt(self) -> None:
        model = self._selected()
        if model is not None:
            self.app.push_screen(PromptScreen(model.name))

    @on(DataTable.RowSelected, "#models")
    def _row_chosen(self) -> None:
        """Enter on the table (the table's own binding takes the key first) opens the prompt."""
        self.action_prompt()

    def action_details(self) -> None:
        model = self._selected()
        if model is not None:
            self.app.push_screen(DetailsScreen(model))

    def action_config(self) -> None:
        self.app.push_screen(ConfigScreen())

    def action_requests(self) -> None:
        self.app.push_screen(RequestsScreen())

    def action_filter(self) -> None:
        self._open_box("#filter")

    def action_session_filter(self) -> None:
        self._open_box("#session")

    def _open_box(self, selector: str) -> None:
        box = self.query_one(selector, FilterInput)
        box.display = True
        box.focus()

    @on(Input.Changed, "#filter")
    def _filter_changed(self, event: Input.Changed) -> None:
        table = self.query_one(ModelsTable)
        table.set_filter(event.value)
        shown, total = len(table.models), len(table.all_models)
        shown_filter = escape(event.value)
        table.border_title = f"models · filter “{shown_filter}” {shown}/{total}" if event.value else "models"

    @on(Input.Submitted, "FilterInput")
    def _filter_done(self) -> None:
        self.query_one(ModelsTable).focus()

    @on(Input.Changed, "#session")
    def _session_changed(self, event: Input.Changed) -> None:
        log = self.query_one(EventLog)
        log.set_session(event.value)
        session = escape(event.value.strip())
        log.border_title = f"events · session “{session}”" if session else "events"

    @on(Input.Blurred, "FilterInput")
    def _filter_left(self, event: Input.Blurred) -> None:
        """An empty filter hides its box again once the operator leaves it."""
        if not event.input.value:
            event.input.display = False
