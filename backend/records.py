"""What the manager keeps per model: its lifecycle states, its mutable record, a request's
lease on it, and the gate that admits one load at a time."""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from enum import Enum

from .catalog import CatalogEntry
from .chat import choose_template
from .config import ModelDefaults
from .engine import Engine
from .errors import ConfigError
from .memory import MemoryEstimate
from .modellog import ModelLog
from .placement import Placement
from .snapshot import RequestPercentiles


class State(str, Enum):
    AVAILABLE = "available"
    LOADING = "loading"
    READY = "ready"
    BUSY = "busy"
    UNLOADING = "unloading"
    FAILED = "failed"


ALLOWED: dict[State, frozenset[State]] = {
    State.AVAILABLE: frozenset({State.LOADING}),
    State.LOADING: frozenset({State.READY, State.FAILED}),
    State.READY: frozenset({State.BUSY, State.UNLOADING}),
    State.BUSY: frozenset({State.READY, State.UNLOADING}),
    State.UNLOADING: frozenset({State.AVAILABLE}),
    State.FAILED: frozenset({State.LOADING, State.AVAILABLE}),
}
RESIDENT = frozenset({State.LOADING, State.READY, State.BUSY, State.UNLOADING})
RECENT_REQUESTS = 200  # finished requests per model kept for the latency percentiles
COMPLETED = frozenset({"stop", "length"})  # finish reasons whose timings describe the model


@dataclass(frozen=True)
class RequestSample:
    """The timings of one finished request, as its `RequestFinished` event gave them."""

    ttft_s: float | None
    duration_s: float
    tokens_per_s: float | None


@dataclass
class Record:
    """The manager's private, mutable view of one model (touched only on the manager's loop)."""

    entry: CatalogEntry
    settings: ModelDefaults
    pinned: bool = False
    state: State = State.AVAILABLE
    error: str | None = None
    estimate: MemoryEstimate | None = None
    measured: int | None = None
    measured_vram: dict[int, int] | None = None  # per GPU index, where GPUs are present
    placement: Placement | None = None  # where the current (or last failed) load went
    load_seconds: float | None = None
    load_percent: int | None = None
    engine: Engine | None = None
    load_task: asyncio.Task[None] | None = None
    in_flight: int = 0
    draining: bool = False
    last_used: float | None = None
    expires_at: float | None = None  # monotonic
    keep_alive_override: float | None = None  # from the latest request, until unload
    unload_task: asyncio.Task[None] | None = None
    template_source: str | None = None
    priority: int = 0
    log: ModelLog = field(default_factory=ModelLog)  # llama.cpp's lines of its loads and runs
    chat_format: str | None = None
    chat_template: str | None = None
    recent: deque[RequestSample] = field(default_factory=lambda: deque(maxlen=RECENT_REQUESTS))

    @property
    def name(self) -> str:
        return self.entry.name

    def percentiles(self) -> RequestPercentiles | None:
        """TTFT / latency / speed percentiles of the recent requests; None before the first."""
        if not self.recent:
            return None
        return RequestPercentiles.of([s.ttft_s for s in self.recent if s.ttft_s is not None],
                                     [s.duration_s for s in self.recent],
                                     [s.tokens_per_s for s in self.recent if s.tokens_per_s])

    def own_template(self, gguf_template: str | None) -> str | None:
        """The template text chats take from config or from the GGUF (`gguf_template`), picked
        as a load picks it; None when they fall back to a built-in one for the architecture."""
        try:
            chosen = choose_template(gguf_template=gguf_template, architecture="", bos_token="", eos_token="",
                                     config_format=self.chat_format, config_template=self.chat_template)
        except ConfigError:  # an unknown chat_format: the model's load says so
            return None
        return None if chosen.source.startswith("fallback:") else chosen.text

    @property
    def keep_alive(self) -> float:
        return self.settings.keep_alive if self.keep_alive_override is None else self.keep_alive_override

    @property
    def reserved(self) -> int:
        """What this model counts against the RAM budget: what it can reach under load (the
        estimate), or what was measured right after its load where that is more, plus the KV it
        has parked beside its cache now (up to [budgets] saved_kv_ram). The measured
        figure alone would undercount: compute pages are touched as graph shapes vary, and the
        embeddings context opens with the first embedding request."""
        if self.state not in RESIDENT:
            return 0
        planned = self.placement.ram if self.placement is not None else self.estimate.total if self.estimate else 0
        return max(planned, self.measured or 0) + self.parked_bytes

    @property
    def parked_bytes(self) -> int:
        """Idle sequences' KV parked beside the cache: counted on top, as it comes and goes."""
        return self.engine.parked_bytes() if self.engine is not None else 0

    def vram_on(self, gpu: int) -> int:
        """What this model counts against GPU `gpu`'s VRAM budget: measured once known."""
        if self.state not in RESIDENT or self.placement is None or self.placement.gpu != gpu:
            return 0
        if self.measured_vram is not None:
            return self.measured_vram.get(gpu, 0)
        return self.placement.vram

    @property
    def evictable(self) -> bool:
        """Automatic eviction takes idle, unpinned models only (DESIGN.md, Decisions)."""
        return self.state == State.READY and self.in_flight == 0 and not self.pinned and not self.draining


@dataclass
class Lease:
    """A request's hold on a loaded model: keeps it from eviction until released, and keeps
    its weights alive (a reference) even if the model is closed under it at shutdown."""

    record: Record
    engine: Engine
    released: bool = field(default=False)

    def __post_init__(self) -> None:
        self.engine.weights.retain()


class PriorityGate:
    """One load at a time (admission must see settled numbers); when several loads wait, the
    highest priority goes next, first come first served among equals."""

    def __init__(self) -> None:
        self._busy = False
        self._waiting: list[tuple[int, int, asyncio.Future[None], str]] = []
        self._order = itertools.count()

    @contextlib.asynccontextmanager
    async def hold(self, name: str, priority: int) -> AsyncIterator[None]:
        if self._busy:
            ticket = (-priority, next(self._order), asyncio.get_running_loop().create_future(), name)
            heapq.heappush(self._waiting, ticket)
            try:
                await ticket[2]
            except asyncio.CancelledError:
                if ticket in self._waiting:
                    self._waiting.remove(ticket)
                    heapq.heapify(self._waiting)
                elif ticket[2].done() and not ticket[2].cancelled():
                    self._pass_on()  # we were handed the gate as we were cancelled: hand it on
                raise
        self._busy = True
        try:
            yield
        finally:
            self._pass_on()

    def _pass_on(self) -> None:
        while self._waiting:
            _, _, future, _ = heapq.heappop(self._waiting)
            if not future.done():
                future.set_result(None)  # the gate stays busy: it passes straight to this waiter
                return
        self._busy = False

    def waiting(self) -> list[str]:
        """Names of the waiting loads, next first."""
        return [name for *_, name in sorted(self._waiting)]
