"""Which nodes should take a request for a model, best first, from what each node reports.

Each node's replica reports its models, catalog, memory budget and queue (`NodeReport`, the
payload of Ray Serve's `record_routing_stats`); the fleet's request router ranks the nodes with
`rank()` and Ray picks the least busy replica with room inside the first group that has one.
The ranking mirrors what the node's manager will do (admission.py): a model that is not
loaded there is loaded after evicting idle, unpinned models least recently used first until
it fits the byte budget and `max_loaded`, so a node that needs no eviction beats one that
does, and one that evicts fewer bytes beats one that evicts more.

Pure Python, no Ray: the router, the tests and the fleet simulation all run this code.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

#: States in `NodeReport.loaded` that serve at once; "loading" serves when the load ends.
SERVING = ("ready", "busy")
LOADING = "loading"


@dataclass(frozen=True)
class NodeReport:
    """What one node's replica reports for routing (its record_routing_stats payload)."""

    node: str                                # node id (host name or Ray node id)
    loaded: Mapping[str, str]                # model -> "ready" | "busy" | "loading"
    catalog: Mapping[str, int]               # every model the node can load -> estimated bytes
    budget_bytes: int                        # the node's memory budget
    used_bytes: int                          # bytes held by its loaded/loading models
    evictable: Sequence[tuple[str, int]]     # idle, unpinned loaded models, LRU first, bytes
    ongoing: int                             # requests running + queued on the node
    max_loaded: int = 0                      # the manager's max_loaded; 0: no count limit

    def to_stats(self) -> dict[str, Any]:
        """JSON-able, for record_routing_stats."""
        return {
            "node": self.node,
            "loaded": dict(self.loaded),
            "catalog": dict(self.catalog),
            "budget_bytes": self.budget_bytes,
            "used_bytes": self.used_bytes,
            "evictable": [[name, size] for name, size in self.evictable],
            "ongoing": self.ongoing,
            "max_loaded": self.max_loaded,
        }

    @classmethod
    def from_stats(cls, stats: Mapping[str, Any]) -> NodeReport:
        """Read a routing-stats payload. Missing keys mean nothing known (no models, no
        budget, idle): a replica that has not reported yet ranks as one that cannot take the
        model, never as a free node. A value of the wrong shape is a ValueError naming it."""
        try:
            return cls(
                node=str(stats.get("node", "")),
                loaded={str(k): str(v) for k, v in dict(stats.get("loaded") or {}).items()},
                catalog={str(k): int(v) for k, v in dict(stats.get("catalog") or {}).items()},
                budget_bytes=int(stats.get("budget_bytes") or 0),
                used_bytes=int(stats.get("used_bytes") or 0),
                evictable=tuple((str(name), int(size)) for name, size in stats.get("evictable") or ()),
                ongoing=int(stats.get("ongoing") or 0),
                max_loaded=int(stats.get("max_loaded") or 0),
            )
        except (TypeError, ValueError) as exc:
            raise ValueError(f"routing stats of node {stats.get('node', '?')!r} are malformed ({exc}): "
                             "expected the shape NodeReport.to_stats() writes") from exc


@dataclass(frozen=True)
class Fit:
    """How a node would serve a model: its rank (0 loaded, 1 loading, 2 room without evicting,
    3 must evict) and the bytes it would evict to load it."""

    rank: int
    evicted_bytes: int = 0
    evicted: tuple[str, ...] = ()


def fit(report: NodeReport, model: str) -> Fit | None:
    """How `report`'s node would serve `model`, or None when it cannot: the model is not in
    its catalog, or does not fit even after evicting everything evictable."""
    if model not in report.catalog:
        return None
    state = report.loaded.get(model)
    if state in SERVING:
        return Fit(0)
    if state == LOADING:
        return Fit(1)
    need = report.catalog[model]
    free = report.budget_bytes - report.used_bytes
    count = len(report.loaded)
    evicted: list[str] = []
    evicted_bytes = 0
    victims = iter(report.evictable)
    while need > free or (report.max_loaded and count >= report.max_loaded):
        victim = next(victims, None)
        if victim is None:
            return None
        name, size = victim
        evicted.append(name)
        evicted_bytes += size
        free += size
        count -= 1
    return Fit(3, evicted_bytes, tuple(evicted)) if evicted else Fit(2)


def rank(reports: Sequence[NodeReport], model: str) -> list[list[NodeReport]]:
    """Rank groups, best first: loaded (ready/busy) -> loading -> has the file and room
    without evicting -> must evict (fewest bytes evicted first); least busy first inside a
    group. A node whose catalog lacks the model is never returned; nor one where it cannot
    fit even after evicting everything evictable.

    Nodes that must evict form one group per number of bytes evicted, smallest first: Ray's
    router takes the least busy replica with room inside a group, so a node evicting more
    bytes must sit in a later group, not just later in the same one. Empty groups are left
    out; ties on load go by node id, so the order is deterministic."""
    groups: dict[tuple[int, int], list[NodeReport]] = {}
    for report in reports:
        where = fit(report, model)
        if where is not None:
            groups.setdefault((where.rank, where.evicted_bytes), []).append(report)
    return [sorted(groups[key], key=lambda r: (r.ongoing, r.node)) for key in sorted(groups)]


class Routed:
    """Where the router sent each model since the nodes last reported. Reports come about once
    a second; between two, a burst for a cold model would see every node without it and load
    it on several. Counting a model sent to a node as loading there (its bytes held), until the
    node's report shows it or `memory_s` passes, lands the burst on one node, where the
    manager makes it one load."""

    def __init__(self, memory_s: float = 5.0) -> None:
        self.memory_s = memory_s
        self._sent: dict[str, dict[str, float]] = {}  # node -> model -> when sent

    def sent(self, node: str, model: str, now: float) -> None:
        self._sent.setdefault(node, {})[model] = now

    def overlay(self, report: NodeReport, now: float) -> NodeReport:
        """`report` with the models sent to its node since, and not in it yet, as loading."""
        sent = self._sent.get(report.node)
        if not sent:
            return report
        for model, when in list(sent.items()):
            if model in report.loaded or now - when > self.memory_s:
                del sent[model]
        extra = [model for model in sent if model in report.catalog]
        if not extra:
            return report
        return replace(report, loaded={**report.loaded, **{model: LOADING for model in extra}},
                       used_bytes=report.used_bytes + sum(report.catalog[model] for model in extra))
