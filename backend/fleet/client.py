"""The fleet seen from one process (the ingress, the console): the node deployment's handle,
routed by the fleet's router, and the registry's snapshots.

`FleetBackend` is the `Backend` the ingress's HTTP app runs on, so every dialect, the auth and
the errors are the same modules as `corral serve`'s; a generation streams through the handle
and leaving the stream cancels the node's request. `Fleet` adds what only a fleet has: its nodes
and the operator's verbs on a chosen node (the console's fleet view)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable
from typing import TYPE_CHECKING, Any, TypeVar

import ray
from ray.exceptions import RayTaskError

from ..errors import CorralError, NotSupported
from ..events import event_from_dict
from ..request import chat_request, completion_request
from ..snapshot import ModelInfo, Status
from ..telemetry import HostStats
from .carry import CarriedError, restored
from .registry import registry_actor
from .report import NodeSnapshot

if TYPE_CHECKING:
    from ..events import Event
    from ..generation import Chunk, Embeddings
    from ..request import GenerationRequest

T = TypeVar("T")
EVENTS_POLL_S = 0.5
STATE_ORDER = ("busy", "ready", "loading", "unloading", "failed", "available")  # the best a fleet can say


async def _unwrapped(call: Awaitable[T]) -> T:
    """A node's CorralError as itself (Ray wraps what a replica raises)."""
    try:
        return await call
    except RayTaskError as exc:
        raise restored(exc) from None


class Fleet:
    """The nodes of the fleet called `app`: snapshots from its registry, actions through its
    node deployment's handle."""

    def __init__(self, app: str, handle: Any = None, registry: str | None = None) -> None:
        from .settings import REGISTRY_SUFFIX

        self.app = app
        self._handle = handle
        self.registry = registry_actor(registry or app + REGISTRY_SUFFIX)

    @property
    def handle(self) -> Any:
        """The node deployment's handle, looked up at the first action (a view that only reads
        needs none)."""
        if self._handle is None:
            from ray import serve

            self._handle = serve.get_deployment_handle("node", app_name=self.app)
        return self._handle

    async def nodes(self) -> list[NodeSnapshot]:
        return [NodeSnapshot.from_dict(data) for data in await self.registry.snapshots.remote()]

    async def load(self, node: str, model: str) -> ModelInfo:
        return await self._on(node, "load", model)

    async def evict(self, node: str, model: str, *, force: bool = False) -> ModelInfo:
        return await self._on(node, "evict", model, force)

    async def pin(self, node: str, model: str, pinned: bool = True) -> ModelInfo:
        return await self._on(node, "pin", model, pinned)

    async def _on(self, node: str, method: str, *args: Any) -> Any:
        """Call `method` on `node`'s replica from a task inside the cluster: a console attached
        through Ray Client (ray://) cannot keep a deployment handle of its own."""
        global _on_node_task
        if _on_node_task is None:
            _on_node_task = ray.remote(num_cpus=0)(_on_node)
        return await _unwrapped(_on_node_task.remote(self.app, node, method, args))


_on_node_task: Any = None


def _on_node(app: str, node: str, method: str, args: tuple[Any, ...]) -> Any:
    """In a Ray task: the node replica's answer, or what it raised, as it raised it."""
    from ray import serve

    handle = serve.get_deployment_handle("node", app_name=app)
    try:
        return getattr(handle, method).remote(*args, node=node).result()
    except RayTaskError as exc:
        if isinstance(exc.cause, CarriedError):
            raise exc.cause from None
        raise


class FleetBackend:
    """The Backend protocol over a fleet. Per-node work (pulls, removal, config versions) stays
    with each node's own `corral`; the fleet says so in a 501."""

    kind = "fleet"

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.label = f"fleet {fleet.app}"

    def _routed(self, model: str, **options: Any) -> Any:
        return self.fleet.handle.options(multiplexed_model_id=model, **options)

    # -- what every node shows, merged ------------------------------------------------------------

    async def models(self) -> list[ModelInfo]:
        """Each model once, as the node where it is furthest along shows it."""
        best: dict[str, ModelInfo] = {}
        for snapshot in await self.fleet.nodes():
            for model in snapshot.status.models:
                held = best.get(model.name)
                if held is None or STATE_ORDER.index(model.state) < STATE_ORDER.index(held.state):
                    best[model.name] = model
        return [best[name] for name in sorted(best)]

    async def status(self) -> Status:
        """The fleet as one host: its models merged, its memory and processors summed."""
        snapshots = await self.fleet.nodes()
        hosts = [s.status.host for s in snapshots]
        host = HostStats(ts=time.time(), cpu_percent=sum(h.cpu_percent * h.cpu_count for h in hosts)
                         / max(1, sum(h.cpu_count for h in hosts)),
                         cpu_count=sum(h.cpu_count for h in hosts), physical_cores=sum(h.physical_cores for h in hosts),
                         ram_used=sum(h.ram_used for h in hosts), ram_total=sum(h.ram_total for h in hosts),
                         ram_available=sum(h.ram_available for h in hosts),
                         process_rss=sum(h.process_rss for h in hosts),
                         gpus=tuple(g for h in hosts for g in h.gpus),
                         gpu_note="; ".join(sorted({h.gpu_note for h in hosts if h.gpu_note})))
        return Status(tuple(await self.models()), host, sum(s.status.ram_budget for s in snapshots),
                      sum(s.status.ram_reserved for s in snapshots), sum(s.status.max_loaded for s in snapshots))

    async def details(self, name: str) -> Any:
        raise NotSupported(f"model details are per node: run `corral attach` on the node that holds {name!r}")

    # -- generation, routed by model --------------------------------------------------------------

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[Chunk, None]:
        """Stream from the node the router picks. Leaving early (a client that disconnects)
        cancels the node's request, which frees its slot."""
        response = self._routed(request.model, stream=True).generate.remote(request)
        finished = False
        try:
            async for chunk in _chunks(response):
                yield chunk
            finished = True
        finally:
            if not finished:
                response.cancel()

    def complete(self, model: str, prompt: str, **options: Any) -> AsyncIterator[Chunk]:
        return self.generate(completion_request(model, prompt, **options))

    def chat(self, model: str, messages: list[dict[str, Any]], **options: Any) -> AsyncIterator[Chunk]:
        return self.generate(chat_request(model, messages, **options))

    async def embed(self, model: str, inputs: list[str], **options: Any) -> Embeddings:
        return await _unwrapped(self._routed(model).embed.remote(model, inputs, options))

    async def count_tokens(self, request: GenerationRequest) -> int:
        return await _unwrapped(self._routed(request.model).count_tokens.remote(request))

    # -- the operator's verbs over the whole fleet -------------------------------------------------

    async def load(self, name: str, keep_alive: float | str | None = None) -> ModelInfo:
        """Load `name` where the router would send its next request."""
        return await _unwrapped(self._routed(name).load.remote(name, keep_alive))

    async def evict(self, name: str, *, force: bool = False) -> ModelInfo:
        """Evict `name` from every node that holds it."""
        return await self._on_holders(name, lambda node: self.fleet.evict(node, name, force=force))

    async def pin(self, name: str, pinned: bool = True) -> ModelInfo:
        """Pin (or unpin) `name` on every node that holds it."""
        return await self._on_holders(name, lambda node: self.fleet.pin(node, name, pinned))

    async def _on_holders(self, name: str, act: Any) -> ModelInfo:
        holders = [s.node for s in await self.fleet.nodes()
                   if any(m.name == name and m.state in ("ready", "busy", "loading") for m in s.status.models)]
        if not holders:
            raise CorralError(f"model {name!r} is not loaded on any node of the fleet; `corral fleet` shows "
                              "where each model is")
        infos = await asyncio.gather(*(act(node) for node in holders))
        return infos[0]

    async def unload_all(self) -> None:
        await asyncio.gather(*(_unwrapped(self.fleet.handle.unload_all.remote(node=s.node))
                               for s in await self.fleet.nodes()))

    async def rescan(self) -> list[ModelInfo]:
        await asyncio.gather(*(_unwrapped(self.fleet.handle.rescan.remote(node=s.node))
                               for s in await self.fleet.nodes()))
        return await self.models()

    # -- per node only -----------------------------------------------------------------------------

    def _per_node(self, what: str) -> NotSupported:
        return NotSupported(f"{what} is per node in a fleet: run it with `corral` on that node's host")

    async def pull(self, source: str, **options: Any) -> AsyncGenerator[Any, None]:
        raise self._per_node("pulling a model")
        yield  # an async generator, as the protocol has it

    async def cancel_pull(self, pull_id: str) -> Any:
        raise self._per_node("a pull")

    async def pulls(self) -> list[Any]:
        return []  # a fleet runs no pulls of its own

    async def remove(self, name: str) -> list[str]:
        raise self._per_node("removing a model")

    async def reload_config(self, source: str = "api") -> Any:
        raise self._per_node("reloading the config")

    async def rollback_config(self, number: int, source: str = "api") -> Any:
        raise self._per_node("a config rollback")

    async def config_versions(self) -> list[Any]:
        raise self._per_node("config versions")

    async def events(self, after_seq: int | None = None) -> AsyncGenerator[Event, None]:
        """Every node's events as the registry numbers them, about a second late (each node
        sends its own with its snapshot). `after_seq` resumes after an event already seen."""
        seen = after_seq or 0
        while True:
            batch = await self.fleet.registry.events.remote(seen)
            for data in batch:
                seen = data["seq"]
                yield event_from_dict(data)
            if not batch:
                await asyncio.sleep(EVENTS_POLL_S)

    async def ready(self) -> None:
        """Wait until a node has published its first snapshot."""
        while not await self.fleet.nodes():
            await asyncio.sleep(0.2)

    async def warmed(self) -> None:
        await self.ready()

    async def aclose(self) -> None:
        return None


async def _chunks(response: Any) -> AsyncGenerator[Chunk, None]:
    try:
        async for chunk in response:
            yield chunk
    except RayTaskError as exc:
        raise restored(exc) from None
