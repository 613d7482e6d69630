"""Typed events and the bus that carries them: the one way backend state changes are announced.

Publishing is thread-safe (engine threads, the manager's loop and load threads all publish),
and every subscriber reads on its own event loop through a bounded queue. A slow subscriber
never blocks the publisher: its oldest events are dropped and it is told how many. A replay
ring lets a reconnecting consumer resume after the last sequence number it saw.
"""

from __future__ import annotations

import asyncio
import threading
import time
import weakref
from collections import deque
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, ClassVar

from .display import repr_html, rich_renderable


@dataclass(frozen=True, kw_only=True)
class Event:
    """Common fields; `seq` and `ts` are stamped by the bus when published."""

    type: ClassVar[str] = "event"
    seq: int = 0
    ts: float = 0.0
    model: str | None = None
    request_id: str | None = None
    session_id: str | None = None

    _repr_html_ = repr_html  # Jupyter and Rich show a one-row table (display.py)
    __rich__ = rich_renderable

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["type"] = self.type
        return data


@dataclass(frozen=True, kw_only=True)
class StateChanged(Event):
    """A model moved from one lifecycle state to another; `reason` says why (evicted, ttl, error…)."""

    type: ClassVar[str] = "state"
    old: str
    new: str
    reason: str = ""
    # why, in one word for counting (/metrics): an unloading's operator, budget, max_loaded, ttl,
    # config, failure or shutdown; a failed load's file, gpu_memory or llama
    cause: str = ""


@dataclass(frozen=True, kw_only=True)
class LoadProgress(Event):
    """llama.cpp's load progress in whole percent steps, so a UI can draw a bar."""

    type: ClassVar[str] = "load_progress"
    percent: int


@dataclass(frozen=True, kw_only=True)
class ModelLoaded(Event):
    """A load finished: how long it took and the memory estimate next to the measured figure."""

    type: ClassVar[str] = "loaded"
    seconds: float
    estimate_bytes: int
    measured_bytes: int


@dataclass(frozen=True, kw_only=True)
class PinChanged(Event):
    type: ClassVar[str] = "pin"
    pinned: bool


@dataclass(frozen=True, kw_only=True)
class RequestStarted(Event):
    type: ClassVar[str] = "request_started"
    prompt_tokens: int
    queue_wait_s: float
    cached_tokens: int = 0  # prompt tokens reused from the sequence's KV cache
    api: str | None = None  # which API the request came in by (GenerationRequest.api)


@dataclass(frozen=True, kw_only=True)
class RequestFinished(Event):
    """One per request: its outcome and speed (never per token)."""

    type: ClassVar[str] = "request_finished"
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    ttft_s: float | None
    duration_s: float
    tokens_per_s: float | None
    error: str | None = None
    cached_tokens: int = 0
    cached: bool = False  # answered from the response cache: nothing was decoded
    api: str | None = None  # which API the request came in by (GenerationRequest.api)
    cancelled_by: str | None = None  # who cancelled it by id (api, console, python); None: its client left


@dataclass(frozen=True, kw_only=True)
class Notice(Event):
    """Something an operator should see that is not a state change (a refused load, a warning)."""

    type: ClassVar[str] = "notice"
    level: str  # "info" | "warning" | "error"
    message: str
    cause: str = ""  # "budget" on a load refused for want of room (counted in /metrics)


@dataclass(frozen=True, kw_only=True)
class ConfigApplied(Event):
    """A configuration became the running one: a numbered version with its diff."""

    type: ClassVar[str] = "config_applied"
    version: int
    source: str
    diff: tuple[str, ...]
    actions: tuple[str, ...]


@dataclass(frozen=True, kw_only=True)
class ConfigRejected(Event):
    """A reload that changed nothing because the new configuration is invalid."""

    type: ClassVar[str] = "config_rejected"
    source: str
    error: str


@dataclass(frozen=True, kw_only=True)
class PullProgress(Event):
    """A pull's download in whole percent steps (`model` is the name it will have); `total` is
    None while the size is unknown."""

    type: ClassVar[str] = "pull_progress"
    pull_id: str
    source: str
    percent: int
    completed: int
    total: int | None


@dataclass(frozen=True, kw_only=True)
class PullFinished(Event):
    """A pulled model is in its folder and in the catalog under `model`."""

    type: ClassVar[str] = "pull_finished"
    pull_id: str
    source: str
    files: tuple[str, ...]
    size: int
    sha256: tuple[str, ...]  # one per file, in the order of `files`
    already: bool = False  # the same source had been pulled there before: nothing was downloaded


@dataclass(frozen=True, kw_only=True)
class PullFailed(Event):
    """A pull that stopped (an error, or cancelled): `partial` is the file a rerun resumes, if any."""

    type: ClassVar[str] = "pull_failed"
    pull_id: str
    source: str
    error: str
    cancelled: bool = False
    partial: str | None = None


@dataclass(frozen=True, kw_only=True)
class ModelRemoved(Event):
    """`corral rm` deleted a pulled model's files."""

    type: ClassVar[str] = "removed"
    files: tuple[str, ...]


@dataclass(frozen=True, kw_only=True)
class Dropped(Event):
    """Delivered to a subscriber in place of events it was too slow to read."""

    type: ClassVar[str] = "dropped"
    count: int


class Subscription:
    """An async iterator over published events, on the loop that subscribed.

    It is registered when created (not on first read), so nothing published after
    `subscribe()` returns is missed. Events arrive in `seq` order, each exactly once.
    """

    def __init__(self, bus: EventBus, loop: asyncio.AbstractEventLoop, limit: int) -> None:
        self._bus = bus
        self.loop = loop
        self._limit = limit
        self._queue: deque[Event] = deque()
        self._wakeup = asyncio.Event()
        self._dropped = 0
        self._closed = False

    def _put(self, event: Event) -> None:
        """On the subscriber's loop: queue, dropping the oldest beyond the limit."""
        if len(self._queue) >= self._limit:
            self._queue.popleft()
            self._dropped += 1
        self._queue.append(event)
        self._wakeup.set()

    def _close(self) -> None:
        """On the subscriber's loop, after every earlier delivery: end once drained."""
        self._closed = True
        self._wakeup.set()

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Event:
        while True:
            if self._dropped:
                count, self._dropped = self._dropped, 0
                return Dropped(ts=time.time(), count=count)
            if self._queue:
                return self._queue.popleft()
            if self._closed:
                raise StopAsyncIteration
            self._wakeup.clear()
            await self._wakeup.wait()

    async def aclose(self) -> None:
        self._bus._remove(self)
        self._closed = True


@dataclass
class EventBus:
    """Thread-safe fan-out of events to async subscribers, with a replay ring."""

    replay_size: int = 1024
    subscriber_limit: int = 1000
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _last_seq: int = 0
    _ring: deque[Event] = field(init=False)
    # Weak: a consumer that breaks out of `async for` and drops its subscription unsubscribes.
    _subscribers: weakref.WeakSet[Subscription] = field(default_factory=weakref.WeakSet)
    _closed: bool = False

    def __post_init__(self) -> None:
        self._ring = deque(maxlen=self.replay_size)

    def publish(self, event: Event) -> Event:
        """Stamp and deliver `event`; callable from any thread. Returns the stamped event.

        Delivery is scheduled under the lock, so subscribers see events in `seq` order even
        when several threads publish at once."""
        with self._lock:
            self._last_seq += 1
            stamped = _stamp(event, self._last_seq, time.time())
            self._ring.append(stamped)
            for sub in list(self._subscribers):
                _call_soon(sub.loop, sub._put, stamped)
        return stamped

    def recent(self, after_seq: int = 0) -> list[Event]:
        """Events still in the replay ring with seq > after_seq (oldest first)."""
        with self._lock:
            return [e for e in self._ring if e.seq > after_seq]

    def subscribe(self, after_seq: int | None = None) -> Subscription:
        """Events from now on, read on the calling (running) loop.

        With `after_seq`, the ring's events after that number come first, so a consumer that
        reconnects sees no gap, or a `Dropped` saying how many the ring no longer holds.
        """
        sub = Subscription(self, asyncio.get_running_loop(), self.subscriber_limit)
        with self._lock:
            if after_seq is not None and after_seq > self._last_seq:
                after_seq = 0  # a number from an earlier process: everything here is new to them
            if after_seq is not None:
                oldest = self._ring[0].seq if self._ring else self._last_seq + 1
                if oldest > after_seq + 1:
                    sub._queue.append(Dropped(ts=time.time(), count=oldest - after_seq - 1))
                sub._queue.extend(e for e in self._ring if e.seq > after_seq)
            if self._closed:
                sub._closed = True
            else:
                self._subscribers.add(sub)
        return sub

    def _remove(self, sub: Subscription) -> None:
        with self._lock:
            self._subscribers.discard(sub)

    def close(self) -> None:
        """End every subscription once it has read what was published before (shutdown)."""
        with self._lock:
            self._closed = True
            subscribers, self._subscribers = list(self._subscribers), weakref.WeakSet()
        for sub in subscribers:
            _call_soon(sub.loop, sub._close)


def _call_soon(loop: asyncio.AbstractEventLoop, fn: Any, *args: Any) -> None:
    """Run `fn` on `loop` from any thread; a closed loop means its subscriber is gone."""
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:
        pass


def _stamp(event: Event, seq: int, ts: float) -> Event:
    return replace(event, seq=seq, ts=ts)


EVENT_TYPES: dict[str, type[Event]] = {
    cls.type: cls
    for cls in (
        StateChanged,
        LoadProgress,
        ModelLoaded,
        PinChanged,
        RequestStarted,
        RequestFinished,
        Notice,
        ConfigApplied,
        ConfigRejected,
        PullProgress,
        PullFinished,
        PullFailed,
        ModelRemoved,
        Dropped,
    )
}


def event_from_dict(data: dict[str, Any]) -> Event:
    """Rebuild a typed event from its dict form (the remote backend's SSE payloads)."""
    cls = EVENT_TYPES.get(data.get("type", ""), Event)
    names = {f.name for f in fields(cls)}
    # JSON has no tuples; frozen events keep their sequences as tuples
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in names})


async def wait_event(event: asyncio.Event, timeout: float | None) -> bool:
    """Wait for `event` at most `timeout` seconds; True if it was set.

    asyncio.wait, not wait_for: on Python 3.11 a cancelled wait_for around Event.wait was seen
    to hang, which froze shutdown."""
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait({waiter}, timeout=timeout)
    finally:
        waiter.cancel()
    return event.is_set()
