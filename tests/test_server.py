"""`corral serve` end to end: a real server process on 127.0.0.1, driven over HTTP with httpx
and with the official `openai` client, plus a few in-process checks of states a subprocess
cannot show reliably (health while starting and draining, an unexpected exception).

Requests that must still be running when something happens (a client leaving, a full queue,
SIGTERM) use a larger random model ("slow": 8 layers, 512 wide, ~300 tokens/s on 2 cores)
with `ignore_eos` and a large `max_tokens`; nothing in the engine is slowed down for tests.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

from corral.backend.server import create_app
from corral.console.cli import exposure_warning
from support import (HELLO, SLOW, TINY, Server, StubBackend, assert_error, assert_idle, model_state,
                     replayed_events, slow_config, start_server, wait_for)

LONG = {"max_tokens": 4000, "ignore_eos": True}  # ~13 s on the slow model: always still running


@pytest.fixture
def http(server: Server) -> Iterator[httpx.Client]:
    with server.http() as client:
        yield client


@pytest.fixture
def oai(server: Server) -> openai.OpenAI:
    return server.openai()


def post(http: httpx.Client, path: str, body: Any, **kw: Any) -> httpx.Response:
    return http.post(path, json=body, **kw)


def finished_event(http: httpx.Client, request_id: str) -> dict[str, Any] | None:
    return next((e for e in replayed_events(http) if e["type"] == "request_finished"
                 and e["request_id"] == request_id), None)


# -- serving ---------------------------------------------------------------------------------


def test_announces_itself_and_reports_health(server: Server, http: httpx.Client) -> None:
    assert re.fullmatch(r"corral serve: listening on http://127\.0\.0\.1:\d+ \(4 models\)\n",
                        server.stdout.read_text())
    response = http.get("/health")
    assert response.status_code == 200 and response.json() == {"status": "ok"}
    assert re.fullmatch(r"[0-9a-f]{32}", response.headers["x-request-id"])


def test_models_lists_usable_models(oai: openai.OpenAI) -> None:
    listed = oai.models.list().data
    assert sorted(m.id for m in listed) == [SLOW, *TINY]
    assert {m.owned_by for m in listed} == {"corral"} and {m.object for m in listed} == {"model"}


def test_chat_streamed_and_whole_agree(oai: openai.OpenAI) -> None:
    options: dict[str, Any] = dict(model="tiny-a", messages=HELLO, max_tokens=8, temperature=0,
                                   extra_body={"ignore_eos": True})
    whole = oai.chat.completions.create(**options)
    choice = whole.choices[0]
    assert choice.finish_reason == "length" and choice.message.role == "assistant" and choice.message.content
    assert whole.usage is not None and whole.usage.completion_tokens == 8 and whole.usage.prompt_tokens > 0
    assert whole.object == "chat.completion" and whole.model == "tiny-a" and whole.id.startswith("chatcmpl-")
    stats = whole.model_extra["corral"]
    assert stats["ttft_s"] > 0 and stats["duration_s"] >= stats["ttft_s"] and stats["request_id"] in whole.id

    chunks = list(oai.chat.completions.create(stream=True, stream_options={"include_usage": True}, **options))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    assert chunks[-1].choices[0].finish_reason == "length"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 8
    assert len({c.id for c in chunks}) == 1 and chunks[0].object == "chat.completion.chunk"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == choice.message.content


def test_a_follow_up_turn_reuses_the_cached_prompt(oai: openai.OpenAI, http: httpx.Client) -> None:
    """Multi-turn chat: the second turn's prompt extends the first, so its KV is reused."""
    session = {"extra_headers": {"X-Session-Id": "reuse-1"}, "max_tokens": 6, "temperature": 0}
    turn = [{"role": "system", "content": "You answer in one short line, always politely."}, *HELLO]
    first = oai.chat.completions.create(model="tiny-b", messages=turn, **session)
    turn += [{"role": "assistant", "content": first.choices[0].message.content},
             {"role": "user", "content": "And again?"}]
    second = oai.chat.completions.create(model="tiny-b", messages=turn, **session)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= first.usage.prompt_tokens - 2 and cached < second.usage.prompt_tokens

    def counted() -> float | None:
        for family in text_string_to_metric_families(http.get("/metrics").text):
            for sample in family.samples:
                if sample.name == "corral_prompt_tokens_cached_total" and sample.labels == {"model": "tiny-b"}:
                    return sample.value if sample.value >= cached else None
        return None

    wait_for(counted, what="the cached prompt tokens counter")


def test_completions_streamed_and_whole(oai: openai.OpenAI) -> None:
    options: dict[str, Any] = dict(model="tiny-b", prompt="Once upon a time", max_tokens=6, temperature=0,
                                   extra_body={"ignore_eos": True})
    whole = oai.completions.create(**options)
    assert whole.object == "text_completion" and whole.choices[0].finish_reason == "length"
    assert whole.usage is not None and whole.usage.completion_tokens == 6
    chunks = list(oai.completions.create(stream=True, **options))
    assert chunks[-1].choices[0].finish_reason == "length"
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    listed = oai.completions.create(**{**options, "prompt": ["Once upon a time"]})  # a list of one prompt
    assert listed.choices[0].text == whole.choices[0].text


def test_embeddings(oai: openai.OpenAI, http: httpx.Client) -> None:
    # The openai client asks for base64 unless told otherwise: both encodings must agree.
    result = oai.embeddings.create(model="tiny-c", input=["the cat", "a dog ran"])
    assert [d.index for d in result.data] == [0, 1] and result.model == "tiny-c"
    vectors = [d.embedding for d in result.data]
    assert len(vectors[0]) == 64 and all(abs(math.hypot(*v) - 1) < 1e-3 for v in vectors)
    assert result.usage.prompt_tokens > 0 and result.usage.total_tokens == result.usage.prompt_tokens
    floats = post(http, "/v1/embeddings", {"model": "tiny-c", "input": "the cat"}).json()
    assert floats["object"] == "list" and floats["data"][0]["object"] == "embedding"
    assert floats["data"][0]["embedding"] == pytest.approx(vectors[0], abs=1e-6)
    raw = post(http, "/v1/embeddings", {"model": "tiny-c", "input": "the cat", "encoding_format": "base64"}).json()
    packed = base64.b64decode(raw["data"][0]["embedding"])
    assert list(struct.unpack(f"<{len(packed) // 4}f", packed)) == pytest.approx(vectors[0], abs=1e-6)


def test_request_and_session_ids(http: httpx.Client) -> None:
    body = {"model": "tiny-a", "messages": HELLO, "max_tokens": 2}
    response = post(http, "/v1/chat/completions", body, headers={"x-request-id": "req-42", "x-session-id": "sess-7"})
    assert response.headers["x-request-id"] == "req-42" and response.headers["x-session-id"] == "sess-7"
    data = response.json()
    assert data["id"] == "chatcmpl-req-42"
    assert data["corral"]["request_id"] == "req-42" and data["corral"]["session_id"] == "sess-7"
    generated = post(http, "/v1/chat/completions", body)
    assert re.fullmatch(r"[0-9a-f]{32}", generated.headers["x-request-id"]) and "x-session-id" not in generated.headers
    # An id that cannot be echoed safely (spaces, newlines, 300 chars) is replaced, not reflected.
    refused = http.get("/api/ps", headers={"x-session-id": "bad id " + "x" * 300})
    assert refused.status_code == 400 and "x-session-id" in refused.json()["error"]["message"]
    assert re.fullmatch(r"[0-9a-f]{32}", refused.headers["x-request-id"])
    error = post(http, "/v1/chat/completions", {**body, "model": "nope"}, headers={"x-request-id": "req-43"})
    assert error.json()["error"]["request_id"] == "req-43" and error.headers["x-request-id"] == "req-43"


BAD_REQUESTS: list[tuple[str, str, Any, str]] = [
    ("malformed JSON", "/v1/chat/completions", b'{"model": "tiny-a", "messages": [', "not valid JSON"),
    ("not an object", "/v1/chat/completions", b"[1, 2]", "JSON object"),
    ("empty body", "/v1/chat/completions", b"", "required"),
    ("not UTF-8", "/v1/completions", b"\xff\xfe{}", "UTF-8"),
    ("missing model", "/v1/chat/completions", {"messages": HELLO}, "model"),
    ("empty messages", "/v1/chat/completions", {"model": "tiny-a", "messages": []}, "messages"),
    ("negative max_tokens", "/v1/chat/completions", {"model": "tiny-a", "messages": HELLO, "max_tokens": -5},
     "max_tokens"),
    ("huge max_tokens", "/v1/completions", {"model": "tiny-a", "prompt": "x", "max_tokens": 1 << 21}, "max_tokens"),
    ("string max_tokens", "/v1/chat/completions", {"model": "tiny-a", "messages": HELLO, "max_tokens": "10"},
     "max_tokens"),
    ("bool max_tokens", "/v1/completions", {"model": "tiny-a", "prompt": "x", "max_tokens": True}, "max_tokens"),
    ("string temperature", "/v1/chat/completions", {"model": "tiny-a", "messages": HELLO, "temperature": "hot"},
     "temperature"),
    ("NaN top_p", "/v1/completions", b'{"model": "tiny-a", "prompt": "x", "top_p": NaN}', "top_p"),
    ("unknown role", "/v1/chat/completions", {"model": "tiny-a", "messages": [{"role": "wizard", "content": "hi"}]},
     "messages[0].role"),
    ("numeric content", "/v1/chat/completions", {"model": "tiny-a", "messages": [{"role": "user", "content": 5}]},
     "messages[0].content"),
    ("image part", "/v1/chat/completions", {"model": "tiny-a", "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages[0].content"),
    ("messages not a list", "/v1/chat/completions", {"model": "tiny-a", "messages": "hi"}, "messages"),
    ("string stream", "/v1/chat/completions", {"model": "tiny-a", "messages": HELLO, "stream": "yes"}, "stream"),
    ("bad stop", "/v1/chat/completions", {"model": "tiny-a", "messages": HELLO, "stop": [1]}, "stop[0]"),
    ("too many stops", "/v1/completions", {"model": "tiny-a", "prompt": "x", "stop": ["a"] * 17}, "stop"),
    ("bad keep_alive", "/v1/completions", {"model": "tiny-a", "prompt": "x", "keep_alive": "soon"}, "keep_alive"),
    ("n above 1", "/v1/chat/completions", {"model": "tiny-a", "messages": HELLO, "n": 2}, "n"),
    ("two prompts", "/v1/completions", {"model": "tiny-a", "prompt": ["a", "b"]}, "prompt"),
    ("no prompt", "/v1/completions", {"model": "tiny-a"}, "prompt"),
    ("empty input", "/v1/embeddings", {"model": "tiny-a", "input": []}, "input"),
    ("token input", "/v1/embeddings", {"model": "tiny-a", "input": [1, 2]}, "input[0]"),
    ("bad encoding", "/v1/embeddings", {"model": "tiny-a", "input": "x", "encoding_format": "hex"},
     "encoding_format"),
    ("wrong dimensions", "/v1/embeddings", {"model": "tiny-a", "input": "x", "dimensions": 3}, "dimensions"),
    ("lone surrogate", "/v1/completions", b'{"model": "tiny-a", "prompt": "a\\ud800b"}', "body.prompt"),
    ("surrogate in a message", "/v1/chat/completions",
     b'{"model": "tiny-a", "messages": [{"role": "user", "content": "\\udfff"}]}', "lone surrogate"),
    ("deeply nested", "/v1/completions", b'{"a":' * 10000 + b"1" + b"}" * 10000, "nested too deeply"),
    ("5000-digit integer", "/v1/completions", b'{"model": "tiny-a", "prompt": "x", "max_tokens": ' + b"9" * 5000
     + b"}", "JSON parsing refused"),
]


@pytest.mark.parametrize("path, body, mentions", [case[1:] for case in BAD_REQUESTS],
                         ids=[case[0] for case in BAD_REQUESTS])
def test_bad_input_is_a_400_naming_the_field(http: httpx.Client, path: str, body: Any, mentions: str) -> None:
    if isinstance(body, bytes):
        response = http.post(path, content=body, headers={"content-type": "application/json"})
    else:
        response = post(http, path, body)
    assert_error(response, 400, "invalid_request", mentions)


def test_bad_queries_and_routes_are_json_errors(http: httpx.Client) -> None:
    assert_error(http.post("/api/models/tiny-a/evict", params={"force": "maybe"}), 400, "invalid_request", "force")
    assert_error(http.get("/api/events", params={"after": -1}), 400, "invalid_request", "after")
    assert_error(http.get("/api/events", headers={"last-event-id": "x"}), 400, "invalid_request", "Last-Event-ID")
    assert_error(http.get("/api/events", headers={"last-event-id": "\u00b2".encode("latin-1")}), 400,
                 "invalid_request", "Last-Event-ID")  # '²' passes str.isdigit but is no number
    assert_error(http.post("/v1/completions/", json={}), 404, "not_found")  # no redirect around auth
    assert_error(http.get("/v2/nothing"), 404, "not_found", "/v2/nothing")
    assert_error(http.delete("/v1/models"), 405, "method_not_allowed")


def test_oversized_body_is_a_413(server: Server, http: httpx.Client) -> None:
    # A declared length over the limit is refused before any of the body is read (so the test
    # sends none: the server answers and closes without waiting for it).
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 9437184\r\n\r\n")
        reply = b""
        while b"}}" not in reply and (data := sock.recv(65536)):
            reply += data
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413") and b"x-request-id" in head.lower()
    assert json.loads(body)["error"]["code"] == "request_too_large"

    def chunked() -> Iterator[bytes]:  # no Content-Length: the limit applies while the body streams in
        yield b'{"model": "tiny-a", "prompt": "'
        for _ in range(8):  # 8 MiB of text plus the JSON around it: over the limit in the last piece
            yield b"x" * (1 << 20)
        yield b'"}'

    assert_error(http.post("/v1/completions", content=chunked()), 413, "request_too_large", "8388608 bytes")


def test_server_keeps_serving_after_bad_input(http: httpx.Client, oai: openai.OpenAI) -> None:
    for case in BAD_REQUESTS:
        body = case[2]
        http.post(case[1], content=body if isinstance(body, bytes) else json.dumps(body))
    assert http.get("/health").status_code == 200
    reply = oai.chat.completions.create(model="tiny-a", messages=HELLO, max_tokens=3)
    assert reply.choices[0].finish_reason in ("length", "stop")


def test_unknown_model_is_a_404_listing_known_models(http: httpx.Client, oai: openai.OpenAI) -> None:
    error = assert_error(post(http, "/v1/chat/completions", {"model": "nope", "messages": HELLO}), 404,
                         "model_not_found", "'nope'")
    assert "slow, tiny-a, tiny-b, tiny-c" in error["message"]
    with pytest.raises(openai.NotFoundError, match="tiny-a"):
        oai.completions.create(model="nope", prompt="x", stream=True)  # before the first chunk: not a stream
    assert_error(post(http, "/v1/embeddings", {"model": "nope", "input": "x"}), 404, "model_not_found")
    assert_error(http.post("/api/models/nope/load"), 404, "model_not_found", "tiny-b")


def test_admin_lifecycle(http: httpx.Client) -> None:
    loaded = http.post("/api/models/tiny-c/load").json()
    assert loaded["name"] == "tiny-c" and loaded["state"] == "ready" and loaded["measured_bytes"] is not None
    ps = http.get("/api/ps").json()
    assert {"models", "host", "ram_budget", "ram_reserved", "max_loaded"} <= set(ps)
    row = model_state(http, "tiny-c")
    assert row["state"] == "ready" and {"queued", "active", "estimate_bytes", "ttl_left_s"} <= set(row)
    assert http.post("/api/models/tiny-c/pin").json()["pinned"] is True
    assert_error(http.post("/api/models/tiny-c/evict"), 409, "model_pinned", "pinned")
    assert http.post("/api/models/tiny-c/unpin").json()["pinned"] is False
    assert http.post("/api/models/tiny-c/evict").json()["state"] == "available"
    assert model_state(http, "tiny-c")["state"] == "available"
    assert http.post("/api/models/tiny-c/load").json()["state"] == "ready"
    assert http.post("/api/models/tiny-c/evict", params={"force": "true"}).json()["state"] == "available"
    assert sorted(m["name"] for m in http.post("/api/rescan").json()["models"]) == [SLOW, *TINY]
    http.post("/api/models/tiny-b/load")
    assert http.post("/api/unload-all").json() == {"ok": True}
    assert {m["state"] for m in http.get("/api/ps").json()["models"]} == {"available"}


def test_events_stream_shows_state_changes_and_resumes(server: Server, http: httpx.Client) -> None:
    http.post("/api/models/tiny-b/evict", params={"force": "true"})  # so that loading it changes its state
    with server.http() as other, http.stream("GET", "/api/events", timeout=httpx.Timeout(30, read=10)) as events:
        assert events.status_code == 200 and events.headers["content-type"].startswith("text/event-stream")
        assert other.post("/api/models/tiny-b/load").status_code == 200
        seen: list[tuple[str, dict[str, Any]]] = []
        event_id = event_type = None
        for line in events.iter_lines():
            if line.startswith("id: "):
                event_id = line[4:]
            elif line.startswith("event: "):
                event_type = line[7:]
            elif line.startswith("data: "):
                data = json.loads(line[6:])
                assert data["type"] == event_type and str(data["seq"]) == event_id
                seen.append((event_type, data))
                if event_type == "state" and data["model"] == "tiny-b" and data["new"] == "ready":
                    break
    states = [(d["old"], d["new"]) for t, d in seen if t == "state" and d["model"] == "tiny-b"]
    assert ("loading", "ready") in states
    last = seen[-1][1]["seq"]
    # Resuming after a sequence number replays from the ring (Last-Event-ID or ?after=).
    with http.stream("GET", "/api/events", headers={"last-event-id": str(last - 1)},
                     timeout=httpx.Timeout(30, read=10)) as resumed:
        first_id = next(line for line in resumed.iter_lines() if line.startswith("id: "))
    assert first_id == f"id: {last}"
    assert next(replayed_events(http, after=last - 1))["seq"] == last


def test_metrics(http: httpx.Client) -> None:
    post(http, "/v1/completions", {"model": "tiny-a", "prompt": "hello", "max_tokens": 4, "ignore_eos": True})
    post(http, "/v1/completions", {"model": "nope", "prompt": "hello"})

    def scrape() -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
        response = http.get("/metrics")
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
        samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
        for family in text_string_to_metric_families(response.text):
            for sample in family.samples:
                samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
        return samples

    def counted() -> Any:
        samples = scrape()
        counts = samples.get("corral_requests_total", {})
        finished = counts.get((("api", "openai"), ("model", "tiny-a"), ("status", "length")), 0)
        return samples if finished >= 1 else None

    samples = wait_for(counted, what="the request counter")  # fed from events, asynchronously
    assert samples["corral_requests_total"][(("api", "openai"), ("model", "(unknown)"), ("status", "404"))] >= 1
    assert samples["corral_generated_tokens_total"][(("model", "tiny-a"),)] >= 4
    assert samples["corral_time_to_first_token_seconds_count"][(("model", "tiny-a"),)] >= 1
    assert samples["corral_request_duration_seconds_count"][(("model", "tiny-a"),)] >= 1
    assert samples["corral_model_load_seconds"][(("model", "tiny-a"),)] > 0
    for gauge in ("corral_queue_depth", "corral_active_slots", "corral_model_memory_estimate_bytes"):
        assert {labels[0][1] for labels in samples[gauge]} == {SLOW, *TINY}, gauge
    assert samples["corral_model_state"][(("model", "tiny-a"), ("state", "ready"))] == 1
    assert samples["corral_model_memory_measured_bytes"][(("model", "tiny-a"),)] >= 0
    assert samples["corral_loaded_models"][()] >= 1
    assert samples["corral_http_requests_total"][
        (("method", "POST"), ("route", "/v1/completions"), ("status", "200"))] >= 1


# -- requests in flight (the slow model) -----------------------------------------------------


def test_a_client_leaving_a_stream_frees_its_slot(http: httpx.Client) -> None:
    body = {"model": SLOW, "prompt": "Once", "stream": True, **LONG}
    with http.stream("POST", "/v1/completions", json=body, headers={"x-request-id": "leaves-stream"}) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
        assert model_state(http, SLOW)["active"] == 1
    # Closing the connection cancels the generation; the engine frees the slot at its next step.
    event = wait_for(lambda: finished_event(http, "leaves-stream"), what="the cancelled request's event")
    assert event["finish_reason"] == "cancelled" and event["completion_tokens"] < LONG["max_tokens"]
    assert_idle(http, SLOW)


def test_a_client_leaving_a_whole_request_frees_its_slot(server: Server, http: httpx.Client) -> None:
    http.post(f"/api/models/{SLOW}/load")
    with server.http() as impatient, pytest.raises(httpx.ReadTimeout):
        impatient.post("/v1/completions", json={"model": SLOW, "prompt": "Once", **LONG},
                       headers={"x-request-id": "leaves-whole"}, timeout=httpx.Timeout(30, read=0.5))
    event = wait_for(lambda: finished_event(http, "leaves-whole"), what="the cancelled request's event")
    assert event["finish_reason"] == "cancelled" and event["completion_tokens"] < LONG["max_tokens"]
    assert_idle(http, SLOW)


async def test_a_full_queue_is_a_429(server: Server) -> None:
    """slow has one slot and a queue of one: the third concurrent request is refused."""
    body = {"model": SLOW, "prompt": "Once", "stream": True, **LONG}
    async with httpx.AsyncClient(base_url=server.url, trust_env=False, timeout=30) as client:

        async def ps() -> dict[str, Any]:
            return next(m for m in (await client.get("/api/ps")).json()["models"] if m["name"] == SLOW)

        async def hold(ready: asyncio.Event) -> None:
            async with client.stream("POST", "/v1/completions", json=body) as response:
                assert response.status_code == 200
                async for line in response.aiter_lines():
                    if line.startswith("data: "):
                        ready.set()

        running, queued = asyncio.Event(), asyncio.Event()
        first = asyncio.create_task(hold(running))
        await asyncio.wait_for(running.wait(), 30)
        second = asyncio.create_task(hold(queued))  # no response yet: it waits for the slot
        deadline = time.monotonic() + 10
        while (await ps())["queued"] != 1:
            assert time.monotonic() < deadline, "the second request never queued"
            await asyncio.sleep(0.02)
        refused = await client.post("/v1/completions", json=body)
        assert_error(refused, 429, "queue_full", "queue is full")
        assert int(refused.headers["retry-after"]) >= 1
        first.cancel()  # leaving frees the slot, so the queued request starts
        await asyncio.wait_for(queued.wait(), 30)
        second.cancel()
        await asyncio.gather(first, second, return_exceptions=True)
        metrics = (await client.get("/metrics")).text
        assert re.search(r'corral_requests_total\{api="openai",model="slow",status="429"\} [1-9]', metrics)
    with server.http() as http:
        assert_idle(http, SLOW)


# -- auth ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory: pytest.TempPathFactory, models: tuple[Path, Path]) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("keyed")
    running = start_server(root, slow_config(root, *models), api_key="s3cret-key")
    yield running
    assert running.stop() == 0, running.log()


def test_auth_needs_the_key_everywhere_but_health(keyed_server: Server) -> None:
    with httpx.Client(base_url=keyed_server.url, trust_env=False, timeout=30) as anonymous:
        assert anonymous.get("/health").status_code == 200
        for method, path in (("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("GET", "/api/ps"),
                             ("POST", "/api/models/tiny-a/load"), ("GET", "/metrics"), ("GET", "/api/events")):
            response = anonymous.request(method, path)
            assert_error(response, 401, "unauthorized", "Authorization: Bearer")
            assert response.headers["www-authenticate"] == "Bearer"
        wrong = anonymous.get("/v1/models", headers={"authorization": "Bearer s3cret-kez"})
        assert_error(wrong, 401, "unauthorized")
        assert_error(anonymous.get("/v1/models", headers={"authorization": "Basic s3cret-key"}), 401, "unauthorized")
    with keyed_server.http() as client:
        assert client.get("/api/ps").status_code == 200 and client.get("/metrics").status_code == 200
    reply = keyed_server.openai().chat.completions.create(model="tiny-a", messages=HELLO, max_tokens=2)
    assert reply.choices[0].message.content is not None
    with pytest.raises(openai.AuthenticationError):
        keyed_server.openai(api_key="wrong").models.list()


# -- shutdown --------------------------------------------------------------------------------


def test_sigterm_ends_streams_and_exits_0(tmp_path: Path, models: tuple[Path, Path]) -> None:
    running = start_server(tmp_path, slow_config(tmp_path, *models), grace=1.0)
    try:
        with running.http() as http, running.http() as watcher:
            with watcher.stream("GET", "/api/events", timeout=httpx.Timeout(30, read=20)) as events, \
                    http.stream("POST", "/v1/chat/completions", timeout=httpx.Timeout(30, read=20),
                                json={"model": SLOW, "messages": HELLO, "stream": True, **LONG}) as stream:
                assert stream.status_code == 200
                lines = stream.iter_lines()
                assert next(line for line in lines if line.startswith("data: "))
                running.proc.send_signal(signal.SIGTERM)
                draining = None
                for _ in range(50):  # during the grace the server still answers, and says 503
                    draining = watcher.get("/health")
                    if draining.status_code == 503:
                        break
                    time.sleep(0.01)
                assert draining is not None and draining.status_code == 503
                assert draining.json()["status"] == "draining"
                rest = [line for line in lines if line.startswith("data: ")]
                list(events.iter_lines())  # the events stream ends too, instead of blocking shutdown
        assert rest[-1] == "data: [DONE]"
        last = json.loads(rest[-2][6:])
        assert last["choices"][0]["finish_reason"] in ("cancelled", "length")
        assert last["usage"]["completion_tokens"] > 0 and last["corral"]["duration_s"] > 0
        assert running.proc.wait(timeout=30) == 0, running.log()
    finally:
        if running.proc.poll() is None:
            running.proc.kill()
    log = running.log()
    assert "SIGTERM: shutting down" in log and "still running after the grace period" in log
    assert "textual modules: []" in log
    assert "Traceback" not in log, log


# -- in-process: states a subprocess cannot pin down -----------------------------------------


def test_health_is_starting_then_ok_then_draining() -> None:
    backend = StubBackend()
    app = create_app(backend)  # type: ignore[arg-type]
    with TestClient(app) as client:
        starting = client.get("/health")
        assert starting.status_code == 503 and starting.json()["status"] == "starting"
        backend.started.set()
        wait_for(lambda: client.get("/health").status_code == 200, what="health 200")
        assert client.portal is not None
        client.portal.call(app.state.corral.begin_drain)
        draining = client.get("/health")
        assert draining.status_code == 503 and draining.json()["status"] == "draining"
        assert_error(client.post("/v1/completions", json={"model": "m", "prompt": "x"}), 503, "shutting_down")


def test_an_unexpected_exception_is_a_generic_500() -> None:
    backend = StubBackend()
    backend.started.set()
    with TestClient(create_app(backend), raise_server_exceptions=False) as client:  # type: ignore[arg-type]
        response = client.get("/v1/models", headers={"x-request-id": "boom-1"})
        assert_error(response, 500, "internal_error", "boom-1")
        assert "secret" not in response.text and "Traceback" not in response.text
        wait_for(lambda: client.get("/health").status_code == 200, what="health 200")


def test_exposure_warning() -> None:
    assert exposure_warning("127.0.0.1", None) is None and exposure_warning("::1", None) is None
    assert exposure_warning("localhost", None) is None
    assert exposure_warning("0.0.0.0", "key") is None
    assert "without an API key" in (exposure_warning("0.0.0.0", None) or "")
    assert "without an API key" in (exposure_warning("myhost.example", None) or "")


def test_null_stop_means_no_stop_strings(http: httpx.Client) -> None:
    response = post(http, "/v1/completions", {"model": "tiny-a", "prompt": "x", "max_tokens": 2, "stop": None})
    assert response.status_code == 200, response.text


def test_arbitrary_methods_cannot_grow_the_metrics(http: httpx.Client) -> None:
    """Counted as "other", or refused before the app where uvicorn parses with httptools
    (installed beside Ray), which answers an unknown method with its own 400."""
    statuses = {http.request(f"X{i}YZ", "/nothing").status_code for i in range(5)}
    text = http.get("/metrics").text
    assert "X0YZ" not in text
    if statuses == {400}:  # httptools refused them: they never reached the app
        assert 'method="other"' not in text
    else:
        assert 'method="other"' in text


# -- live configuration --------------------------------------------------------------------------


def corral_cli(*args: str, root: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
    return subprocess.run([sys.executable, "-c", "from corral.console.cli import main; raise SystemExit(main())",
                           *args], capture_output=True, text=True, env=env, cwd=root, timeout=60)


def test_config_reload_versions_rollback_and_sighup(tmp_path: Path, models: tuple[Path, Path]) -> None:
    config = slow_config(tmp_path, *models)
    original = config.read_text()
    server = start_server(tmp_path / "srv", config, extra=("--no-watch",))
    try:
        with server.http() as http:
            config.write_text(original.replace("keep_alive = -1", "keep_alive = 120"))
            applied = post(http, "/api/config/reload", None)
            assert applied.status_code == 200, applied.text
            version = applied.json()
            assert version["number"] == 2 and version["diff"] == ["defaults.keep_alive: -1.0 → 120.0"]
            assert {m["name"]: m["keep_alive_s"] for m in http.get("/api/ps").json()["models"]}["tiny-a"] == 120

            config.write_text(original + "[server]\nprot = 1\n")
            assert_error(post(http, "/api/config/reload", None), 400, "invalid_config", "did you mean 'port'")
            listed = http.get("/api/config/versions").json()
            assert listed["current"] == 2 and [v["number"] for v in listed["versions"]] == [1, 2]

            rolled = post(http, "/api/config/rollback/1", None).json()
            assert rolled["number"] == 3 and "rollback to 1" in rolled["source"]
            assert config.read_text() == original  # the file follows the rollback
            assert_error(post(http, "/api/config/rollback/99", None), 404, "not_found", "version 99")
            assert_error(post(http, "/api/config/reload?source=anything", None), 400, "invalid_request", "source")
            shown = http.get("/api/config/versions/2").json()
            assert shown["settings"]["defaults"]["keep_alive"] == 120 and "keep_alive = 120" in shown["text"]

            config.write_text(original.replace("keep_alive = -1", "keep_alive = 30"))
            server.proc.send_signal(signal.SIGHUP)
            latest = wait_for(lambda: http.get("/api/config/versions").json()["current"] == 4 and
                              http.get("/api/config/versions").json()["versions"][-1], what="the SIGHUP reload")
            assert latest["source"] == "signal" and latest["diff"] == ["defaults.keep_alive: -1.0 → 30.0"]

        history = corral_cli("config", "history", "--url", server.url, root=tmp_path)
        assert history.returncode == 0, history.stderr
        assert "version 4" in history.stdout and "defaults.keep_alive: -1.0 → 30.0" in history.stdout
        config.write_text(original)
        reloaded = corral_cli("reload", "--url", server.url, root=tmp_path)
        assert reloaded.returncode == 0 and "version 5  " in reloaded.stdout and " cli" in reloaded.stdout, \
            reloaded.stderr
        missing = corral_cli("config", "rollback", "42", "--url", server.url, root=tmp_path)
        assert missing.returncode == 1 and "config version 42 does not exist" in missing.stderr
    finally:
        assert server.stop() == 0


def test_a_restart_restores_the_loaded_models_before_health_is_ok(tmp_path: Path, models: tuple[Path, Path]) -> None:
    config = slow_config(tmp_path, *models)
    root = tmp_path / "srv"
    server = start_server(root, config)
    with server.http() as http:
        assert post(http, "/api/models/tiny-b/load", None).status_code == 200
        assert post(http, "/api/models/tiny-c/pin", None).status_code == 200
    server.proc.kill()  # a crash: nothing gets to save anything at exit
    server.proc.wait()
    restarted = start_server(root, config)  # start_server waits for health 200
    try:
        with restarted.http() as http:
            infos = {m["name"]: m for m in http.get("/api/ps").json()["models"]}
            assert infos["tiny-b"]["state"] == "ready" and infos["tiny-c"]["pinned"]
            assert infos["tiny-a"]["state"] == "available"
    finally:
        assert restarted.stop() == 0
