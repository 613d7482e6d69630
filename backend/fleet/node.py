"""The node deployment: one replica per host (each asks for one unit of the fleet's node
resource, which every host offers once), wrapping a `LocalBackend` on that host's own config.

corral owns loading and eviction here; Ray owns the process, the routing hooks and the
transport. The replica never lets Ray unload a model (no `serve.multiplexed`): Ray's count-based
LRU knows neither bytes nor streams in flight. Instead it reports what its manager holds
(`record_routing_stats`, read by the fleet's request router) and publishes a snapshot to the
registry each second for the console, with its events since the last one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING, Any

import ray

from ..errors import CorralError
from ..local import LocalBackend
from .carry import carried
from .registry import registry_actor
from .report import Counters, NodeSnapshot, node_report
from .settings import FleetSettings

if TYPE_CHECKING:
    from ..events import Event
    from ..generation import Chunk, Embeddings
    from ..request import GenerationRequest
    from ..snapshot import ModelInfo, Status

log = logging.getLogger("corral.fleet")

PUBLISH_S = 1.0
EVENTS_HELD = 1000  # between two publishes; beyond that the oldest go
EVICTION_CAUSES = ("budget", "max_loaded", "operator", "ttl")


class NodeReplica:
    """The replica of one host. Every method takes `node=` too, which only the router reads:
    an operator's action on a chosen node goes to that node's replica."""

    def __init__(self, fleet: dict[str, Any]) -> None:
        self.fleet = FleetSettings.model_validate(fleet)
        self._registry = registry_actor(self.fleet.registry)
        self._holder = ray.get_runtime_context().get_actor_id() or "driver"
        self.node = self._claim()
        config = next(n.config for n in self.fleet.nodes if n.name == self.node)
        self.backend = LocalBackend(config=config)
        self.counters = Counters()
        self._states: dict[str, str] = {}
        self._outbox: deque[dict[str, Any]] = deque(maxlen=EVENTS_HELD)
        self._tasks: list[asyncio.Task[None]] = []

    def _claim(self) -> str:
        """This host's node name: the fleet's node whose resource this Ray node offers (the
        first one no other live replica holds, where one Ray node offers several)."""
        here = ray.get_runtime_context().get_node_id()
        offered = next((n["Resources"] for n in ray.nodes() if n["NodeID"] == here), {})
        candidates = [n.name for n in self.fleet.nodes if n.resource in offered]
        name = ray.get(self._registry.claim.remote(candidates, self._holder)) if candidates else None
        if name is None:
            wanted = ", ".join(f"{n.name} ({n.resource})" for n in self.fleet.nodes)
            raise CorralError(f"this Ray node offers none of the fleet's free node resources ({wanted}); start "
                              "each host with `ray start --resources` naming its node's resource")
        return name

    def _start(self) -> None:
        """Background work starts on the replica's loop at its first call (the constructor has none)."""
        if not self._tasks:
            self._tasks = [asyncio.create_task(self._count(), name="corral-fleet-count"),
                           asyncio.create_task(self._publish(), name="corral-fleet-publish")]

    async def _count(self) -> None:
        """Loads, evictions and each model's state, from the backend's own events, which go on
        to the registry with the next snapshot."""
        async for event in self.backend.events(after_seq=0):  # from the start: preloads count too
            self._tally(event)
            self._outbox.append(event.to_dict())

    def _tally(self, event: Event) -> None:
        if event.type == "loaded":
            self.counters.loads += 1
        elif event.type == "state" and event.model is not None:
            self._states[event.model] = event.new  # type: ignore[attr-defined]
            if event.new == "unloading" and event.cause in EVICTION_CAUSES:  # type: ignore[attr-defined]
                self.counters.evictions += 1

    async def _publish(self) -> None:
        while True:
            try:
                snapshot = NodeSnapshot(self.node, await self.backend.status(), Counters(**vars(self.counters)))
                events = list(self._outbox)
                self._outbox.clear()
                if not await self._registry.publish.remote(self.node, self._holder, snapshot.to_dict(), events):
                    # the registry lost the claim (it was restarted, or this replica went quiet): claim again
                    await self._registry.claim.remote([self.node], self._holder)
            except Exception:  # the registry restarting, a status that failed: try again next second
                log.warning("node %s: could not publish its snapshot", self.node, exc_info=True)
            await asyncio.sleep(PUBLISH_S)

    # -- what the router and the controller ask ------------------------------------------------

    async def record_routing_stats(self) -> dict[str, Any]:
        self._start()
        return node_report(self.node, await self.backend.status()).to_stats()

    async def status(self, node: str | None = None) -> Status:
        """The node's status now (the registry's snapshot may be a second old)."""
        self._start()
        return await self.backend.status()

    async def check_health(self) -> None:
        self._start()
        await self.backend.ready()

    # -- requests ------------------------------------------------------------------------------

    async def generate(self, request: GenerationRequest, node: str | None = None) -> AsyncGenerator[Chunk, None]:
        """Stream one generation. When the caller goes (a client disconnect cancels the call),
        closing the backend stream frees the slot at the engine's next step."""
        self._start()
        self._count_request(request.model)
        with carried():
            async with contextlib.aclosing(self.backend.generate(request)) as chunks:
                async for chunk in chunks:
                    yield chunk

    def _count_request(self, model: str) -> None:
        self.counters.requests += 1
        if self._states.get(model) in ("ready", "busy"):
            self.counters.hits += 1

    async def embed(self, model: str, inputs: list[str], options: dict[str, Any],
                    node: str | None = None) -> Embeddings:
        self._start()
        self._count_request(model)
        with carried():
            return await self.backend.embed(model, inputs, **options)

    async def count_tokens(self, request: GenerationRequest, node: str | None = None) -> int:
        self._start()
        with carried():
            return await self.backend.count_tokens(request)

    # -- the operator's verbs ------------------------------------------------------------------

    async def load(self, name: str, keep_alive: float | str | None = None, node: str | None = None) -> ModelInfo:
        self._start()
        with carried():
            return await self.backend.load(name, keep_alive)

    async def evict(self, name: str, force: bool = False, node: str | None = None) -> ModelInfo:
        self._start()
        with carried():
            return await self.backend.evict(name, force=force)

    async def pin(self, name: str, pinned: bool = True, node: str | None = None) -> ModelInfo:
        self._start()
        with carried():
            return await self.backend.pin(name, pinned)

    async def unload_all(self, node: str | None = None) -> None:
        self._start()
        with carried():
            await self.backend.unload_all()

    async def rescan(self, node: str | None = None) -> list[ModelInfo]:
        self._start()
        with carried():
            return await self.backend.rescan()

    def __del__(self) -> None:
        """Serve's shutdown of the replica: give the node's name back and unload its models."""
        for task in getattr(self, "_tasks", ()):
            task.cancel()
        if hasattr(self, "backend"):
            with contextlib.suppress(Exception):
                self._registry.release.remote(self.node, self._holder)
            self.backend.close()
