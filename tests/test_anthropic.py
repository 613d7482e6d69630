"""Anthropic's Messages API through the unchanged official `anthropic` client against a real
`corral serve` on the default model (a base model with no chat template): whole and streamed
answers, forced tool use, a tool-result round trip, count_tokens, auth by `x-api-key` and
Anthropic's error shape. A base model cannot be judged on what it says, so these tests check
structure: block types, stop reasons, usage, and tool inputs that fit their schema.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import anthropic
import httpx
import pytest
from starlette.testclient import TestClient

from corral.backend.catalog import DEFAULT_MODEL_NAME
from corral.backend.generation import Chunk, RequestStats, ToolCallDelta
from corral.backend.remote import RemoteBackend
from corral.backend.request import chat_request
from corral.backend.server import create_app
from corral.backend.server.anthropic import CountTokensRequest, MessagesShape, count_body
from fake_backend import FakeBackend
from ggufs import write_tiny_llama
from support import WEATHER_PARAMETERS, Server, check_weather, replayed_events, start_server, wait_for

pytestmark = pytest.mark.e2e
MODEL = DEFAULT_MODEL_NAME
WEATHER = {"name": "get_weather", "description": "Current weather in a city", "input_schema": WEATHER_PARAMETERS}
ASK = [{"role": "user", "content": "What is the weather in Paris right now?"}]
GREEDY = {"temperature": 0}  # sampling fields this SDK version no longer names travel as extra_body
STREAM_EVENTS = {"message_start", "content_block_start", "content_block_delta", "content_block_stop",
                 "message_delta", "message_stop"}


def client_for(default_server: Server, api_key: str | None = None) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=default_server.url, api_key=api_key or default_server.api_key or "none", max_retries=0,
                               http_client=anthropic.DefaultHttpxClient(trust_env=False), timeout=60)


@pytest.fixture
def claude(default_server: Server) -> anthropic.Anthropic:
    return client_for(default_server)


def test_create_whole(claude: anthropic.Anthropic) -> None:
    message = claude.messages.create(model=MODEL, max_tokens=12, extra_body=GREEDY, system=[
        {"type": "text", "text": "You answer briefly."}], messages=[{"role": "user", "content": "Say hello."}],
        metadata={"user_id": "tester"}, extra_headers={"anthropic-version": "2023-06-01"})
    assert message.type == "message" and message.role == "assistant" and message.model == MODEL
    assert message.id.startswith("msg_") and message.stop_sequence is None
    assert message.stop_reason in ("end_turn", "max_tokens")
    assert [block.type for block in message.content] in (["text"], [])
    assert message.usage.input_tokens > 0 and 1 <= message.usage.output_tokens <= 12


def test_requests_are_counted_and_announced_by_their_api(claude: anthropic.Anthropic,
                                                         default_server: Server) -> None:
    request_id = "anthropic-api-label"
    claude.messages.create(model=MODEL, max_tokens=2, messages=[{"role": "user", "content": "Hi"}],
                           extra_headers={"x-request-id": request_id}, extra_body={**GREEDY, "cache": False})
    with default_server.http() as http:
        counted = r'corral_requests_total\{api="anthropic",model="%s",status="\w+"\} [1-9]' % re.escape(MODEL)
        wait_for(lambda: re.search(counted, http.get("/metrics").text), what="the anthropic request counter")
        finished = [e for e in replayed_events(http) if e["type"] == "request_finished"
                    and e["request_id"] == request_id]
    assert [e["api"] for e in finished] == ["anthropic"]


def test_stream_assembles_the_whole_message(claude: anthropic.Anthropic) -> None:
    seen: list[str] = []
    texts: list[str] = []
    with claude.messages.stream(model=MODEL, max_tokens=12,
                                extra_body={"temperature": 0.7, "top_p": 0.9, "top_k": 20},
                                messages=[{"role": "user", "content": "Tell me a story."}]) as stream:
        for event in stream:
            seen.append(event.type)
            if event.type == "content_block_delta" and event.delta.type == "text_delta":
                texts.append(event.delta.text)
        final = stream.get_final_message()
    assert STREAM_EVENTS <= set(seen) and seen[0] == "message_start"
    assert final.stop_reason in ("end_turn", "max_tokens") and final.usage.output_tokens >= 1
    assert [block.type for block in final.content] == ["text"]
    assert final.content[0].text == "".join(texts)  # type: ignore[union-attr]


def test_raw_stream_events_in_order(default_server: Server) -> None:
    body = {"model": MODEL, "max_tokens": 6, "stream": True, "messages": [{"role": "user", "content": "Hi"}]}
    with default_server.http() as http, http.stream("POST", "/v1/messages", json=body) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        names = [line.removeprefix("event: ") for line in response.iter_lines() if line.startswith("event: ")]
    assert names[:2] == ["message_start", "ping"] and names[-2:] == ["message_delta", "message_stop"]
    assert names[2] == "content_block_start" and names[-3] == "content_block_stop"


def test_tool_choice_any_gives_a_tool_use_block(claude: anthropic.Anthropic) -> None:
    message = claude.messages.create(model=MODEL, max_tokens=80, extra_body=GREEDY, messages=ASK, tools=[WEATHER],
                                     tool_choice={"type": "any", "disable_parallel_tool_use": True})
    assert message.stop_reason == "tool_use"
    [call] = [block for block in message.content if block.type == "tool_use"]
    assert call.name == "get_weather" and call.id
    check_weather(call.input)


def test_streamed_tool_use(claude: anthropic.Anthropic) -> None:
    with claude.messages.stream(model=MODEL, max_tokens=80, extra_body=GREEDY, messages=ASK, tools=[WEATHER],
                                tool_choice={"type": "tool", "name": "get_weather",
                                             "disable_parallel_tool_use": True}) as stream:
        deltas = [event.delta.type for event in stream if event.type == "content_block_delta"]
        final = stream.get_final_message()
    assert "input_json_delta" in deltas and final.stop_reason == "tool_use"
    [call] = [block for block in final.content if block.type == "tool_use"]
    check_weather(call.input)


def test_tool_result_round_trip(claude: anthropic.Anthropic) -> None:
    turns: list[Any] = [
        *ASK,
        {"role": "assistant", "content": [
            {"type": "text", "text": "Let me look."},
            {"type": "tool_use", "id": "toolu_1", "name": "get_weather",
             "input": {"city": "Paris", "unit": "celsius"}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "18 C, sunny"}]},
            {"type": "text", "text": "Thanks. Summarize it."}]},
    ]
    message = claude.messages.create(model=MODEL, max_tokens=16, extra_body=GREEDY, messages=turns, tools=[WEATHER],
                                     tool_choice={"type": "none"})
    assert message.stop_reason in ("end_turn", "max_tokens")
    assert all(block.type == "text" for block in message.content)
    counted = claude.messages.count_tokens(model=MODEL, messages=turns, tools=[WEATHER],
                                           tool_choice={"type": "none"})
    assert counted.input_tokens == message.usage.input_tokens
    failed = [*turns[:2], {"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "toolu_1", "content": "no such city", "is_error": True}]}]
    assert claude.messages.count_tokens(model=MODEL, messages=failed).input_tokens > 0


def test_count_tokens_matches_the_prompt(claude: anthropic.Anthropic) -> None:
    turns = [{"role": "user", "content": "How many tokens is this?"}]
    counted = claude.messages.count_tokens(model=MODEL, system="Be brief.", messages=turns)
    message = claude.messages.create(model=MODEL, system="Be brief.", max_tokens=1, messages=turns)
    assert counted.input_tokens == message.usage.input_tokens > 0
    longer = claude.messages.count_tokens(model=MODEL, system="Be brief.", messages=[
        {"role": "user", "content": "How many tokens is this, and how many more in this longer question?"}])
    assert longer.input_tokens > counted.input_tokens


def test_remote_backend_counts_through_the_route(default_server: Server, claude: anthropic.Anthropic) -> None:
    request = chat_request(MODEL, [{"role": "system", "content": "Be brief."}, *ASK], tools=[{
        "type": "function", "function": {"name": WEATHER["name"], "parameters": WEATHER["input_schema"]}}])
    with RemoteBackend(default_server.url) as remote:
        counted = remote.sync.run(remote.count_tokens(request))
    direct = claude.messages.count_tokens(model=MODEL, system="Be brief.", messages=ASK,
                                          tools=[{**WEATHER, "description": ""}])
    assert counted == direct.input_tokens > 0


def test_bad_requests_in_anthropics_shape(claude: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.BadRequestError) as missing:
        claude.post("/v1/messages", cast_to=object, body={"model": MODEL, "messages": ASK})
    assert "max_tokens" in missing.value.message
    assert missing.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
    with pytest.raises(anthropic.BadRequestError, match="images are not supported yet"):
        claude.messages.create(model=MODEL, max_tokens=8, messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}]}])
    with pytest.raises(anthropic.BadRequestError, match="tool_choice.name"):
        claude.post("/v1/messages", cast_to=object, body={"model": MODEL, "max_tokens": 8, "messages": ASK,
                                                           "tools": [WEATHER], "tool_choice": {"type": "tool"}})
    with pytest.raises(anthropic.NotFoundError) as unknown:
        claude.messages.create(model="no-such-model", max_tokens=8, messages=ASK)
    assert unknown.value.body["type"] == "error"  # type: ignore[index]
    assert unknown.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]


def test_x_api_key_counts_like_bearer(tmp_path: Path) -> None:
    models = tmp_path / "models"
    write_tiny_llama(models / "tiny.gguf", name="tiny")
    config = tmp_path / "corral.toml"
    config.write_text(f"include_default_model = false\nmodel_dirs = [{json.dumps(str(models))}]\n")
    keyed = start_server(tmp_path, config, api_key="s3cret-key")
    try:
        with pytest.raises(anthropic.AuthenticationError) as refused:
            client_for(keyed, api_key="wrong-key").messages.create(model="tiny", max_tokens=4, messages=ASK)
        assert refused.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
        with httpx.Client(base_url=keyed.url, trust_env=False) as http:
            assert http.get("/v1/models", headers={"x-api-key": "s3cret-key"}).status_code == 200
            assert http.get("/v1/models", headers={"x-api-key": "s3cret-kez"}).status_code == 401
            assert http.get("/v1/models", headers={"authorization": "Bearer s3cret-key"}).status_code == 200
    finally:
        assert keyed.stop() == 0, keyed.log()


def test_routes_on_a_fake_backend() -> None:
    backend = FakeBackend()
    with TestClient(create_app(backend, api_key="k3y")) as http:  # type: ignore[arg-type]
        key = {"x-api-key": "k3y"}
        counted = http.post("/v1/messages/count_tokens", headers=key, json={
            "model": "tiny-llama", "system": "be brief", "messages": [{"role": "user", "content": "one two three"}]})
        assert counted.json() == {"input_tokens": 5}
        [(_, request)] = [call for call in backend.calls if call[0] == "count_tokens"]
        assert [m.role for m in request.messages] == ["system", "user"]
        whole = http.post("/v1/messages", headers=key, json={"model": "tiny-llama", "max_tokens": 4,
                                                             "messages": [{"role": "user", "content": "hi"}]})
        assert whole.json()["content"] == [{"type": "text", "text": "Once upon a time"}]
        assert whole.json()["stop_reason"] == "max_tokens"
        unknown = http.post("/v1/messages/count_tokens", headers=key,
                            json={"model": "nope", "messages": [{"role": "user", "content": "hi"}]})
        assert unknown.status_code == 404 and unknown.json()["error"]["type"] == "not_found_error"
        assert unknown.json()["request_id"] == unknown.headers["x-request-id"]
        refused = http.post("/v1/messages", json={})
        assert refused.status_code == 401 and refused.json()["error"]["type"] == "authentication_error"
        assert http.get("/v1/models", headers={"x-api-key": "wrong"}).json()["error"]["code"] == "unauthorized"


# -- the shape alone: thinking, several blocks, a failure mid-stream ---------------------------------

STATS = RequestStats(prompt_tokens=7, completion_tokens=5, queue_wait_s=0.0, ttft_s=0.01, duration_s=0.1)


def events(text: str) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for frame in text.strip().split("\n\n"):
        name, data = frame.split("\n")
        out.append((name.removeprefix("event: "), json.loads(data.removeprefix("data: "))))
    return out


def test_shape_streams_thinking_text_and_calls_as_blocks() -> None:
    shape = MessagesShape("m", "r1")
    text = (shape.piece(Chunk("", reasoning="hmm")) + shape.piece(Chunk("ok", reasoning=""))
            + shape.piece(Chunk("", tool_calls=(ToolCallDelta(0, "c0", "f", '{"a"'),)))
            + shape.piece(Chunk("", tool_calls=(ToolCallDelta(0, arguments=": 1}"), ToolCallDelta(1, "c1", "g", "{}"))))
            + shape.end(Chunk("", "tool_calls", STATS)))
    got = events(text)
    assert [name for name, _ in got] == [
        "message_start", "ping", "content_block_start", "content_block_delta", "content_block_stop",
        "content_block_start", "content_block_delta", "content_block_stop",
        "content_block_start", "content_block_delta", "content_block_delta", "content_block_stop",
        "content_block_start", "content_block_delta", "content_block_stop", "message_delta", "message_stop"]
    starts = [data["content_block"] for name, data in got if name == "content_block_start"]
    assert [b["type"] for b in starts] == ["thinking", "text", "tool_use", "tool_use"]
    assert starts[2]["id"] == "c0" and starts[3]["name"] == "g"
    indexes = [data["index"] for name, data in got if name.startswith("content_block")]
    assert indexes == sorted(indexes) and indexes[-1] == 3
    assert got[-2][1] == {"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": None},
                          "usage": {"output_tokens": 5}}
    whole = shape.whole([Chunk("", reasoning="hmm"), Chunk("ok"),
                         Chunk("", tool_calls=(ToolCallDelta(0, "c0", "f", '{"a": 1}'),)),
                         Chunk("", "tool_calls", STATS)])
    assert whole["content"] == [{"type": "thinking", "thinking": "hmm", "signature": ""},
                                {"type": "text", "text": "ok"},
                                {"type": "tool_use", "id": "c0", "name": "f", "input": {"a": 1}}]
    assert whole["usage"] == {"input_tokens": 7, "output_tokens": 5} and whole["stop_reason"] == "tool_use"


def test_shape_answers_at_once_and_fails_as_an_error_event() -> None:
    at_once = events(MessagesShape("m", "r2").end(Chunk("cached", "length", STATS)))
    assert [name for name, _ in at_once] == ["message_start", "ping", "content_block_start", "content_block_delta",
                                             "content_block_stop", "message_delta", "message_stop"]
    assert at_once[0][1]["message"]["usage"]["input_tokens"] == 7
    assert at_once[-2][1]["delta"]["stop_reason"] == "max_tokens"
    shape = MessagesShape("m", "r3")
    failed = events(shape.piece(Chunk("a")) + shape.end(Chunk("", "error", error="boom")))
    assert failed[-1] == ("error", {"type": "error", "error": {"type": "api_error", "message": "boom"}})


def test_count_body_reads_back_as_the_same_request() -> None:
    request = chat_request("m", [
        {"role": "system", "content": "sys"}, {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "", "reasoning_content": "think",
         "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "one"}, {"role": "user", "content": "and?"},
        {"role": "user", "content": "again"}],
        tools=[{"type": "function", "function": {"name": "f", "description": "d",
                                                  "parameters": {"type": "object", "properties": {}}}}],
        tool_choice="required", parallel_tool_calls=False, reasoning=True)
    again = CountTokensRequest.model_validate(count_body(request)).generation()
    assert again.messages == request.messages and again.tools == request.tools
    assert again.tool_choice == request.tool_choice and again.parallel_tool_calls is False
    assert again.reasoning is True


def test_a_stop_sequence_is_named_as_the_stop_reason(claude: anthropic.Anthropic) -> None:
    ask = [{"role": "user", "content": "Count from one to twenty."}]
    free = claude.messages.create(model=MODEL, max_tokens=16, extra_body=GREEDY, messages=ask)
    text = free.content[0].text  # type: ignore[union-attr]
    stop = text.split()[2]  # a word the greedy answer reaches
    cut = claude.messages.create(model=MODEL, max_tokens=16, extra_body=GREEDY, messages=ask, stop_sequences=[stop])
    assert (cut.stop_reason, cut.stop_sequence) == ("stop_sequence", stop)
    assert text.startswith(cut.content[0].text) and stop not in cut.content[0].text  # type: ignore[union-attr]
    with claude.messages.stream(model=MODEL, max_tokens=16, extra_body={**GREEDY, "cache": False}, messages=ask,
                                stop_sequences=["no such words", stop]) as stream:
        streamed = stream.get_final_message()
    assert (streamed.stop_reason, streamed.stop_sequence) == ("stop_sequence", stop)
