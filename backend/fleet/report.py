"""What a node tells the fleet, built from its backend's `Status`: the routing report the
request router ranks by, and the snapshot the registry keeps for the console. Pure data, no
Ray: the console and the tests read these without a cluster."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

from ..snapshot import ModelInfo, Status
from .ranking import NodeReport

HELD = ("ready", "busy", "loading")


def node_report(node: str, status: Status) -> NodeReport:
    """The routing report of a node whose backend says `status`. A model needs its estimate
    (what the manager compares with the budget before it loads); a loaded one holds what the
    manager counts for it. Aliases share their base model's weights, so they are routed by
    name but never counted twice."""
    own = [m for m in status.models if m.alias_of is None]
    idle = sorted((m for m in own if m.state == "ready" and m.in_flight == 0 and not m.pinned),
                  key=lambda m: m.last_used or 0.0)
    return NodeReport(
        node=node,
        loaded={m.name: "busy" if m.state == "busy" else m.state for m in status.models if m.state in HELD},
        catalog={m.name: m.estimate_bytes for m in status.models if m.usable and m.estimate_bytes is not None},
        budget_bytes=status.ram_budget,
        used_bytes=status.ram_reserved,
        evictable=tuple((m.name, held_bytes(m)) for m in idle),
        ongoing=sum(m.in_flight for m in own),
        max_loaded=status.max_loaded,
    )


def held_bytes(model: ModelInfo) -> int:
    """What a loaded model counts against its node's budget: measured once known."""
    return model.measured_bytes if model.measured_bytes is not None else model.estimate_bytes or 0


@dataclass
class Counters:
    """A node's routing figures since its replica started: requests, how many found their model
    already loaded (hits), loads and evictions."""

    requests: int = 0
    hits: int = 0
    loads: int = 0
    evictions: int = 0

    @property
    def hit_rate(self) -> float | None:
        return self.hits / self.requests if self.requests else None


@dataclass(frozen=True)
class NodeSnapshot:
    """One node as the registry keeps it: its backend's status, its routing report and counters."""

    node: str
    status: Status
    counters: Counters = field(default_factory=Counters)
    ts: float = field(default_factory=time.time)

    @property
    def report(self) -> NodeReport:
        return node_report(self.node, self.status)

    def to_dict(self) -> dict[str, Any]:
        return {"node": self.node, "status": self.status.to_dict(), "counters": asdict(self.counters), "ts": self.ts}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NodeSnapshot:
        return cls(node=data["node"], status=Status.from_dict(data["status"]),
                   counters=Counters(**data.get("counters", {})), ts=data.get("ts", 0.0))
