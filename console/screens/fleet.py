"""The fleet view: every node of a corral fleet on Ray Serve, and every model by node.

`corral fleet` and `corral attach ray://HOST:PORT` open it. The nodes table has each node's
memory against its budget, its requests in flight and its routing figures (requests, how many
found their model loaded, loads, evictions); the models table has a row per model and a
column per node, saying where each model is loaded. The operator loads, evicts or pins the
model of the selected row on the node of the selected column.

It reads a `FleetSource` (the backend's `Fleet`, or a fake in tests) once a second, in a worker;
nothing here imports Ray or llama_cpp."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, Protocol

from textual import work
from textual.app import App, ComposeResult
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Static
from textual.worker import Worker, WorkerState

from corral.backend.fleet.report import NodeSnapshot
from corral.backend.memory import format_bytes
from corral.backend.snapshot import ModelInfo
from corral.themes import DEFAULT_THEME, THEMES

from ..commands import APP, FLEET, bindings_for
from ..errors import describe_error
from .confirm import ConfirmScreen

POLL_S = 1.0
NODE_COLUMNS = ("node", "memory", "in flight", "requests", "hit rate", "loads", "evictions", "CPU", "RAM")


class FleetSource(Protocol):
    """What the fleet view reads and acts on (corral.backend.fleet.client.Fleet)."""

    async def nodes(self) -> list[NodeSnapshot]: ...
    async def load(self, node: str, model: str) -> ModelInfo: ...
    async def evict(self, node: str, model: str, *, force: bool = False) -> ModelInfo: ...
    async def pin(self, node: str, model: str, pinned: bool = True) -> ModelInfo: ...


def cell(model: ModelInfo | None) -> str:
    """A model's place on one node: its state where it is held, '-' where the node has it but
    not loaded, nothing where the node lacks it."""
    if model is None:
        return ""
    if model.state == "available":
        return "-"
    text = model.state
    if model.state == "busy":
        text += f" {model.in_flight}"
    elif model.state == "loading" and model.load_percent is not None:
        text += f" {model.load_percent}%"
    return text + (" pinned" if model.pinned else "")


def node_row(snapshot: NodeSnapshot) -> tuple[str, ...]:
    status, counters = snapshot.status, snapshot.counters
    host = status.host
    rate = f"{counters.hit_rate:.2f}" if counters.hit_rate is not None else "-"
    return (snapshot.node, f"{format_bytes(status.ram_reserved)} / {format_bytes(status.ram_budget)}",
            str(sum(m.in_flight for m in status.models if m.alias_of is None)), str(counters.requests), rate,
            str(counters.loads), str(counters.evictions), f"{host.cpu_percent:.0f}%",
            f"{format_bytes(host.ram_used)} / {format_bytes(host.ram_total)}")


class FleetScreen(Screen[None]):
    BINDINGS = bindings_for(FLEET)

    def __init__(self, label: str) -> None:
        super().__init__()
        self.label = label
        self.snapshots: list[NodeSnapshot] = []

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static(f"fleet {self.label}: waiting for the nodes' first snapshots", id="fleet-summary")
        nodes = DataTable(id="fleet-nodes", cursor_type="none", zebra_stripes=True)
        nodes.border_title = "nodes"
        yield nodes
        models = DataTable(id="fleet-models", cursor_type="cell", zebra_stripes=True)
        models.border_title = "models by node (l load, e evict, p pin on the selected node)"
        yield models
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#fleet-nodes", DataTable).add_columns(*NODE_COLUMNS)
        self.query_one("#fleet-models", DataTable).focus()
        self.app.action_refresh_status()  # the tables exist now: start reading the fleet

    def show(self, snapshots: list[NodeSnapshot]) -> None:
        requests = sum(s.counters.requests for s in snapshots)
        hits = sum(s.counters.hits for s in snapshots)
        rate = f"{hits / requests:.2f}" if requests else "-"
        self.query_one("#fleet-summary", Static).update(
            f"fleet {self.label}: {len(snapshots)} nodes, {requests} requests, hit rate {rate}, "
            f"{sum(s.counters.loads for s in snapshots)} loads, "
            f"{sum(s.counters.evictions for s in snapshots)} evictions")
        nodes = self.query_one("#fleet-nodes", DataTable)
        nodes.clear()
        for snapshot in snapshots:
            nodes.add_row(*node_row(snapshot), key=snapshot.node)
        models = self.query_one("#fleet-models", DataTable)
        cursor = models.cursor_coordinate
        models.clear(columns=True)
        models.add_columns("model", *(s.node for s in snapshots))
        names = sorted({m.name for s in snapshots for m in s.status.models})
        by_node = [{m.name: m for m in s.status.models} for s in snapshots]
        for name in names:
            models.add_row(name, *(cell(held.get(name)) for held in by_node), key=name)
        if names:
            models.cursor_coordinate = models.validate_cursor_coordinate(cursor)
        self.snapshots = snapshots

    def selected(self) -> tuple[str, str, ModelInfo | None] | None:
        """(node, model, its info there) under the cursor; None on the model-name column."""
        models = self.query_one("#fleet-models", DataTable)
        row, column = models.cursor_coordinate
        if not self.snapshots or column == 0 or row >= models.row_count:
            return None
        snapshot = self.snapshots[column - 1]
        name = str(models.get_row_at(row)[0])
        return snapshot.node, name, next((m for m in snapshot.status.models if m.name == name), None)

    def _act(self, verb: str) -> None:
        chosen = self.selected()
        if chosen is None:
            self.notify("select a node's column in the models table first", severity="warning")
            return
        node, model, info = chosen
        app: FleetApp = self.app  # type: ignore[assignment]
        if verb == "load":
            app.act(f"load {model} on {node}", app.source.load(node, model))
        elif verb == "pin":
            pinned = not (info is not None and info.pinned)
            app.act(f"{'pin' if pinned else 'unpin'} {model} on {node}", app.source.pin(node, model, pinned))
        else:
            force = info is not None and info.pinned

            def answered(yes: bool | None) -> None:
                if yes:
                    app.act(f"evict {model} on {node}", app.source.evict(node, model, force=force))

            self.app.push_screen(ConfirmScreen(f"Evict {model} on node {node}?", title="Evict", yes_label="Evict",
                                               detail="it is pinned: evicting it anyway" if force else ""), answered)

    def action_load(self) -> None:
        self._act("load")

    def action_evict(self) -> None:
        self._act("evict")

    def action_toggle_pin(self) -> None:
        self._act("pin")


class FleetApp(App[None]):
    """The fleet view on its own: `corral fleet`."""

    CSS_PATH = Path(__file__).parent.parent / "app.tcss"
    TITLE = "corral fleet"
    BINDINGS = [b for b in bindings_for(APP) if b.id in ("corral.quit", "corral.theme", "corral.refresh")]

    def __init__(self, source: FleetSource, label: str, *, theme: str | None = None) -> None:
        super().__init__()
        self.source = source
        self.label = label
        for item in THEMES:
            self.register_theme(item)
        self.theme = theme or DEFAULT_THEME
        self.fleet_screen = FleetScreen(label)

    def on_mount(self) -> None:
        self.push_screen(self.fleet_screen)

    @work(exclusive=True, group="poll", exit_on_error=False, name="fleet poll")
    async def _poll(self) -> None:
        """Read the fleet once a second; a failed read is said once, and reading goes on."""
        failing = ""
        while True:
            try:
                self.fleet_screen.show(await self.source.nodes())
                failing = ""
            except Exception as exc:
                if describe_error(exc) != failing:
                    failing = describe_error(exc)
                    self.notify(failing, title="cannot read the fleet", severity="error", timeout=10, markup=False)
            await asyncio.sleep(POLL_S)

    def act(self, name: str, call: Any) -> None:
        """Run one of the operator's verbs; the table shows its outcome at the next poll."""

        async def run() -> None:
            await call
            self._poll()

        self.run_worker(run(), name=name, group="action", exit_on_error=False)

    def action_refresh_status(self) -> None:
        self._poll()

    def action_next_theme(self) -> None:
        names = [t.name for t in THEMES]
        self.theme = names[(names.index(self.theme) + 1) % len(names)] if self.theme in names else names[0]

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        if event.state == WorkerState.ERROR and event.worker.error is not None:
            self.notify(describe_error(event.worker.error), title=f"{event.worker.name} failed", severity="error",
                        timeout=10, markup=False)
