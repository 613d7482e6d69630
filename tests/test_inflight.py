"""Requests in flight: the engine's live list of running and queued requests, and cancelling one
by id (engine, LocalBackend and the Python API). The HTTP routes and each dialect's cancelled
answer are in test_requests_api.py."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from corral.backend.config import settings_from_dict
from corral.backend.errors import BadRequest, NotFound
from corral.backend.events import EventBus, RequestFinished
from corral.backend.generation import Decoding, SamplingParams
from corral.backend.inflight import RequestInfo
from corral.backend.local import LocalBackend
from support import SLOW_SHAPE, tiny_settings

LONG = Decoding(SamplingParams(temperature=0.0, max_tokens=4000, ignore_eos=True))  # seconds on the slow shape


async def test_running_and_queued_requests_are_listed_and_cancelled_by_id(engine_factory: Any) -> None:
    bus = EventBus()
    events = bus.subscribe()
    engine = engine_factory(n_ctx=4096, n_parallel=1, bus=bus, **SLOW_SHAPE)
    tokens = engine.weights.tokenize("Once upon a time", add_special=True)
    running = engine.stream(tokens, LONG, request_id="r-run", session_id="s-1", api="openai")
    first = await anext(running)
    assert first.finish_reason is None
    queued = engine.submit(tokens, LONG, request_id="r-wait", api="ollama")

    listed = engine.requests()
    assert [(r.request_id, r.state, r.queue_position) for r in listed] == [
        ("r-run", "running", None), ("r-wait", "queued", 1)]
    run, wait = listed
    assert (run.model, run.api, run.session_id, run.prompt_tokens) == ("engine", "openai", "s-1", len(tokens))
    assert run.tokens >= 1 and run.age_s > 0
    assert (wait.api, wait.tokens, wait.tokens_per_s) == ("ollama", 0, None)
    assert RequestInfo.from_dict(run.to_dict()) == run

    # A queued request ends at once, though the only slot is still busy.
    assert [r.state for r in engine.cancel_id("r-wait", "console")] == ["queued"]
    last = await asyncio.wait_for(queued.delivery.queue.get(), 5)
    assert last.finish_reason == "cancelled"
    assert [r.request_id for r in engine.requests()] == ["r-run"]

    assert [r.state for r in engine.cancel_id("r-run", "api")] == ["running"]
    assert engine.requests() == []  # a cancelled request is gone from the list at once
    chunks = [chunk async for chunk in running]
    assert chunks[-1].finish_reason == "cancelled" and chunks[-1].stats.completion_tokens < 4000
    assert engine.load().active == 0  # its slot was freed at the next step
    assert engine.cancel_id("r-run", "api") == [] and engine.cancel_id("never", "api") == []

    finished: dict[str, RequestFinished] = {}
    async for event in events:
        if isinstance(event, RequestFinished):
            finished[event.request_id or ""] = event
            if len(finished) == 2:
                break
    assert {k: (e.finish_reason, e.cancelled_by) for k, e in finished.items()} == {
        "r-wait": ("cancelled", "console"), "r-run": ("cancelled", "api")}


async def test_a_client_leaving_names_no_canceller(engine_factory: Any) -> None:
    bus = EventBus()
    events = bus.subscribe()
    engine = engine_factory(n_ctx=4096, n_parallel=1, bus=bus, **SLOW_SHAPE)
    stream = engine.stream(engine.weights.tokenize("Once", add_special=True), LONG, request_id="leaves")
    await anext(stream)
    await stream.aclose()
    event = await anext(e async for e in events if isinstance(e, RequestFinished))
    assert (event.finish_reason, event.cancelled_by) == ("cancelled", None)


@pytest.fixture
def backend(model_dir: Path) -> Any:
    with LocalBackend(settings_from_dict(tiny_settings(model_dir))) as local:
        yield local


def test_the_python_api_lists_and_refuses_clearly(backend: LocalBackend) -> None:
    assert backend.sync.requests() == []  # nothing loaded: nothing in flight
    backend.sync.load("tiny-a")
    assert backend.sync.requests() == []
    with pytest.raises(NotFound, match=r"no running or queued request has id 'nope'.*GET /api/requests"):
        backend.sync.cancel_request("nope")
    with pytest.raises(BadRequest, match="by = 'someone': must be one of api, console, python"):
        backend.sync.cancel_request("nope", by="someone")


async def test_the_python_api_cancels_a_running_request(tmp_path: Path, tiny_gguf: Any) -> None:
    slow = tiny_gguf("slow", **SLOW_SHAPE)
    settings = settings_from_dict(tiny_settings(tmp_path, models=[
        {"name": "slow", "path": str(slow), "n_ctx": 4096, "n_parallel": 1}]))
    async with LocalBackend(settings) as backend:
        stream = backend.complete("slow", "Once", max_tokens=4000, ignore_eos=True, temperature=0.0,
                                  request_id="py-1", api="python")
        await anext(stream)
        listed = await backend.requests()
        assert [(r.request_id, r.model, r.api, r.state) for r in listed] == [("py-1", "slow", "python", "running")]
        assert [r.request_id for r in await backend.cancel_request("py-1")] == ["py-1"]
        chunks = [chunk async for chunk in stream]
        assert chunks[-1].finish_reason == "cancelled"
        assert await backend.requests() == []
