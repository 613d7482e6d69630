"""The response cache: exact-match answers to deterministic requests, replayed without decoding.

The cache itself runs on a fake clock (TTL, soft expiry, LRU); `LocalBackend` tests use tiny
random models and prove that a hit skips decoding by evicting the model first: a hit answers
without loading it, and no request reaches an engine. The HTTP tests drive a real
`corral serve` and its RemoteBackend.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from corral.backend.local import LocalBackend
from corral.backend.config import CacheSettings, settings_from_dict
from corral.backend.errors import BadRequest
from corral.backend.events import Event, EventBus, Notice, RequestFinished, RequestStarted, StateChanged
from corral.backend.generation import Chunk, SamplingParams
from corral.backend.metrics import Metrics
from corral.backend.remote import RemoteBackend
from corral.backend.respcache import (BYPASS, HIT, MISS, STALE, Answer, CacheKey, Lookup, ResponseCache,
                                      request_key)
from support import Server, start_server, tiny_settings, write_config

GREEDY = {"temperature": 0.0, "max_tokens": 6, "ignore_eos": True}
ANSWER = Answer("once upon", "stop", 3, 2)


class Clock:
    """A monotonic clock that moves only when told."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def key(prompt: str = "p", *, model: str = "m", fingerprint: str = "f1", kind: str = "completion",
        **params: Any) -> CacheKey:
    return request_key(model, fingerprint, kind, prompt, SamplingParams(**{"temperature": 0.0, **params}))


def make_cache(**settings: Any) -> tuple[ResponseCache, Clock]:
    clock = Clock()
    return ResponseCache(CacheSettings(**settings), clock=clock), clock


# -- what is deterministic, and what the key covers ------------------------------------------


@pytest.mark.parametrize(("params", "deterministic"), [
    ({"temperature": 0.0}, True),
    ({"temperature": 0.0, "seed": -1}, True),  # greedy ignores the seed
    ({"temperature": 0.7, "seed": 42}, True),
    ({"temperature": 0.7, "seed": 0}, True),
    ({"temperature": 0.7}, False),
    ({"temperature": 0.7, "seed": -1}, False),  # llama.cpp reads 0xFFFFFFFF as "a random seed"
    ({"temperature": 0.7, "seed": 0xFFFFFFFF}, False),
])
def test_deterministic_means_greedy_or_a_fixed_seed(params: dict[str, Any], deterministic: bool) -> None:
    assert SamplingParams(**params).deterministic is deterministic


def test_the_key_covers_prompt_kind_model_fingerprint_and_the_params_that_matter() -> None:
    base = key()
    differing = [key("q"), key(kind="chat"), key(model="n"), key(fingerprint="f2"), key(max_tokens=7),
                 key(stop=("x",)), key(ignore_eos=True), key(repeat_penalty=1.1)]
    assert len({base.digest, *(k.digest for k in differing)}) == len(differing) + 1
    # the greedy sampler never reads these, so requests differing only in them share an answer
    assert key(top_p=0.5, top_k=3, min_p=0.2, seed=9).digest == base.digest
    sampled = [key(temperature=0.7, seed=1), key(temperature=0.7, seed=2), key(temperature=0.8, seed=1),
               key(temperature=0.7, seed=1, top_p=0.5)]
    assert len({k.digest for k in sampled}) == len(sampled)


# -- the cache on a fake clock ---------------------------------------------------------------


def test_a_stored_answer_is_a_hit_until_ttl_then_a_miss() -> None:
    cache, clock = make_cache(ttl=60, soft_ttl=-1)
    k = key()
    assert cache.lookup(k).verdict == MISS
    assert cache.store(k, ANSWER)
    clock.now += 59
    assert cache.lookup(k).answer == ANSWER
    clock.now += 1
    assert cache.lookup(k).verdict == MISS
    stats = cache.stats()
    assert stats.entries == 0 and stats.bytes == 0 and stats.evictions == {"expired": 1}
    assert stats.lookups == {("m", MISS): 2, ("m", HIT): 1}


def test_answers_never_expire_with_ttl_minus_one() -> None:
    cache, clock = make_cache(ttl=-1)
    cache.lookup(key())
    cache.store(key(), ANSWER)
    clock.now += 10**9
    assert cache.lookup(key()).verdict == HIT


def test_soft_expiry_serves_a_stale_answer_once_until_it_is_refreshed() -> None:
    cache, clock = make_cache(ttl=100, soft_ttl=50)
    k = key()
    cache.lookup(k)
    cache.store(k, ANSWER)
    clock.now += 60
    assert cache.lookup(k) == Lookup(STALE, ANSWER)
    assert cache.lookup(k).verdict == MISS  # its one stale serve is spent: others decode meanwhile
    refreshed = Answer("twice upon", "stop", 3, 2)
    assert cache.store(k, refreshed)  # what the background refresh does
    assert cache.lookup(k) == Lookup(HIT, refreshed)
    clock.now += 49
    assert cache.lookup(k).verdict == HIT  # fresh again, counted from the refresh


def test_soft_ttl_defaults_to_four_fifths_of_ttl() -> None:
    assert CacheSettings(ttl=100).soft_seconds == 80
    assert CacheSettings(ttl=-1).soft_seconds is None and CacheSettings(ttl=-1).hard_seconds is None
    assert CacheSettings(ttl=100, soft_ttl=-1).soft_seconds is None


def test_least_recently_used_answers_go_beyond_max_entries() -> None:
    cache, _ = make_cache(max_entries=2)
    a, b, c = key("a"), key("b"), key("c")
    for k in (a, b):
        cache.lookup(k)
        cache.store(k, ANSWER)
    assert cache.lookup(a).verdict == HIT  # a is now more recent than b
    cache.store(c, ANSWER)
    assert [cache.lookup(k).verdict for k in (a, b, c)] == [HIT, MISS, HIT]
    assert cache.stats().evictions == {"capacity": 1}


def test_max_bytes_bounds_the_text_kept() -> None:
    cache, _ = make_cache(max_bytes=20)
    a, b, c = key("a"), key("b"), key("c")
    cache.lookup(a)
    assert cache.store(a, Answer("x" * 12, "length", 1, 12))
    assert cache.store(b, Answer("é" * 4, "stop", 1, 4))  # 8 bytes in UTF-8: both fit in 20
    assert cache.stats().bytes == 20
    assert not cache.store(c, Answer("y" * 21, "stop", 1, 21))  # alone larger than the limit
    cache.store(c, Answer("z" * 5, "stop", 1, 5))
    assert [cache.lookup(k).verdict for k in (a, b, c)] == [MISS, HIT, HIT]
    assert cache.stats().bytes == 13


def test_a_new_fingerprint_drops_the_models_old_answers_with_one_notice() -> None:
    bus = EventBus()
    cache = ResponseCache(CacheSettings(), bus=bus)
    old_a, old_b, other = key("a"), key("b"), key("a", model="n")
    for k in (old_a, old_b, other):
        cache.lookup(k)
        cache.store(k, ANSWER)
    new_a = key("a", fingerprint="f2")
    assert cache.lookup(new_a).verdict == MISS
    assert cache.lookup(other).verdict == HIT  # another model keeps its answers
    assert cache.stats().entries == 1 and cache.stats().evictions == {"invalidated": 2}
    assert not cache.store(old_b, ANSWER)  # a refresh that started under the old config
    notices = [e for e in bus.recent() if isinstance(e, Notice)]
    assert len(notices) == 1 and notices[0].model == "m" and "dropped 2" in notices[0].message


def test_invalidate_clear_and_reconfigure() -> None:
    cache, _ = make_cache()
    for name in ("a", "b", "c"):
        cache.lookup(key(name))
        cache.store(key(name), ANSWER)
    cache.lookup(key(model="n"))
    cache.store(key(model="n"), ANSWER)
    assert cache.invalidate("n") == 1 and cache.stats().entries == 3
    cache.configure(CacheSettings(max_entries=2))
    assert cache.stats().entries == 2
    cache.configure(CacheSettings(enabled=False))
    assert cache.stats().entries == 0 and not cache.store(key("a"), ANSWER)
    cache.configure(CacheSettings())
    cache.store(key("a"), ANSWER)
    assert cache.clear() == 1
    assert cache.stats().evictions == {"invalidated": 1, "capacity": 1, "cleared": 3}


def test_metrics_export_the_cache_and_skip_replayed_requests_in_model_timings() -> None:
    cache, _ = make_cache()
    cache.lookup(key())
    cache.store(key(), ANSWER)
    cache.lookup(key())
    metrics = Metrics()
    metrics.track_cache(cache.stats)
    metrics.observe(RequestFinished(model="m", finish_reason="stop", prompt_tokens=3, completion_tokens=2,
                                    ttft_s=0.0001, duration_s=0.0001, tokens_per_s=None, cached=True))
    samples = scrape(metrics.render(None).decode())
    assert samples["corral_cache_lookups_total"][(("model", "m"), ("result", "hit"))] == 1
    assert samples["corral_cache_lookups_total"][(("model", "m"), ("result", "miss"))] == 1
    assert samples["corral_cache_entries"][()] == 1 and samples["corral_cache_bytes"][()] == len("once upon")
    assert samples["corral_requests_total"][(("api", "python"), ("model", "m"), ("status", "stop"))] == 1
    assert (("model", "m"),) not in samples.get("corral_generated_tokens_total", {})
    assert (("model", "m"),) not in samples.get("corral_request_duration_seconds_count", {})


def scrape(text: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


# -- LocalBackend ----------------------------------------------------------------------------


def cache_settings(model_dir: Path, **cache: Any) -> Any:
    return settings_from_dict(tiny_settings(model_dir, cache=cache))


@pytest.fixture
def backend(model_dir: Path) -> Iterator[LocalBackend]:
    with LocalBackend(cache_settings(model_dir)) as local:
        yield local


async def complete(backend: Any, prompt: str = "Once upon a time", model: str = "tiny-a",
                   **options: Any) -> list[Chunk]:
    return [chunk async for chunk in backend.complete(model, prompt, **{**GREEDY, **options})]


def text(chunks: list[Chunk]) -> str:
    return "".join(c.text for c in chunks)


async def events_until(events: AsyncIterator[Event], done: Callable[[Event], bool]) -> list[Event]:
    """Events up to and including the first for which `done` holds."""
    seen: list[Event] = []

    async def read() -> None:
        async for event in events:
            seen.append(event)
            if done(event):
                return

    await asyncio.wait_for(read(), 10)
    return seen


async def test_a_hit_replays_the_answer_without_loading_or_decoding(backend: LocalBackend) -> None:
    decoded = await complete(backend)
    assert decoded[0].cache == MISS and decoded[-1].finish_reason == "length"
    assert decoded[-1].stats is not None and not decoded[-1].stats.cached
    await backend.evict("tiny-a")  # a decode would now have to load it again
    events = backend.events()
    replayed = await complete(backend, request_id="again")
    assert len(replayed) == 1 and replayed[0].cache == HIT
    assert text(replayed) == text(decoded) and replayed[0].finish_reason == decoded[-1].finish_reason
    stats = replayed[0].stats
    assert stats is not None and stats.cached and stats.completion_tokens == decoded[-1].stats.completion_tokens
    assert stats.ttft_s is not None and stats.duration_s < 0.5
    seen = await events_until(events, lambda e: isinstance(e, RequestFinished) and e.request_id == "again")
    assert not [e for e in seen if isinstance(e, (RequestStarted, StateChanged))]  # no load, no engine
    assert isinstance(seen[-1], RequestFinished) and seen[-1].cached and seen[-1].completion_tokens == 6
    assert {m.name: m.state for m in await backend.models()}["tiny-a"] == "available"


async def test_chat_hits_too_and_is_not_confused_with_a_completion(backend: LocalBackend) -> None:
    messages = [{"role": "user", "content": "Once upon a time"}]
    first = [c async for c in backend.chat("tiny-b", messages, **GREEDY)]
    again = [c async for c in backend.chat("tiny-b", messages, **GREEDY)]
    assert (first[0].cache, again[0].cache) == (MISS, HIT) and text(again) == text(first)
    assert (await complete(backend, "Once upon a time", model="tiny-b"))[0].cache == MISS


async def test_sampled_requests_never_touch_the_cache(backend: LocalBackend) -> None:
    for options in ({"temperature": 0.8}, {"temperature": 0.8, "seed": -1}):
        for _ in range(2):
            chunks = await complete(backend, **options)
            assert chunks[0].cache == BYPASS and not chunks[-1].stats.cached
    assert backend.response_cache.stats().lookups == {} and backend.response_cache.stats().entries == 0


async def test_a_fixed_seed_hits(backend: LocalBackend) -> None:
    first = await complete(backend, temperature=0.9, seed=42)
    again = await complete(backend, temperature=0.9, seed=42)
    assert (first[0].cache, again[0].cache) == (MISS, HIT) and text(again) == text(first)
    assert (await complete(backend, temperature=0.9, seed=43))[0].cache == MISS


async def test_cache_false_bypasses_it(backend: LocalBackend) -> None:
    await complete(backend)
    events = backend.events()
    bypassed = await complete(backend, cache=False, request_id="fresh")
    assert bypassed[0].cache == BYPASS and not bypassed[-1].stats.cached
    seen = await events_until(events, lambda e: isinstance(e, RequestFinished) and e.request_id == "fresh")
    assert any(isinstance(e, RequestStarted) and e.request_id == "fresh" for e in seen)  # it decoded
    assert backend.response_cache.stats().lookups == {("tiny-a", MISS): 1}
    with pytest.raises(BadRequest, match="cache = 'no'"):
        await complete(backend, cache="no")


async def test_another_prompt_or_parameter_misses(backend: LocalBackend) -> None:
    await complete(backend)
    for prompt, options in [("Once upon a tim", {}), ("Once upon a time", {"max_tokens": 5}),
                            ("Once upon a time", {"stop": ["zz"]}), ("Once upon a time", {"ignore_eos": False})]:
        assert (await complete(backend, prompt, **options))[0].cache == MISS, (prompt, options)
    assert (await complete(backend))[0].cache == HIT


async def test_a_changed_model_config_or_file_misses(backend: LocalBackend, model_dir: Path) -> None:
    first = await complete(backend)
    events = backend.events()
    backend.settings = settings_from_dict({**backend.settings.model_dump(mode="json"),
                                           "defaults": {"n_ctx": 512, "n_parallel": 2, "n_threads": 1}})
    assert (await complete(backend))[0].cache == MISS  # what a config reload does
    seen = await events_until(events, lambda e: isinstance(e, Notice))
    assert "dropped 1 answer" in seen[-1].message and seen[-1].model == "tiny-a"
    assert (await complete(backend))[0].cache == HIT
    path = model_dir / "tiny-a.gguf"
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))  # the file was replaced
    assert (await complete(backend))[0].cache == MISS
    assert text(first)


async def test_a_stale_answer_is_served_while_a_refresh_recomputes_it(backend: LocalBackend,
                                                                      model_dir: Path) -> None:
    clock = Clock()
    backend.settings = cache_settings(model_dir, ttl=100, soft_ttl=10)
    backend.response_cache = ResponseCache(backend.settings.cache, clock=clock, bus=backend.bus)
    first = await complete(backend)
    clock.now += 20
    events = backend.events()
    stale = await complete(backend, request_id="old")
    assert stale[0].cache == STALE and text(stale) == text(first) and stale[0].stats.cached
    seen = await events_until(events, lambda e: isinstance(e, RequestFinished) and e.request_id == "old.refresh")
    assert any(isinstance(e, RequestStarted) and e.request_id == "old.refresh" for e in seen)
    # the refresh stores its answer just after the engine announces the request finished
    await asyncio.gather(*(asyncio.wrap_future(f) for f in list(backend._refreshes)))
    clock.now += 5  # 25 s after the first answer, 5 s after the refresh: fresh
    again = await complete(backend)
    assert again[0].cache == HIT and text(again) == text(first)


async def test_only_finished_answers_are_kept(backend: LocalBackend) -> None:
    stream = backend.complete("tiny-a", "Once upon a time", temperature=0.0, max_tokens=200, ignore_eos=True)
    async for _ in stream:
        break  # the caller leaves: the request is cancelled, and its partial text is no answer
    await stream.aclose()
    assert backend.response_cache.stats().entries == 0
    assert (await complete(backend, max_tokens=200))[0].cache == MISS


def test_a_disabled_cache_is_bypassed(model_dir: Path) -> None:
    with LocalBackend(cache_settings(model_dir, enabled=False)) as local:
        for _ in range(2):
            chunks = list(local.sync.complete("tiny-a", "Once", **GREEDY))
            assert chunks[0].cache == BYPASS


# -- over HTTP -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    from ggufs import write_tiny_llama

    root = tmp_path_factory.mktemp("cache-server")
    for seed, name in enumerate(("tiny-a", "tiny-b")):
        write_tiny_llama(root / "models" / f"{name}.gguf", name=name, seed=seed)
    running = start_server(root, write_config(root / "corral.toml", tiny_settings(root / "models")))
    yield running
    assert running.stop() == 0, running.log()


def sse(response: httpx.Response) -> list[dict[str, Any]]:
    lines = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def test_http_whole_and_streamed_answers_hit_with_marker_and_header(server: Server) -> None:
    body = {"model": "tiny-a", "prompt": "The little house", **GREEDY}
    with server.http() as http:
        miss = http.post("/v1/completions", json=body)
        hit = http.post("/v1/completions", json=body)
        assert (miss.headers["x-corral-cache"], hit.headers["x-corral-cache"]) == (MISS, HIT)
        assert (miss.json()["corral"]["cache"], hit.json()["corral"]["cache"]) == (MISS, HIT)
        assert hit.json()["choices"] == miss.json()["choices"]
        usage = hit.json()["usage"]
        assert usage["completion_tokens"] == miss.json()["usage"]["completion_tokens"] == GREEDY["max_tokens"]
        assert usage["prompt_tokens_details"]["cached_tokens"] == usage["prompt_tokens"]  # nothing evaluated
        with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as streamed:
            assert streamed.headers["x-corral-cache"] == HIT
            pieces = sse(streamed)
        assert len(pieces) == 1  # the whole answer in one final chunk
        assert pieces[0]["choices"][0]["text"] == miss.json()["choices"][0]["text"]
        assert pieces[0]["choices"][0]["finish_reason"] == "length" and pieces[0]["corral"]["cache"] == HIT

        chat = {"model": "tiny-b", "messages": [{"role": "user", "content": "hello"}], **GREEDY}
        with http.stream("POST", "/v1/chat/completions", json={**chat, "stream": True}) as streamed:
            assert streamed.headers["x-corral-cache"] == MISS
            content = "".join(p["choices"][0]["delta"].get("content", "") for p in sse(streamed))
        whole = http.post("/v1/chat/completions", json=chat)
        assert whole.headers["x-corral-cache"] == HIT and whole.json()["choices"][0]["message"]["content"] == content

        assert http.post("/v1/completions", json={**body, "cache": False}).headers["x-corral-cache"] == BYPASS
        assert http.post("/v1/completions", json={**body, "temperature": 0.8}).headers["x-corral-cache"] == BYPASS
        refused = http.post("/v1/completions", json={**body, "cache": "no"})
        assert refused.status_code == 400 and "cache" in refused.json()["error"]["message"]

        samples = scrape(http.get("/metrics").text)
        lookups = samples["corral_cache_lookups_total"]
        assert lookups[(("model", "tiny-a"), ("result", "hit"))] >= 2
        assert lookups[(("model", "tiny-a"), ("result", "miss"))] >= 1
        assert samples["corral_cache_entries"][()] >= 2


async def test_remote_backend_passes_cache_through_and_reads_the_marker(server: Server) -> None:
    async with RemoteBackend(server.url) as remote:
        first = await complete(remote, "A red tree")
        again = await complete(remote, "A red tree")
        bypassed = await complete(remote, "A red tree", cache=False)
    assert (first[0].cache, again[0].cache, bypassed[0].cache) == (MISS, HIT, BYPASS)
    assert text(again) == text(first)
    assert again[-1].stats is not None and again[-1].stats.cached
    assert not first[-1].stats.cached and not bypassed[-1].stats.cached
