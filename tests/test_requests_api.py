"""GET /api/requests and DELETE /api/requests/{id} on a real `corral serve` of the default model:
a request cancelled by id ends, for each unchanged official client, with its dialect's
"cancelled" (OpenAI finish_reason, Anthropic stop_reason, Responses status, ollama
done_reason) and the text it had; its slot is free afterwards and its event names who
cancelled it. The Python API does the same over HTTP (RemoteBackend).

Requests stay in flight by asking for thousands of tokens: with ignore_eos where the dialect
has it (OpenAI), else with a chat prompt the base model answers greedily without an end (it
loops), as DESIGN.md's "Tests that need requests in flight" says."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import anthropic
import httpx
import ollama
import pytest

from corral.backend.catalog import DEFAULT_MODEL_NAME
from corral.backend.remote import RemoteBackend
from support import Server, assert_error, assert_idle, replayed_events, wait_for

pytestmark = pytest.mark.e2e
MODEL = DEFAULT_MODEL_NAME
ASK = [{"role": "user", "content": "Write a long story about a dragon."}]
MANY = 3000  # tokens asked for: minutes of decoding, so the request is still running when cancelled
IN_FLIGHT_S = 120.0  # the machine may be busy: the first token can take a while


@pytest.fixture
def http(default_server: Server) -> Iterator[httpx.Client]:
    with default_server.http() as client:
        yield client


def running(http: httpx.Client, request_id: str) -> dict[str, Any] | None:
    """The listed request once it has generated a token (it is then certainly running)."""
    listed = http.get("/api/requests").json()["requests"]
    return next((r for r in listed if r["request_id"] == request_id and r["tokens"] >= 1), None)


def cancel_while_running(http: httpx.Client, request_id: str, call: Callable[[], Any]) -> Any:
    """Run `call` (a client's whole request) in a thread, cancel it by id once it generates, and
    return what the client got; check the listing, the event and the freed slot on the way."""
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(call)
        listed = wait_for(lambda: answer.done() or running(http, request_id), IN_FLIGHT_S,
                          what=f"request {request_id} to run")
        assert listed is not True, answer.result()  # it ended before it could be cancelled
        assert (listed["model"], listed["state"], listed["queue_position"]) == (MODEL, "running", None)
        response = http.delete(f"/api/requests/{request_id}")
        assert response.status_code == 200, response.text
        assert [r["request_id"] for r in response.json()["cancelled"]] == [request_id]
        got = answer.result(timeout=60)
    assert running(http, request_id) is None
    assert_idle(http, MODEL)
    event = next(e for e in replayed_events(http) if e["type"] == "request_finished" and e["request_id"] == request_id)
    assert (event["finish_reason"], event["cancelled_by"]) == ("cancelled", "api")
    assert 0 < event["completion_tokens"] < MANY
    return got


def test_openai_stream_ends_with_finish_reason_cancelled(default_server: Server, http: httpx.Client) -> None:
    client = default_server.openai()

    def call() -> list[Any]:
        stream = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=MANY, stream=True,
                                                extra_body={"ignore_eos": True}, extra_headers={"x-request-id": "oa-1"})
        return list(stream)

    chunks = cancel_while_running(http, "oa-1", call)
    finished = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert [c.choices[0].finish_reason for c in finished] == ["cancelled"]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_openai_whole_answer_ends_with_finish_reason_cancelled(default_server: Server, http: httpx.Client) -> None:
    client = default_server.openai()
    reply = cancel_while_running(http, "oa-2", lambda: client.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=MANY, extra_body={"ignore_eos": True},
        extra_headers={"x-request-id": "oa-2"}))
    assert reply.choices[0].finish_reason == "cancelled" and reply.choices[0].text
    assert 0 < reply.usage.completion_tokens < MANY


def anthropic_client(default_server: Server) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=default_server.url, api_key="none", max_retries=0, timeout=IN_FLIGHT_S,
                               http_client=anthropic.DefaultHttpxClient(trust_env=False))


def test_anthropic_stream_ends_with_stop_reason_cancelled(default_server: Server, http: httpx.Client) -> None:
    claude = anthropic_client(default_server)

    def call() -> Any:
        with claude.messages.stream(model=MODEL, max_tokens=MANY, messages=ASK, extra_body={"temperature": 0},
                                    extra_headers={"x-request-id": "an-1"}) as stream:
            return stream.get_final_message()

    message = cancel_while_running(http, "an-1", call)
    assert message.stop_reason == "cancelled" and message.content[0].text
    assert 0 < message.usage.output_tokens < MANY


def test_anthropic_whole_message_has_stop_reason_cancelled(default_server: Server, http: httpx.Client) -> None:
    claude = anthropic_client(default_server)
    message = cancel_while_running(http, "an-2", lambda: claude.messages.create(
        model=MODEL, max_tokens=MANY, messages=ASK, extra_body={"temperature": 0},
        extra_headers={"x-request-id": "an-2"}))
    assert message.stop_reason == "cancelled" and message.content[0].text


def test_responses_stream_ends_with_status_cancelled(default_server: Server, http: httpx.Client) -> None:
    client = default_server.openai()

    def call() -> list[Any]:
        return list(client.responses.create(model=MODEL, input=ASK, max_output_tokens=MANY, temperature=0,
                                            stream=True, extra_headers={"x-request-id": "rs-1"}))

    events = cancel_while_running(http, "rs-1", call)
    final = events[-1].response
    assert final.status == "cancelled" and final.output_text
    assert final.error is None and final.incomplete_details is None


def test_ollama_stream_ends_with_done_reason_cancelled(default_server: Server, http: httpx.Client) -> None:
    client = ollama.Client(host=default_server.ollama_url, headers={"x-request-id": "ol-1"}, trust_env=False,
                           timeout=IN_FLIGHT_S)

    def call() -> list[Any]:
        return list(client.chat(model=MODEL, messages=ASK, stream=True,
                                options={"num_predict": MANY, "temperature": 0}))

    parts = cancel_while_running(http, "ol-1", call)
    assert (parts[-1].done, parts[-1].done_reason) == (True, "cancelled")
    assert "".join(p.message.content for p in parts) and 0 < parts[-1].eval_count < MANY


def test_the_python_api_over_http_lists_and_cancels(default_server: Server, http: httpx.Client) -> None:
    """RemoteBackend names its request's face (X-Corral-Api), so it is listed as python, not
    as the OpenAI route it travels on."""
    remote = RemoteBackend(default_server.url)
    try:
        stream = remote.sync.complete(MODEL, "Once upon a time", max_tokens=MANY, ignore_eos=True, request_id="py-1")
        assert next(stream).finish_reason is None
        listed = remote.sync.requests()
        assert [(r.request_id, r.model, r.api, r.state) for r in listed] == [("py-1", MODEL, "python", "running")]
        assert [r.request_id for r in remote.sync.cancel_request("py-1", by="console")] == ["py-1"]
        assert [c.finish_reason for c in stream if c.finish_reason] == ["cancelled"]
    finally:
        remote.close()
    event = next(e for e in replayed_events(http) if e["type"] == "request_finished" and e["request_id"] == "py-1")
    assert event["cancelled_by"] == "console"
    assert_idle(http, MODEL)


def test_an_unknown_id_is_a_404_that_says_what_to_do(http: httpx.Client) -> None:
    error = assert_error(http.delete("/api/requests/no-such-request"), 404, "not_found", "'no-such-request'")
    assert "GET /api/requests" in error["message"]
    assert_error(http.delete("/api/requests/x", params={"by": "mallory"}), 400, "invalid_request", "by = 'mallory'")
    assert http.get("/api/requests").json() == {"requests": []}
    bad = http.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 1},
                    headers={"x-corral-api": "mallory"})
    assert_error(bad, 400, "invalid_request", "X-Corral-Api = 'mallory': must be one of console, python")
