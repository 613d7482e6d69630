"""The fleet simulation's model: nodes that run corral's manager, the two ways of routing to
them, and a discrete-event clock. fleet_sim.py builds workloads on it and prints the tables.

Every node is corral's manager (backend/manager.py, admission.py) reduced to what routing
sees: one load at a time; a load first evicts idle models least recently used first until it
fits the byte budget, waits for models that are draining, or is refused when everything left
is busy; each loaded model runs `slots` requests at once and queues the rest. Load time is
proportional to size. The node holds at most `max_ongoing` requests (Ray's
`max_ongoing_requests`). Both policies route through Ray's routing loop: requests wait in
FIFO order for one of at most two routing tasks per node, and a task finding every candidate
full backs off (0, then 0.025 s doubling to 0.5 s) and tries again.

The two policies over the same nodes:

- **corral**: the manager owns eviction; the router ranks nodes with `ranking.rank()` over the
  reports each node made at the last report tick (every `report_period_s`, so up to a second
  stale) with `ranking.Routed` overlaid, and takes the least busy node with room inside the
  first group that has one (Ray's `_select_from_candidate_replicas`, which the custom router
  hands its groups to).
- **ray**: Ray Serve's own multiplexing on top of the same managers, as
  python/ray/serve/multiplex.py and request_router/{request_router,pow_2_router}.py do it: each
  replica keeps a count-based LRU of model ids (`max_num_models_per_replica`); a miss takes the
  replica's load lock, unloads the least recently used id when the count is reached (here: the
  manager drains and evicts it), then loads; a hit returns at once and the request goes to the
  manager, which reloads a model it had to evict for bytes. Replicas push their model ids
  (loaded and loading) 0.1 s after a miss or an unload. The router prefers replicas whose ids
  hold the model and falls back to those with the fewest ids (at once when none holds it, and
  on every retry); once a matching timeout drawn in 1-2 s has passed, to those with the fewest
  once more, then to all. From its candidates it draws two at random and takes the less busy
  one with room (power of two choices).

What is left out, for both alike: the network, CPU contention between a node's models (each
model's slots run independently), prefix caches and idle TTLs.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from corral.backend.fleet.ranking import NodeReport, Routed, rank

GB = 10**9
RAY_PUSH_S = 0.1           # PUSH_MULTIPLEXED_MODEL_IDS_INTERVAL_S
RAY_MATCHING_S = 1.0       # RAY_SERVE_MULTIPLEXED_MODEL_ID_MATCHING_TIMEOUT_S (drawn in [1x, 2x))
RAY_BACKOFF_S = (0.025, 2, 0.5)  # initial, multiplier, max (RAY_SERVE_ROUTER_RETRY_*)


@dataclass(frozen=True)
class Fleet:
    """The nodes, alike: every node can load every model in `sizes`."""

    nodes: int
    sizes: dict[str, int]          # model -> bytes
    budget: int                    # bytes per node
    slots: int = 4                 # parallel sequences per loaded model (n_parallel)
    max_ongoing: int = 32          # requests a node holds, running and queued
    load_s_per_gb: float = 0.5
    report_period_s: float = 1.0


@dataclass(frozen=True)
class Job:
    """One request: when it arrives (open loop), its model, and how long it takes once a slot
    runs it: prefill up to the first token, then decoding."""

    at: float
    model: str
    prefill_s: float
    decode_s: float


@dataclass
class Result:
    policy: str
    requests: int = 0
    loads: int = 0
    evictions: int = 0
    hits: int = 0
    refused: int = 0
    peak_bytes: int = 0  # the most any node held at once
    ttft: list[float] = field(default_factory=list)

    @property
    def hit_rate(self) -> float:
        return self.hits / self.requests if self.requests else 0.0

    def ttft_quantile(self, q: float) -> float:
        """Nearest-rank quantile of the time to first token over served requests."""
        if not self.ttft:
            return math.nan
        ordered = sorted(self.ttft)
        return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


class Clock:
    """Discrete-event time: callbacks run in time order, ties in the order they were set."""

    def __init__(self) -> None:
        self.now = 0.0
        self._events: list[tuple[float, int, Callable[[], None]]] = []
        self._order = itertools.count()

    def at(self, when: float, action: Callable[[], None]) -> None:
        heapq.heappush(self._events, (when, next(self._order), action))

    def after(self, delay: float, action: Callable[[], None]) -> None:
        self.at(self.now + delay, action)

    def run(self) -> None:
        while self._events:
            self.now, _, action = heapq.heappop(self._events)
            action()


@dataclass(eq=False)
class Request:
    job: Job
    arrived: float
    finished: Callable[[Request], None]
    attempts: int = 0
    # Ray's routing context (request_router.py): when matching started, which fallbacks ran
    matching_since: float | None = None
    tried_first: bool = False
    tried_fewest: bool = False

    @property
    def model(self) -> str:
        return self.job.model


@dataclass(eq=False)
class Resident:
    """A model on a node: loading, ready, or draining (an eviction waiting for its requests)."""

    name: str
    size: int
    state: str
    last_used: float
    running: int = 0
    queue: deque[Request] = field(default_factory=deque)
    on_load: list[Callable[[bool], None]] = field(default_factory=list)
    on_unload: list[Callable[[], None]] = field(default_factory=list)
    drain_when_loaded: bool = False

    @property
    def active(self) -> int:
        return self.running + len(self.queue)


class Node:
    """One node's corral manager, as routing sees it (see the module docstring)."""

    def __init__(self, index: int, fleet: Fleet, clock: Clock, result: Result) -> None:
        self.index, self.name = index, f"node{index}"
        self.fleet, self.clock, self.result = fleet, clock, result
        self.resident: dict[str, Resident] = {}
        self.pending: dict[str, list[Callable[[bool], None]]] = {}  # loads waiting for the gate
        self.loading = False                                         # the one-load-at-a-time gate
        self.room_waiters: list[Callable[[], None]] = []            # a load waiting for a drain
        self.ongoing = 0

    # -- what the router sees -----------------------------------------------------------------

    def report(self) -> NodeReport:
        live = [r for r in self.resident.values() if r.state != "draining"]
        idle = sorted((r for r in live if r.state == "ready" and not r.active), key=lambda r: r.last_used)
        return NodeReport(
            node=self.name,
            loaded={r.name: "loading" if r.state == "loading" else "busy" if r.active else "ready" for r in live},
            catalog=self.fleet.sizes, budget_bytes=self.fleet.budget,
            used_bytes=sum(r.size for r in self.resident.values()),
            evictable=tuple((r.name, r.size) for r in idle), ongoing=self.ongoing)

    @property
    def has_room(self) -> bool:
        return self.ongoing < self.fleet.max_ongoing

    # -- requests -------------------------------------------------------------------------------

    def accept(self, request: Request) -> None:
        """The request is this node's from now on (Ray counts it in the replica's queue)."""
        self.ongoing += 1
        held = self.resident.get(request.model)
        self.result.hits += held is not None and held.state == "ready"

    def run(self, request: Request) -> None:
        """The manager's acquire (loading the model if it must) and then generation."""
        self.ensure(request.model, lambda ok: self._queue(request) if ok else self.refuse(request))

    def _queue(self, request: Request) -> None:
        held = self.resident[request.model]
        held.queue.append(request)
        self._pump(held)

    def _pump(self, held: Resident) -> None:
        while held.running < self.fleet.slots and held.queue:
            request = held.queue.popleft()
            held.running += 1
            held.last_used = self.clock.now
            first_token = self.clock.now + request.job.prefill_s
            self.result.ttft.append(first_token - request.arrived)
            self.clock.at(first_token + request.job.decode_s, lambda r=request: self._finish(held, r))

    def _finish(self, held: Resident, request: Request) -> None:
        held.running -= 1
        held.last_used = self.clock.now
        self._done(request)
        self._pump(held)
        if held.state == "draining" and not held.active:
            self._unload(held)

    def refuse(self, request: Request) -> None:
        self.result.refused += 1
        self._done(request)

    def _done(self, request: Request) -> None:
        self.ongoing -= 1
        request.finished(request)

    # -- the manager: loads and evictions ----------------------------------------------------

    def ensure(self, model: str, then: Callable[[bool], None]) -> None:
        """`then(True)` once `model` is ready here, loading it if it must (one load at a time,
        single flight); `then(False)` when it cannot be made to fit."""
        held = self.resident.get(model)
        if held is not None and held.state == "ready":
            then(True)
        elif held is not None and held.state == "loading":
            held.on_load.append(then)
        elif held is not None:  # draining: load it again once it is gone
            held.on_unload.append(lambda: self.ensure(model, then))
        else:
            self.pending.setdefault(model, []).append(then)
            self._next_load()

    def evict(self, model: str) -> None:
        """An eviction asked from outside the manager (Ray's LRU): drain first, then unload."""
        held = self.resident.get(model)
        if held is None or held.state == "draining":
            return
        if held.state == "loading":
            held.drain_when_loaded = True
        elif held.active:
            held.state = "draining"
        else:
            self._unload(held)

    def _next_load(self) -> None:
        if self.loading or not self.pending:
            return
        model = next(iter(self.pending))
        self.loading = True
        self._make_room(model, self.pending.pop(model))

    def _make_room(self, model: str, waiting: list[Callable[[bool], None]]) -> None:
        size = self.fleet.sizes[model]
        while size > self.fleet.budget - sum(r.size for r in self.resident.values()):
            idle = [r for r in self.resident.values() if r.state == "ready" and not r.active]
            if idle:
                self._unload(min(idle, key=lambda r: r.last_used))
            elif size <= self.fleet.budget and any(r.state == "draining" for r in self.resident.values()):
                self.room_waiters.append(lambda: self._make_room(model, waiting))
                return
            else:
                self.loading = False
                for then in waiting:
                    then(False)
                self._next_load()
                return
        held = self.resident[model] = Resident(model, size, "loading", self.clock.now, on_load=waiting)
        self.result.peak_bytes = max(self.result.peak_bytes, sum(r.size for r in self.resident.values()))
        self.clock.after(size / GB * self.fleet.load_s_per_gb, lambda: self._loaded(held))

    def _loaded(self, held: Resident) -> None:
        self.result.loads += 1
        held.state = "draining" if held.drain_when_loaded else "ready"
        held.last_used = self.clock.now
        self.loading = False
        waiting, held.on_load = held.on_load, []
        for then in waiting:
            then(True)
        if held.state == "draining" and not held.active:
            self._unload(held)
        self._next_load()

    def _unload(self, held: Resident) -> None:
        del self.resident[held.name]
        self.result.evictions += 1
        actions, self.room_waiters = held.on_unload + self.room_waiters, []
        for action in actions:
            action()


class RayReplica:
    """Ray Serve's `_ModelMultiplexWrapper` in front of one node (multiplex.py): a count-based
    LRU of model ids with one load at a time, pushing its ids to the router."""

    def __init__(self, node: Node, max_models: int, push: Callable[[RayReplica], None]) -> None:
        self.node, self.max_models, self._push = node, max_models, push
        self.models: OrderedDict[str, None] = OrderedDict()
        self.load_tasks: set[str] = set()
        self._lock_queue: deque[Request] = deque()
        self._locked = False

    @property
    def ids(self) -> frozenset[str]:
        return frozenset(self.models) | self.load_tasks

    def handle(self, request: Request) -> None:
        if request.model in self.models:
            self.models.move_to_end(request.model)
            self.node.run(request)
            return
        self.load_tasks.add(request.model)
        self._push(self)
        self._lock_queue.append(request)
        self._next()

    def _next(self) -> None:
        if self._locked or not self._lock_queue:
            return
        request = self._lock_queue.popleft()
        if request.model in self.models:  # loaded by another request while this one waited;
            self.node.run(request)         # like Ray, the id stays among the loading ones
            self._next()
            return
        self._locked = True
        if self.max_models > 0 and len(self.models) >= self.max_models:
            victim, _ = self.models.popitem(last=False)
            self.node.evict(victim)
            self._push(self)
        self.node.ensure(request.model, lambda ok: self._loaded(request, ok))

    def _loaded(self, request: Request, ok: bool) -> None:
        self.load_tasks.discard(request.model)
        if ok:
            self.models[request.model] = None
            self.node.run(request)
        else:
            self.node.refuse(request)
        self._locked = False
        self._next()


class CorralRouter:
    """`ranking.rank()` over the last reports with `Routed` overlaid (the fleet's router)."""

    def __init__(self, nodes: Sequence[Node], clock: Clock) -> None:
        self.nodes, self.clock = list(nodes), clock
        self.by_name = {n.name: n for n in self.nodes}
        self.routed = Routed()
        self.reports = [n.report() for n in self.nodes]

    def refresh(self) -> None:
        self.reports = [n.report() for n in self.nodes]

    def choose(self, request: Request) -> list[list[Node]]:
        seen = [self.routed.overlay(r, self.clock.now) for r in self.reports]
        groups = rank(seen, request.model)
        if not groups:  # nothing fits anywhere as last reported: the least busy node answers
            return [[self.by_name[r.node] for r in sorted(seen, key=lambda r: r.ongoing)]]
        return [[self.by_name[r.node] for r in group] for group in groups]

    def dispatch(self, node: Node, request: Request) -> None:
        self.routed.sent(node.name, request.model, self.clock.now)
        node.accept(request)
        node.run(request)


class RayRouter:
    """Ray's PowerOfTwoChoicesRequestRouter with MultiplexMixin (see the module docstring)."""

    def __init__(self, nodes: Sequence[Node], clock: Clock, rng: random.Random, max_models: int) -> None:
        self.clock, self.rng = clock, rng
        self.replicas = [RayReplica(n, max_models, self._push) for n in nodes]
        self.of_node = {r.node: r for r in self.replicas}
        self.view: dict[RayReplica, frozenset[str]] = {r: frozenset() for r in self.replicas}
        self.fallback: set[str] = set()

    def _push(self, replica: RayReplica) -> None:
        def publish() -> None:
            self.view[replica] = replica.ids
        self.clock.after(RAY_PUSH_S, publish)

    def _fewest(self) -> list[RayReplica]:
        least = min(len(self.view[r]) for r in self.replicas)
        return [r for r in self.replicas if len(self.view[r]) == least]

    def _candidates(self, request: Request) -> list[RayReplica]:
        """MultiplexMixin.apply_multiplex_routing."""
        if request.matching_since is None:
            request.matching_since = self.clock.now
        model = request.model
        if self.clock.now - request.matching_since < self.rng.uniform(RAY_MATCHING_S, 2 * RAY_MATCHING_S):
            holders = [r for r in self.replicas if model in self.view[r]]
            if (not holders and model not in self.fallback) or request.tried_first:
                holders = self._fewest()
                self.fallback.add(model)
            elif holders:
                self.fallback.discard(model)
            request.tried_first = True
            return holders
        if not request.tried_fewest:
            request.tried_fewest = True
            return self._fewest()
        return self.replicas

    def choose(self, request: Request) -> list[list[Node]]:
        """PowerOfTwoChoicesRequestRouter.choose_replicas: two at random from the candidates."""
        candidates = self._candidates(request)
        if len(candidates) <= 2:
            chosen = list(candidates)
            if len(chosen) == 2 and self.rng.getrandbits(1):
                chosen.reverse()
        else:
            i = self.rng.randrange(len(candidates))
            j = self.rng.randrange(len(candidates) - 1)
            chosen = [candidates[i], candidates[j + (j >= i)]]
        return [[r.node for r in chosen]] if chosen else []

    def dispatch(self, node: Node, request: Request) -> None:
        node.accept(request)
        self.of_node[node].handle(request)


def ray_backoff(attempt: int) -> float:
    """Seconds before routing attempt `attempt` (1 = the first retry, which Ray makes at once)."""
    initial, multiplier, most = RAY_BACKOFF_S
    return 0.0 if attempt <= 1 else min(initial * multiplier ** min(attempt - 2, 32), most)


class Routing:
    """Ray's routing loop around either router (request_router.py): requests wait in FIFO
    order for one of at most two routing tasks per replica; a task tries its request's groups
    in order, taking the least busy node with room in the first group that has one
    (`_select_from_candidate_replicas`), and backs off when none has room."""

    def __init__(self, router: CorralRouter | RayRouter, clock: Clock, tasks: int) -> None:
        self.router, self.clock, self.most = router, clock, tasks
        self.waiting: deque[Request] = deque()
        self.tasks = 0

    def submit(self, request: Request) -> None:
        self.waiting.append(request)
        self._start()

    def _start(self) -> None:
        while self.tasks < self.most and self.waiting:
            self.tasks += 1
            self._attempt(self.waiting.popleft())

    def _attempt(self, request: Request) -> None:
        for group in self.router.choose(request):
            best = min((n for n in group if n.has_room), key=lambda n: n.ongoing, default=None)
            if best is not None:
                self.tasks -= 1
                self.router.dispatch(best, request)
                self._start()
                return
        request.attempts += 1
        self.clock.after(ray_backoff(request.attempts), lambda: self._attempt(request))


def simulate(fleet: Fleet, jobs: Sequence[Job], policy: str, *, seed: int = 0, ray_models: int = 0,
             closed_loop: bool = False) -> Result:
    """Run `jobs` through `fleet` under `policy` ("corral" or "ray", the latter with
    `ray_models` as max_num_models_per_replica). Open loop: each job arrives at its `at`.
    Closed loop: one client sends the jobs in order, each when the previous one ends."""
    clock = Clock()
    result = Result(policy if policy == "corral" else f"ray LRU {ray_models}")
    nodes = [Node(i, fleet, clock, result) for i in range(fleet.nodes)]
    if policy == "corral":
        router: CorralRouter | RayRouter = CorralRouter(nodes, clock)
    elif policy == "ray":
        router = RayRouter(nodes, clock, random.Random(seed), ray_models)
    else:
        raise ValueError(f"unknown policy {policy!r}: use 'corral' or 'ray'")
    routing = Routing(router, clock, 2 * fleet.nodes)
    queue = iter(jobs)
    left = len(jobs)

    def finished(_: Request) -> None:
        nonlocal left
        left -= 1
        if closed_loop:
            send_next()

    def send_next() -> None:
        job = next(queue, None)
        if job is not None:
            result.requests += 1
            routing.submit(Request(job, clock.now, finished))

    def tick() -> None:
        if isinstance(router, CorralRouter):
            router.refresh()
        if left:
            clock.after(fleet.report_period_s, tick)

    if closed_loop:
        send_next()
    else:
        for job in jobs:
            clock.at(job.at, send_next)
    tick()
    clock.run()
    return result
