"""The event bus: stamping, ordered fan-out, thread-safe publishing, drop accounting, replay, close.

Subscriptions are async generators, so they register on their first step. Most tests make
registration certain through the public API: publish a marker, subscribe with
`after_seq=marker.seq - 1`, and read the marker back from the replay ring (backlog and
registration are taken under one lock, so everything published afterwards arrives live).
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
from collections.abc import AsyncIterator

import pytest

from corral.backend import events as events_module
from corral.backend.events import (
    EVENT_TYPES,
    ConfigApplied,
    ConfigRejected,
    Dropped,
    Event,
    EventBus,
    LoadProgress,
    ModelLoaded,
    ModelRemoved,
    Notice,
    PinChanged,
    PullFailed,
    PullFinished,
    PullProgress,
    RequestFinished,
    RequestStarted,
    StateChanged,
    event_from_dict,
)

TIMEOUT = 5.0


def notice(message: str, **kw: object) -> Notice:
    return Notice(level="info", message=message, **kw)


async def registered(bus: EventBus, **kw: object) -> AsyncIterator[Event]:
    """A subscription that is certainly registered: its marker event has been read back."""
    marker = bus.publish(notice("marker"))
    agen = bus.subscribe(after_seq=marker.seq - 1, **kw)
    first = await asyncio.wait_for(agen.__anext__(), TIMEOUT)
    assert first == marker
    return agen


async def take(agen: AsyncIterator[Event], n: int) -> list[Event]:
    out: list[Event] = []

    async def run() -> None:
        while len(out) < n:
            out.append(await agen.__anext__())

    await asyncio.wait_for(run(), TIMEOUT)
    return out


async def read_until(agen: AsyncIterator[Event], end: Event) -> list[Event]:
    """Everything the subscription yields before `end` (which is not included)."""
    out: list[Event] = []

    async def run() -> None:
        while True:
            event = await agen.__anext__()
            if event == end:
                return
            out.append(event)

    await asyncio.wait_for(run(), TIMEOUT)
    return out


# --- stamping -------------------------------------------------------------------------------


def test_publish_stamps_increasing_seq_and_ts() -> None:
    bus = EventBus()
    before = time.time()
    stamped = [bus.publish(notice(f"n{i}")) for i in range(20)]
    after = time.time()
    seqs = [e.seq for e in stamped]
    assert seqs == list(range(seqs[0], seqs[0] + 20))
    assert seqs[0] >= 1
    timestamps = [e.ts for e in stamped]
    assert timestamps == sorted(timestamps)
    assert all(before <= ts <= after for ts in timestamps)


def test_publish_returns_a_stamped_copy_and_keeps_fields() -> None:
    bus = EventBus()
    original = StateChanged(model="m", request_id="r", session_id="s", old="available", new="loading",
                            reason="auto-load")
    stamped = bus.publish(original)
    assert original.seq == 0 and original.ts == 0.0  # frozen input untouched
    assert stamped.seq == 1 and stamped.ts > 0
    assert (stamped.model, stamped.request_id, stamped.session_id) == ("m", "r", "s")
    assert (stamped.old, stamped.new, stamped.reason) == ("available", "loading", "auto-load")
    assert type(stamped) is StateChanged


def test_publish_ignores_a_seq_set_by_the_caller() -> None:
    bus = EventBus()
    first = bus.publish(notice("a", seq=999, ts=1.0))
    second = bus.publish(notice("b"))
    assert first.seq == 1 and second.seq == 2
    assert first.ts > 1.0


def test_recent_returns_ring_after_seq() -> None:
    bus = EventBus(replay_size=5)
    stamped = [bus.publish(notice(str(i))) for i in range(8)]
    assert bus.recent() == stamped[-5:]
    assert bus.recent(after_seq=stamped[5].seq) == stamped[6:]
    assert bus.recent(after_seq=stamped[-1].seq) == []


# --- live delivery --------------------------------------------------------------------------


async def test_plain_subscribe_receives_live_events_in_order() -> None:
    bus = EventBus()
    received: list[Event] = []

    async def consume() -> None:
        async for event in bus.subscribe():
            received.append(event)
            if len(received) == 50:
                return

    task = asyncio.create_task(consume())
    await asyncio.sleep(0)  # one loop turn: the consumer's first step registers the subscription
    published = [bus.publish(notice(f"n{i}", model="m")) for i in range(50)]
    await asyncio.wait_for(task, TIMEOUT)
    assert received == published


async def test_subscriber_receives_events_published_while_it_is_reading() -> None:
    bus = EventBus()
    agen = await registered(bus)
    got: list[Event] = []
    published: list[Event] = []
    for round_ in range(5):
        published += [bus.publish(LoadProgress(model="m", percent=round_ * 10 + i)) for i in range(10)]
        got += await take(agen, 10)
    assert got == published
    assert [e.seq for e in got] == sorted(e.seq for e in got)
    await agen.aclose()


async def test_two_subscribers_on_one_loop_each_get_everything() -> None:
    bus = EventBus()
    a = await registered(bus)
    b = await registered(bus)  # its marker reaches `a` live
    published = [bus.publish(notice(str(i))) for i in range(30)]
    got_a = await take(a, 31)
    assert got_a[0].type == "notice" and got_a[0].message == "marker"
    assert got_a[1:] == published
    assert await take(b, 30) == published


async def test_closing_a_subscription_unregisters_it() -> None:
    bus = EventBus(subscriber_limit=2)
    agen = await registered(bus)
    await agen.aclose()
    # A gone subscriber must not keep receiving (nothing to assert on it), and a new one works.
    other = await registered(bus)
    published = [bus.publish(notice(str(i))) for i in range(2)]
    assert await take(other, 2) == published
    assert len(bus._subscribers) == 1  # white-box: the closed one was removed


# --- threads --------------------------------------------------------------------------------


async def _threaded_round(threads: int, per_thread: int) -> tuple[list[Event], list[Event]]:
    """Publish from `threads` threads at once; return (received, published)."""
    bus = EventBus(replay_size=threads * per_thread + 10, subscriber_limit=threads * per_thread + 10)
    agen = await registered(bus)
    barrier = threading.Barrier(threads)
    published: list[list[Event]] = [[] for _ in range(threads)]

    def work(t: int) -> None:
        barrier.wait(TIMEOUT)
        for i in range(per_thread):
            published[t].append(bus.publish(notice(f"{t}:{i}", model=f"t{t}")))

    workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    await asyncio.wait_for(asyncio.to_thread(lambda: [w.join() for w in workers]), TIMEOUT)
    end = bus.publish(notice("end"))
    received = await read_until(agen, end)
    await agen.aclose()
    return received, [e for chunk in published for e in chunk]


async def test_publishing_from_threads_stamps_unique_seqs() -> None:
    received, published = await _threaded_round(4, 200)
    seqs = sorted(e.seq for e in published)
    assert len(set(seqs)) == 800
    assert seqs == list(range(seqs[0], seqs[0] + 800))
    # each thread sees its own events in increasing seq order
    for t in range(4):
        own = [e.seq for e in published if e.model == f"t{t}"]
        assert own == sorted(own)


async def test_publishing_from_threads_delivers_every_event_exactly_once_in_seq_order() -> None:
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # make thread interleavings frequent; the loss is otherwise rare
    try:
        for _ in range(50):
            received, published = await _threaded_round(4, 200)
            assert [e.seq for e in received] == sorted(e.seq for e in received)
            assert len(received) == len({e.seq for e in received})
            assert received == sorted(published, key=lambda e: e.seq)
    finally:
        sys.setswitchinterval(previous)


async def test_event_overtaken_in_delivery_by_a_later_one_is_not_lost(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reproduces deterministically the interleaving behind the threaded loss.

    Thread A is held after publish() stamped its event but before it hands it to the
    subscriber's loop; meanwhile B publishes (seq + 1) and is delivered first.
    """
    bus = EventBus()
    agen = await registered(bus)
    a_held = threading.Event()
    b_done = threading.Event()
    original = events_module._call_soon

    def held_call_soon(loop: asyncio.AbstractEventLoop, fn: object, *args: object) -> None:
        if threading.current_thread().name == "publisher-a":
            a_held.set()
            b_done.wait(0.3)  # B cannot publish while A delivers: this always times out
        original(loop, fn, *args)

    monkeypatch.setattr(events_module, "_call_soon", held_call_soon)
    stamped: dict[str, Event] = {}
    a = threading.Thread(name="publisher-a", target=lambda: stamped.setdefault("a", bus.publish(notice("A"))))
    a.start()
    assert await asyncio.to_thread(a_held.wait, TIMEOUT)
    stamped["b"] = await asyncio.to_thread(bus.publish, notice("B"))
    b_done.set()
    await asyncio.to_thread(a.join, TIMEOUT)
    assert stamped["a"].seq < stamped["b"].seq
    end = bus.publish(notice("end"))
    received = await read_until(agen, end)
    assert received == [stamped["a"], stamped["b"]]


async def test_subscribers_on_two_event_loops_both_receive() -> None:
    bus = EventBus()
    local = await registered(bus)
    first = bus.publish(notice("first"))
    ready = threading.Event()
    result: dict[str, object] = {}

    async def thread_consumer() -> list[Event]:
        got: list[Event] = []
        async for event in bus.subscribe(after_seq=first.seq - 1):
            got.append(event)
            if event == first:
                ready.set()  # registered on this loop (the marker came from the ring)
            if event.type == "notice" and event.message == "end":
                return got
        return got

    def run_thread() -> None:
        try:
            result["events"] = asyncio.run(asyncio.wait_for(thread_consumer(), TIMEOUT))
        except BaseException as exc:  # reported by the assertion below
            result["error"] = exc

    thread = threading.Thread(target=run_thread, name="other-loop")
    thread.start()
    assert await asyncio.to_thread(ready.wait, TIMEOUT)
    published = [bus.publish(RequestStarted(model="m", request_id=f"r{i}", prompt_tokens=i, queue_wait_s=0.0))
                 for i in range(20)]
    end = bus.publish(notice("end"))
    await asyncio.to_thread(thread.join, TIMEOUT)
    assert not thread.is_alive()
    assert "error" not in result, result.get("error")
    assert await read_until(local, end) == [first, *published]
    assert result["events"] == [first, *published, end]


# --- slow subscribers -----------------------------------------------------------------------


async def test_slow_subscriber_gets_dropped_count_then_newest_events() -> None:
    bus = EventBus(subscriber_limit=5)
    agen = await registered(bus)
    published = [bus.publish(notice(str(i))) for i in range(20)]
    got = await take(agen, 6)
    assert isinstance(got[0], Dropped)
    assert got[0].count == 15
    assert got[1:] == published[-5:]
    # and it carries on normally afterwards
    later = [bus.publish(notice(f"later{i}")) for i in range(3)]
    assert await take(agen, 3) == later


async def test_slow_subscriber_does_not_block_a_fast_one() -> None:
    bus = EventBus(subscriber_limit=3)
    slow = await registered(bus)
    fast = await registered(bus)
    published = []
    for i in range(9):
        published.append(bus.publish(notice(str(i))))
        assert await take(fast, 1) == [published[-1]]
    got = await take(slow, 4)
    # slow had 10 unread events (fast's marker and 9 notices) and room for 3
    assert isinstance(got[0], Dropped) and got[0].count == 7
    assert got[1:] == published[-3:]


async def test_no_dropped_event_when_the_subscriber_keeps_up() -> None:
    bus = EventBus(subscriber_limit=4)
    agen = await registered(bus)
    got: list[Event] = []
    for i in range(12):
        bus.publish(notice(str(i)))
        got += await take(agen, 1)
    assert not any(isinstance(e, Dropped) for e in got)
    assert len(got) == 12


# --- replay ---------------------------------------------------------------------------------


async def test_subscribe_after_seq_replays_only_later_events() -> None:
    bus = EventBus()
    published = [bus.publish(notice(str(i))) for i in range(10)]
    agen = bus.subscribe(after_seq=published[3].seq)
    assert await take(agen, 6) == published[4:]
    newer = bus.publish(notice("new"))
    assert await take(agen, 1) == [newer]


async def test_subscribe_after_seq_zero_replays_the_whole_ring() -> None:
    bus = EventBus()
    published = [bus.publish(notice(str(i))) for i in range(5)]
    agen = bus.subscribe(after_seq=0)
    got = await take(agen, 5)
    assert got == published
    assert not any(isinstance(e, Dropped) for e in got)


async def test_replay_has_no_gaps_or_duplicates_with_events_arriving_meanwhile() -> None:
    bus = EventBus()
    published = [bus.publish(notice(str(i))) for i in range(10)]
    agen = bus.subscribe(after_seq=published[4].seq)
    got = await take(agen, 1)  # registered; the backlog (5..9) is being replayed
    published += [bus.publish(notice(f"live{i}")) for i in range(5)]
    end = bus.publish(notice("end"))
    got += await read_until(agen, end)
    assert got == published[5:]


async def test_replay_with_a_concurrent_publisher_thread() -> None:
    bus = EventBus(replay_size=2000, subscriber_limit=2000)
    start = [bus.publish(notice(f"s{i}")) for i in range(50)]
    stop = threading.Event()
    live: list[Event] = []

    def publisher() -> None:
        while not stop.is_set() and len(live) < 1000:
            live.append(bus.publish(notice("live")))

    thread = threading.Thread(target=publisher)
    thread.start()
    try:
        agen = bus.subscribe(after_seq=start[19].seq)
        got = await take(agen, 40)
    finally:
        stop.set()
        await asyncio.to_thread(thread.join, TIMEOUT)
    end = bus.publish(notice("end"))
    got += await read_until(agen, end)
    seqs = [e.seq for e in got]
    assert len(seqs) == len(set(seqs)), "duplicates"
    assert seqs == sorted(seqs)
    assert got[:30] == start[20:]
    expected = start[20:] + live
    # Everything published after the requested seq arrives (one publisher thread: no overtaking).
    assert got == expected


async def test_after_seq_older_than_the_ring_starts_with_dropped() -> None:
    bus = EventBus(replay_size=5)
    published = [bus.publish(notice(str(i))) for i in range(10)]  # ring holds seqs 6..10
    agen = bus.subscribe(after_seq=published[1].seq)  # wants 3..10; 3, 4, 5 are gone
    got = await take(agen, 6)
    assert isinstance(got[0], Dropped)
    assert got[0].count == 3
    assert got[1:] == published[5:]


async def test_after_seq_just_before_the_ring_has_no_dropped() -> None:
    bus = EventBus(replay_size=5)
    published = [bus.publish(notice(str(i))) for i in range(10)]
    agen = bus.subscribe(after_seq=published[4].seq)  # the ring starts right after it
    assert await take(agen, 5) == published[5:]


async def test_after_seq_at_the_newest_event_waits_for_new_ones() -> None:
    bus = EventBus()
    published = [bus.publish(notice(str(i))) for i in range(3)]
    agen = bus.subscribe(after_seq=published[-1].seq)
    nxt = asyncio.ensure_future(agen.__anext__())
    await asyncio.sleep(0)
    assert not nxt.done()
    newer = bus.publish(notice("new"))
    assert await asyncio.wait_for(nxt, TIMEOUT) == newer


# --- close ----------------------------------------------------------------------------------


async def test_close_ends_a_waiting_subscription() -> None:
    bus = EventBus()
    agen = await registered(bus)
    nxt = asyncio.ensure_future(agen.__anext__())
    await asyncio.sleep(0)
    assert not nxt.done()
    bus.close()
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(nxt, TIMEOUT)


async def test_close_ends_async_for_loops_on_every_loop() -> None:
    bus = EventBus()
    local = await registered(bus)
    ready = threading.Event()
    outcome: dict[str, object] = {}

    async def remote() -> int:
        count = 0
        async for _ in bus.subscribe(after_seq=0):
            count += 1
            ready.set()
        return count

    def run_thread() -> None:
        try:
            outcome["count"] = asyncio.run(asyncio.wait_for(remote(), TIMEOUT))
        except BaseException as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=run_thread)
    thread.start()
    assert await asyncio.to_thread(ready.wait, TIMEOUT)

    async def drain() -> int:
        return len([e async for e in local])

    task = asyncio.create_task(drain())
    await asyncio.sleep(0)
    bus.close()
    assert await asyncio.wait_for(task, TIMEOUT) == 0
    await asyncio.to_thread(thread.join, TIMEOUT)
    assert not thread.is_alive()
    assert "error" not in outcome, outcome.get("error")
    assert outcome["count"] == 1


async def test_events_published_before_close_are_delivered() -> None:
    bus = EventBus()
    agen = await registered(bus)
    last = bus.publish(Notice(level="warning", message="shutting down"))
    bus.close()
    got = await asyncio.wait_for(_collect(agen), TIMEOUT)
    assert got == [last]


async def test_subscription_first_read_after_close_ends() -> None:
    bus = EventBus()
    agen = bus.subscribe()
    bus.close()
    assert await asyncio.wait_for(_collect(agen), 1.0) == []


async def _collect(agen: AsyncIterator[Event]) -> list[Event]:
    return [e async for e in agen]


# --- dict form ------------------------------------------------------------------------------

SAMPLES: dict[str, Event] = {
    "state": StateChanged(old="ready", new="unloading", reason="evicted"),
    "load_progress": LoadProgress(percent=42),
    "loaded": ModelLoaded(seconds=1.25, estimate_bytes=300_000_000, measured_bytes=290_123_456),
    "pin": PinChanged(pinned=True),
    "request_started": RequestStarted(prompt_tokens=12, queue_wait_s=0.5),
    "request_finished": RequestFinished(finish_reason="length", prompt_tokens=12, completion_tokens=64,
                                        ttft_s=0.05, duration_s=1.5, tokens_per_s=42.5, error=None),
    "notice": Notice(level="error", message="refused: needs 3 GB, 1 GB free"),
    "config_applied": ConfigApplied(version=4, source="file change", diff=("defaults.keep_alive: 300.0 → 60.0",),
                                    actions=("tiny: keep_alive 300 s → 60 s",)),
    "config_rejected": ConfigRejected(source="signal", error="corral.toml: not valid TOML"),
    "pull_progress": PullProgress(pull_id="0123456789ab", source="hf://owner/repo:Q4_K_M", percent=42,
                                  completed=420, total=1000),
    "pull_finished": PullFinished(pull_id="0123456789ab", source="https://host/m.gguf", files=("/models/m.gguf",),
                                  size=1000, sha256=("ab" * 32,)),
    "pull_failed": PullFailed(pull_id="0123456789ab", source="https://host/m.gguf", error="cancelled",
                              cancelled=True, partial="/models/.m.gguf.0123.partial"),
    "removed": ModelRemoved(files=("/models/m-00001-of-00002.gguf", "/models/m-00002-of-00002.gguf")),
    "dropped": Dropped(count=7),
}


def test_samples_cover_every_event_type() -> None:
    assert set(SAMPLES) == set(EVENT_TYPES)
    for name, sample in SAMPLES.items():
        assert EVENT_TYPES[name] is type(sample)
        assert sample.type == name


@pytest.mark.parametrize("type_name", sorted(SAMPLES))
def test_dict_round_trip(type_name: str) -> None:
    bus = EventBus()
    event = bus.publish(SAMPLES[type_name].__class__(
        **{**_fields(SAMPLES[type_name]), "model": "gemma", "request_id": "req-1", "session_id": "sess-1"}))
    data = event.to_dict()
    assert data["type"] == type_name
    assert data["seq"] == event.seq and data["ts"] == event.ts
    assert data["model"] == "gemma" and data["request_id"] == "req-1" and data["session_id"] == "sess-1"
    # through JSON, as the SSE stream carries it
    rebuilt = event_from_dict(json.loads(json.dumps(data)))
    assert type(rebuilt) is type(event)
    assert rebuilt == event


def test_request_finished_round_trips_none_fields_and_error() -> None:
    event = RequestFinished(seq=3, ts=1.5, finish_reason="error", prompt_tokens=1, completion_tokens=0,
                            ttft_s=None, duration_s=0.1, tokens_per_s=None, error="boom")
    assert event_from_dict(event.to_dict()) == event


def test_event_from_dict_ignores_unknown_keys_and_falls_back_to_base_event() -> None:
    data = {**SAMPLES["pin"].to_dict(), "future_field": 1}
    assert event_from_dict(data) == SAMPLES["pin"]
    base = event_from_dict({"type": "something_new", "seq": 5, "ts": 2.0, "model": "m", "extra": 1})
    assert type(base) is Event
    assert (base.seq, base.ts, base.model) == (5, 2.0, "m")


def _fields(event: Event) -> dict[str, object]:
    data = event.to_dict()
    data.pop("type")
    return data


async def test_a_resume_number_from_an_earlier_process_replays_the_ring() -> None:
    bus = EventBus()
    first = bus.publish(Notice(level="info", message="after restart"))
    sub = bus.subscribe(after_seq=5000)  # the client saw seq 5000 from the previous server
    assert await asyncio.wait_for(sub.__anext__(), 1.0) == first
