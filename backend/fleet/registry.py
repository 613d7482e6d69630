"""The fleet's registry: a named Ray actor where each node replica claims its node's name and
publishes its snapshot about once a second. The console and the ingress read the fleet from it.

A claim is a node name held by one replica; a replica that stopped publishing for `STALE_S`
loses it, so a replacement replica on the same host takes the name over."""

from __future__ import annotations

import time
from collections import deque
from typing import Any

import ray

NAMESPACE = "corral"
STALE_S = 10.0
EVENTS_KEPT = 4096


class Registry:
    def __init__(self) -> None:
        self._claims: dict[str, tuple[str, float]] = {}  # node -> (holder, last heard, monotonic)
        self._snapshots: dict[str, dict[str, Any]] = {}
        self._events: deque[dict[str, Any]] = deque(maxlen=EVENTS_KEPT)  # every node's, in arrival order
        self._seq = 0

    def claim(self, candidates: list[str], holder: str) -> str | None:
        """The first of `candidates` that `holder` already holds or that nobody live holds."""
        now = time.monotonic()
        for node in candidates:
            held = self._claims.get(node)
            if held is not None and held[0] == holder:
                return node
        for node in candidates:
            held = self._claims.get(node)
            if held is None or now - held[1] > STALE_S:
                self._claims[node] = (holder, now)
                return node
        return None

    def publish(self, node: str, holder: str, snapshot: dict[str, Any], events: list[dict[str, Any]]) -> bool:
        """Keep `snapshot` and the node's events since its last one (numbered anew, fleet-wide);
        False when `holder` no longer holds `node`."""
        held = self._claims.get(node)
        if held is None or held[0] != holder:
            return False
        self._claims[node] = (holder, time.monotonic())
        self._snapshots[node] = snapshot
        for event in events:
            self._seq += 1
            self._events.append({**event, "seq": self._seq})
        return True

    def events(self, after_seq: int = 0) -> list[dict[str, Any]]:
        """The events kept with a number above `after_seq`, oldest first."""
        return [event for event in self._events if event["seq"] > after_seq]

    def release(self, node: str, holder: str) -> None:
        if self._claims.get(node, ("",))[0] == holder:
            del self._claims[node]
            self._snapshots.pop(node, None)

    def snapshots(self) -> list[dict[str, Any]]:
        """The live nodes' latest snapshots, by node name."""
        now = time.monotonic()
        live = {node for node, (_, heard) in self._claims.items() if now - heard <= STALE_S}
        return [self._snapshots[node] for node in sorted(self._snapshots) if node in live]


def registry_actor(name: str, *, create: bool = False) -> Any:
    """The registry actor called `name`: created (detached, so it outlives `corral fleet up`)
    when `create`, else looked up; a missing one is a clear error."""
    from ..errors import CorralError

    if create:
        return ray.remote(Registry).options(name=name, namespace=NAMESPACE, lifetime="detached",
                                            get_if_exists=True, num_cpus=0).remote()
    try:
        return ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        raise CorralError(f"no corral fleet registry {name!r} on this Ray cluster; start the fleet with "
                          "`corral fleet up --config fleet.toml`") from None
