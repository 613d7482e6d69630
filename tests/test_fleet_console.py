"""The console's fleet view over a fake fleet (no Ray): its picture, and the operator's verbs
reaching the node of the selected column."""

from __future__ import annotations

import dataclasses
from typing import Any

from corral.backend.fleet.report import Counters, NodeSnapshot
from corral.backend.snapshot import ModelInfo, Status
from corral.console.screens.fleet import FleetApp, FleetScreen
from fake_backend import FIXED_NOW, MiB, fixed_host, model_info


class FakeFleet:
    """Two nodes: a holds m1 (busy) and m3 (pinned), b holds m2; only a has `only-a`."""

    def __init__(self) -> None:
        common = {"m1": 82 * MiB, "m2": 69 * MiB, "m3": 55 * MiB}
        self.held: dict[str, dict[str, dict[str, Any]]] = {
            "a": {"m1": {"state": "busy", "in_flight": 2}, "m3": {"state": "ready", "pinned": True}},
            "b": {"m2": {"state": "ready"}}}
        self.sizes = {"a": {**common, "only-a": 110 * MiB}, "b": common}
        self.counters = {"a": Counters(requests=42, hits=40, loads=2), "b": Counters(requests=20, hits=19, loads=1)}
        self.calls: list[tuple[str, ...]] = []

    async def nodes(self) -> list[NodeSnapshot]:
        return [NodeSnapshot(node, self._status(node), self.counters[node], FIXED_NOW) for node in ("a", "b")]

    def _status(self, node: str) -> Status:
        models = tuple(model_info(name, estimate_bytes=size, **self.held[node].get(name, {}))
                       for name, size in self.sizes[node].items())
        reserved = sum(m.estimate_bytes for m in models if m.state != "available")
        return Status(models, fixed_host(), 150 * MiB, reserved, 3)

    async def load(self, node: str, model: str) -> ModelInfo:
        self.calls.append(("load", node, model))
        self.held[node][model] = {"state": "ready"}
        return model_info(model, state="ready")

    async def evict(self, node: str, model: str, *, force: bool = False) -> ModelInfo:
        self.calls.append(("evict", node, model, str(force)))
        self.held[node].pop(model, None)
        return model_info(model)

    async def pin(self, node: str, model: str, pinned: bool = True) -> ModelInfo:
        self.calls.append(("pin" if pinned else "unpin", node, model))
        self.held[node].setdefault(model, {"state": "ready"})["pinned"] = pinned
        return model_info(model, state="ready", pinned=pinned)


async def _shown(pilot: Any) -> FleetScreen:
    app = pilot.app
    screen = app.fleet_screen
    await pilot.pause()
    while not screen.snapshots:
        await pilot.pause(0.05)
    return screen


def test_fleet_view_picture(snap_compare: Any) -> None:
    async def settle(pilot: Any) -> None:
        await _shown(pilot)
        await pilot.press("right")
        await pilot.pause()

    assert snap_compare(FleetApp(FakeFleet(), "corral"), terminal_size=(120, 30), run_before=settle)


async def test_fleet_view_lists_nodes_and_where_each_model_is() -> None:
    app = FleetApp(FakeFleet(), "corral")
    async with app.run_test(size=(120, 30)) as pilot:
        screen = await _shown(pilot)
        nodes = screen.query_one("#fleet-nodes")
        assert [nodes.get_row_at(i)[0] for i in range(nodes.row_count)] == ["a", "b"]
        assert nodes.get_row_at(0)[4] == "0.95"  # 40 of 42 requests found their model loaded
        models = screen.query_one("#fleet-models")
        rows = {models.get_row_at(i)[0]: models.get_row_at(i)[1:] for i in range(models.row_count)}
        assert rows == {"m1": ["busy 2", "-"], "m2": ["-", "ready"], "m3": ["ready pinned", "-"],
                        "only-a": ["-", ""]}


async def test_the_verbs_act_on_the_selected_node() -> None:
    fleet = FakeFleet()
    app = FleetApp(fleet, "corral")
    async with app.run_test(size=(120, 30)) as pilot:
        await _shown(pilot)
        await pilot.press("right", "right", "l")  # m1 on node b
        await pilot.press("left", "down", "down", "p")  # m3 on node a: pinned, so unpin
        while len(fleet.calls) < 2:
            await pilot.pause(0.05)
        await pilot.press("e", "y")  # evicting it (no longer pinned)
        while len(fleet.calls) < 3:
            await pilot.pause(0.05)
    assert fleet.calls == [("load", "b", "m1"), ("unpin", "a", "m3"), ("evict", "a", "m3", "False")]


def test_hit_rate_needs_requests() -> None:
    assert Counters().hit_rate is None and dataclasses.replace(Counters(), requests=4, hits=3).hit_rate == 0.75
