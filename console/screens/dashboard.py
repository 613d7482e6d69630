"""The dashboard: host gauges, GPUs, the models table and the event log.

The screen only shows what the app hands it: it subscribes to the app's `status_signal`
(each poll) and `event_signal` (each backend event) and never calls the backend itself.
Its keys come from the command table (scope "dashboard"); the ones that act on a model read
the selected row and ask the app to run the backend call in a worker.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.screen import Screen
from textual.widgets import Footer, Header, Static

from ..commands import DASHBOARD, bindings_for
from ..widgets import EventLog, Gauge, ModelsTable
from ..widgets.gauges import NA, format_bytes, format_pair
from .confirm import ConfirmScreen

if TYPE_CHECKING:
    from corral.backend.events import Event
    from corral.backend.snapshot import ModelInfo, Status
    from corral.backend.telemetry import GPUStats, HostStats

    from ..app import CorralApp


def _fraction(part: float | None, whole: float | None) -> float | None:
    if part is None or not whole:
        return None
    return part / whole


class GpuRow(Horizontal):
    """One GPU: name, utilisation gauge, VRAM gauge, temperature and power."""

    def __init__(self, index: int) -> None:
        super().__init__(classes="gpu-row")
        self.index = index

    def compose(self) -> ComposeResult:
        yield Static(f"GPU{self.index}", classes="gpu-name")
        yield Gauge("util", value_width=4, classes="gpu-util")
        yield Gauge("VRAM", value_width=15, classes="gpu-vram")
        yield Static(NA, classes="gpu-extra")

    def show(self, gpu: GPUStats) -> None:
        self.query_one(".gpu-name", Static).update(f"GPU{gpu.index} {gpu.name}")
        util = gpu.util_percent
        self.query_one(".gpu-util", Gauge).set(
            None if util is None else util / 100, NA if util is None else f"{util:.0f}%")
        self.query_one(".gpu-vram", Gauge).set(_fraction(gpu.mem_used, gpu.mem_total),
                                               format_pair(gpu.mem_used, gpu.mem_total))
        extra = [f"{gpu.temperature_c:.0f}°C" if gpu.temperature_c is not None else f"{NA}°C"]
        if gpu.power_w is not None:
            limit = f"/{gpu.power_limit_w:.0f}" if gpu.power_limit_w else ""
            extra.append(f"{gpu.power_w:.0f}{limit} W")
        self.query_one(".gpu-extra", Static).update("  ".join(extra))


class GpuPanel(Vertical):
    """One row per GPU, or the telemetry's note when there is none ("no GPU (...)")."""

    def compose(self) -> ComposeResult:
        yield Static("GPU: waiting for the first sample", id="gpu-note")

    def show(self, gpus: tuple[GPUStats, ...], note: str) -> None:
        rows = list(self.query(GpuRow))
        note_widget = self.query_one("#gpu-note", Static)
        if not gpus:
            for row in rows:
                row.remove()
            note_widget.update(f"GPU: {note or 'none'}")
            note_widget.display = True
            return
        note_widget.display = False
        if [row.index for row in rows] != [gpu.index for gpu in gpus]:
            for row in rows:
                row.remove()
            rows = [GpuRow(gpu.index) for gpu in gpus]
            self.mount_all(rows)
            self.call_after_refresh(self.show, gpus, note)
            return
        for row, gpu in zip(rows, gpus):
            row.show(gpu)


class HostBar(Vertical):
    """CPU, RAM, the process's RSS, the RAM budget, then the GPU panel."""

    def compose(self) -> ComposeResult:
        with Horizontal(id="host-gauges"):
            yield Gauge("CPU", value_width=4, id="gauge-cpu")
            yield Gauge("RAM", value_width=13, id="gauge-ram")
            yield Gauge("RSS", value_width=9, id="gauge-rss")
            yield Gauge("budget", value_width=13, id="gauge-budget")
        yield GpuPanel(id="gpus")

    def show(self, status: Status) -> None:
        host: HostStats = status.host
        self.query_one("#gauge-cpu", Gauge).set(host.cpu_percent / 100, f"{host.cpu_percent:.0f}%")
        self.query_one("#gauge-ram", Gauge).set(_fraction(host.ram_used, host.ram_total),
                                                format_pair(host.ram_used, host.ram_total))
        self.query_one("#gauge-rss", Gauge).set(_fraction(host.process_rss, host.ram_total),
                                                format_bytes(host.process_rss))
        loaded = sum(1 for m in status.models if m.state in ("ready", "busy", "loading"))
        budget = self.query_one("#gauge-budget", Gauge)
        budget.set(_fraction(status.ram_reserved, status.ram_budget),
                   format_pair(status.ram_reserved, status.ram_budget))
        budget.tooltip = f"RAM reserved by models / budget; {loaded}/{status.max_loaded} loaded"
        self.border_subtitle = f"{loaded}/{status.max_loaded} models loaded"
        self.query_one(GpuPanel).show(host.gpus, host.gpu_note)


class DashboardScreen(Screen[None]):
    """The console's home screen."""

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
        table = ModelsTable(id="models", clock=self.corral.clock)
        table.border_title = "models"
        yield table
        log = EventLog(id="events")
        log.border_title = "events"
        yield log
        yield Footer()

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
        self.query_one(ModelsTable).update_models(status.models)

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

    def _theme_changed(self, _theme: object) -> None:
        self.query_one(ModelsTable).restyle()
        self.query_one(EventLog).restyle()
        for gauge in self.query(Gauge):
            gauge.refresh()

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
