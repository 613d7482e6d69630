"""OpenAI's wire format ⇄ corral's `GenerationRequest` and `Chunk`, as pure conversions
(backend/server/openai.py), both ways: what the server reads and writes, and what
`RemoteBackend` writes and reads back. No model and no server process: the last tests drive
the app in process over a backend that streams fixed chunks.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import pytest
from starlette.testclient import TestClient

from corral.backend.errors import BadRequest
from corral.backend.generation import Chunk, RequestStats, TokenLogprob, ToolCallDelta, TopLogprob
from corral.backend.request import (GenerationRequest, Message, ResponseFormat, Tool, ToolChoice, chat_request,
                                    completion_request)
from corral.backend.server import create_app
from corral.backend.server.openai import (ChatRequest, ChatShape, CompletionRequest, CompletionShape,
                                          chunk_from_wire, wire_body)

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
STATS = RequestStats(prompt_tokens=12, completion_tokens=5, queue_wait_s=0.25, ttft_s=0.5, duration_s=1.5,
                     cached_tokens=4)


def token(text: str, logprob: float, *alternatives: tuple[str, float]) -> TokenLogprob:
    return TokenLogprob(text, logprob, tuple(text.encode()),
                        tuple(TopLogprob(t, lp, tuple(t.encode())) for t, lp in alternatives))


def read(body: dict[str, Any], request_id: str = "r-1", session_id: str | None = "s-1") -> GenerationRequest:
    """What the server makes of a body before calling the backend."""
    kind = ChatRequest if "messages" in body else CompletionRequest
    request = kind.model_validate(body).generation(request_id, session_id)
    request.validate()
    return request


# -- requests: wire → GenerationRequest → wire ---------------------------------------------------


def test_a_full_chat_request_survives_the_round_trip() -> None:
    original = chat_request(
        "tiny", [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Weather"}, {"type": "text", "text": "in Paris?"}]},
            {"role": "assistant", "content": None, "reasoning_content": "They want weather.",
             "tool_calls": [{"id": "call_1", "type": "function",
                             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": '{"sky": "clear"}'},
        ],
        tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "get_weather"}},
        parallel_tool_calls=False, logprobs=True, top_logprobs=3, reasoning=False, reasoning_effort="low",
        template_kwargs={"enable_thinking": False, "custom": [1, 2]}, keep_alive=60.0, cache=False,
        request_id="r-1", session_id="s-1", max_tokens=32, temperature=0.5, top_p=0.9, top_k=20, min_p=0.1,
        repeat_penalty=1.1, seed=7, stop=["\n\n"], ignore_eos=True)
    path, body = wire_body(original)
    assert path == "/v1/chat/completions"
    assert body["messages"][1] == {"role": "user", "content": "Weather\nin Paris?"}
    assert body["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert body["chat_template_kwargs"] == {"enable_thinking": False, "custom": [1, 2]}
    assert read(json.loads(json.dumps(body))) == replace(original, api="openai")  # the route names its API


def test_a_completion_request_survives_the_round_trip() -> None:
    original = completion_request("tiny", "Once upon", logprobs=True, top_logprobs=2, grammar='root ::= "a"',
                                  request_id="r-1", session_id="s-1", max_tokens=4)
    path, body = wire_body(original)
    assert path == "/v1/completions" and body["logprobs"] == 2  # the legacy form: how many alternatives
    assert read(body) == replace(original, api="openai")
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}}
    formatted = completion_request("tiny", "{", response_format={"type": "json_schema", "json_schema": {
        "name": "n", "schema": schema, "strict": True}}, request_id="r-1", session_id="s-1")
    assert read(wire_body(formatted)[1]) == replace(formatted, api="openai")


def test_only_what_differs_from_the_defaults_is_sent() -> None:
    assert wire_body(completion_request("m", "hi", max_tokens=500)) == (
        "/v1/completions", {"model": "m", "prompt": "hi", "max_tokens": 500})
    path, body = wire_body(chat_request("m", [{"role": "user", "content": "hi"}], reasoning=True))
    assert body == {"model": "m", "messages": [{"role": "user", "content": "hi"}],
                    "chat_template_kwargs": {"enable_thinking": True}}


def test_openai_spellings_map_onto_the_one_request() -> None:
    request = read({"model": "m", "max_tokens": 9, "max_completion_tokens": 3, "stop": "END",
                    "messages": [{"role": "developer", "content": "rules"}, {"role": "user", "content": "hi"}],
                    "chat_template_kwargs": {"enable_thinking": False}, "tool_choice": "none", "tools": [WEATHER]})
    assert request.options == {"max_tokens": 3, "stop": ["END"]}
    assert request.messages is not None and request.messages[0] == Message("system", "rules")
    assert request.reasoning is False and request.template_kwargs == {"enable_thinking": False}
    assert request.tool_choice == ToolChoice("none") and request.tools == (
        Tool("get_weather", "Current weather in a city", WEATHER["function"]["parameters"]),)
    legacy = read({"model": "m", "prompt": ["once"], "logprobs": 0})
    assert (legacy.prompt, legacy.logprobs, legacy.top_logprobs) == ("once", True, 0)
    assert read({"model": "m", "prompt": "x", "response_format": {"type": "json_object"}}).response_format == \
        ResponseFormat("json_object")


@pytest.mark.parametrize("extra, mentions", [
    ({"messages": [{"role": "tool", "content": "42"}]}, "messages[0]: a tool message needs tool_call_id"),
    ({"messages": [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{city: Paris"}}]}]},
     "messages[0].tool_calls[0].function.arguments is not JSON"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "launch"}}},
     "tool_choice names function 'launch', which is not in tools (get_weather)"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
     "tools[0].function.parameters"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}]},
     "messages[0].content[0] is an image; images are not supported yet"),
    ({"tool_choice": "sometimes"}, "tool_choice = 'sometimes'"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema.schema"),
    ({"top_logprobs": 3}, "top_logprobs needs logprobs"),
    ({"reasoning_effort": "extreme"}, "reasoning_effort = 'extreme'"),
])
def test_bad_requests_name_the_field(extra: dict[str, Any], mentions: str) -> None:
    with pytest.raises(BadRequest) as caught:
        read({"model": "m", "messages": [{"role": "user", "content": "hi"}], **extra})
    assert mentions in caught.value.message


# -- chunks: Chunk → wire → Chunk ----------------------------------------------------------------


STREAM = [
    Chunk("", reasoning="Thinking", cache="miss"),
    Chunk("Sure.", logprobs=(token("Sure", -0.1, ("Sure", -0.1), ("No", -2.5)),
                             token(".", -0.3, (".", -0.3), ("!", -1.5)))),
    Chunk("", tool_calls=(ToolCallDelta(0, "call_a", "get_weather", ""),)),
    Chunk("", tool_calls=(ToolCallDelta(0, arguments='{"city": '), ToolCallDelta(1, "call_b", "get_time", "{"))),
    Chunk("", tool_calls=(ToolCallDelta(0, arguments='"Paris"}'), ToolCallDelta(1, arguments="}"))),
    Chunk("", "tool_calls", STATS),
]


def test_chat_chunks_survive_the_round_trip() -> None:
    shape = ChatShape("tiny", "r-1", "s-1", created=7)
    shape.cache = "miss"
    *pieces, last = STREAM
    sent = [shape.chunk_dict(chunk) for chunk in pieces] + [shape.final_dict(last)]
    back = [chunk_from_wire(json.loads(json.dumps(data)), chat=True) for data in sent]
    assert back == [Chunk(c.text, c.finish_reason, c.stats, c.error, reasoning=c.reasoning, tool_calls=c.tool_calls,
                          logprobs=c.logprobs) for c in STREAM]  # the verdict travels in a header instead
    assert sent[0]["choices"][0]["delta"] == {"role": "assistant", "reasoning_content": "Thinking"}
    assert sent[-1]["corral"] == {"request_id": "r-1", "session_id": "s-1", "queue_wait_s": 0.25, "ttft_s": 0.5,
                                  "duration_s": 1.5, "tokens_per_s": 4.0, "cache": "miss", "stop_sequence": None}
    stopped = Chunk("", "stop", replace(STATS, stop_sequence="\n\n"))  # which stop string ended it travels too
    assert chunk_from_wire(json.loads(json.dumps(shape.final_dict(stopped))), chat=True) == stopped
    assert sent[-1]["usage"] == {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17,
                                 "prompt_tokens_details": {"cached_tokens": 4}}


def test_tool_call_deltas_stream_as_openai_streams_them() -> None:
    shape = ChatShape("tiny", "r-1")
    deltas = [shape.chunk_dict(chunk)["choices"][0]["delta"] for chunk in STREAM[2:5]]
    assert [d.get("role") for d in deltas] == ["assistant", None, None]  # the role comes with the first one sent
    assert [d["tool_calls"] for d in deltas] == [
        [{"index": 0, "id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": ""}}],
        [{"index": 0, "function": {"arguments": '{"city": '}},  # one entry per call and chunk: arguments
         {"index": 1, "id": "call_b", "type": "function", "function": {"name": "get_time", "arguments": "{"}}],
        # that came with the name ride in the call's opening entry
        [{"index": 0, "function": {"arguments": '"Paris"}'}}, {"index": 1, "function": {"arguments": "}"}}],
    ]
    piece = shape.piece(STREAM[2])
    assert piece.startswith("data: {") and piece.endswith("}\n\n")
    assert json.loads(piece.removeprefix("data: "))["choices"][0]["delta"] == {"tool_calls": deltas[0]["tool_calls"]}
    assert shape.end(STREAM[-1]).endswith("\n\ndata: [DONE]\n\n")


def test_a_whole_chat_answer_assembles_the_chunks() -> None:
    whole = ChatShape("tiny", "r-1", created=7).whole(STREAM)
    assert (whole["id"], whole["object"], whole["created"], whole["model"]) == (
        "chatcmpl-r-1", "chat.completion", 7, "tiny")
    [choice] = whole["choices"]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"] == {
        "role": "assistant", "content": "Sure.", "reasoning_content": "Thinking",
        "tool_calls": [{"id": "call_a", "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
                       {"id": "call_b", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]}
    assert choice["logprobs"] == {"content": [
        {"token": "Sure", "logprob": -0.1, "bytes": [83, 117, 114, 101],
         "top_logprobs": [{"token": "Sure", "logprob": -0.1, "bytes": [83, 117, 114, 101]},
                          {"token": "No", "logprob": -2.5, "bytes": [78, 111]}]},
        {"token": ".", "logprob": -0.3, "bytes": [46],
         "top_logprobs": [{"token": ".", "logprob": -0.3, "bytes": [46]},
                          {"token": "!", "logprob": -1.5, "bytes": [33]}]},
    ]}
    only_calls = ChatShape("tiny", "r-1").whole([STREAM[2], STREAM[-1]])["choices"][0]
    assert only_calls["message"]["content"] is None and "reasoning_content" not in only_calls["message"]
    plain = ChatShape("tiny", "r-1").whole([Chunk("Hi"), Chunk("!", "stop", STATS)])["choices"][0]
    assert plain == {"index": 0, "message": {"role": "assistant", "content": "Hi!"}, "logprobs": None,
                     "finish_reason": "stop"}


def test_completion_logprobs_take_the_legacy_shape() -> None:
    chunks = [Chunk("Once", logprobs=(token("Once", -0.5, ("Once", -0.5), ("In", -1.0)),)),
              Chunk(" upon", logprobs=(token(" up", -0.2, (" up", -0.2)), token("on", -0.1, ("on", -0.1)))),
              Chunk("", "length", STATS)]
    whole = CompletionShape("tiny", "r-1").whole(chunks)["choices"][0]
    assert whole["text"] == "Once upon" and whole["finish_reason"] == "length"
    assert whole["logprobs"] == {"tokens": ["Once", " up", "on"], "token_logprobs": [-0.5, -0.2, -0.1],
                                 "top_logprobs": [{"Once": -0.5, "In": -1.0}, {" up": -0.2}, {"on": -0.1}],
                                 "text_offset": [0, 4, 7]}
    shape = CompletionShape("tiny", "r-1")
    streamed = [shape.chunk_dict(c) for c in chunks[:2]] + [shape.final_dict(chunks[2])]
    assert [d["choices"][0]["logprobs"]["text_offset"] for d in streamed[:2]] == [[0], [4, 7]]
    assert streamed[2]["choices"][0]["logprobs"] is None
    assert [chunk_from_wire(d, chat=False) for d in streamed] == chunks  # bytes: the tokens' UTF-8


def test_a_stream_that_fails_says_why_in_its_last_chunk() -> None:
    final = ChatShape("tiny", "r-9").final_dict(Chunk("", "error", error="the engine stopped"))
    assert final["error"] == {"message": "the engine stopped", "type": "generation_failed",
                              "code": "generation_failed", "request_id": "r-9"}
    assert chunk_from_wire(final, chat=True) == Chunk("", "error", error="the engine stopped")


# -- through the app, in process -----------------------------------------------------------------


class ScriptedBackend:
    """Streams the same chunks for every request, and keeps the requests it was given."""

    def __init__(self, chunks: list[Chunk]) -> None:
        self.chunks = chunks
        self.requests: list[GenerationRequest] = []

    async def warmed(self) -> None:
        return None

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        self.requests.append(request)
        for chunk in self.chunks:
            yield chunk

    async def events(self, after_seq: int | None = None) -> AsyncIterator[Any]:
        await asyncio.Event().wait()  # none, until the app's shutdown cancels its reader
        yield None


def test_the_app_streams_the_chunks_and_skips_empty_ones() -> None:
    chunks = [Chunk("", cache="miss"), Chunk("Hi"), Chunk(""), Chunk("", tool_calls=(ToolCallDelta(0, "c", "f"),)),
              Chunk("", "tool_calls", STATS)]
    backend = ScriptedBackend(chunks)
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stream": True,
            "tools": [{"type": "function", "function": {"name": "f"}}]}
    with TestClient(create_app(backend)) as client:  # type: ignore[arg-type]
        response = client.post("/v1/chat/completions", json=body, headers={"x-request-id": "r-5"})
        refused = client.post("/v1/chat/completions", json={**body, "tool_choice": "required", "tools": []})
    assert response.status_code == 200 and response.headers["x-corral-cache"] == "miss"
    lines = [line for line in response.text.split("\n\n") if line]
    assert lines[-1] == "data: [DONE]" and len(lines) == 4  # "Hi", the call, the final chunk, [DONE]
    sent = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert [chunk_from_wire(d, chat=True) for d in sent] == [Chunk("Hi"), chunks[3], Chunk("", "tool_calls", STATS)]
    assert sent[-1]["corral"]["cache"] == "miss" and sent[0]["id"] == "chatcmpl-r-5"
    assert backend.requests[0].request_id == "r-5" and backend.requests[0].tools[0].name == "f"
    assert refused.status_code == 400 and "tool_choice = 'required'" in refused.json()["error"]["message"]
    assert len(backend.requests) == 1  # a bad request never reaches the backend


def test_importing_the_conversions_loads_no_web_framework() -> None:
    code = ("import sys, corral.backend.server.openai, corral.backend.remote; "
            "print(sorted(m for m in ('fastapi', 'starlette', 'uvicorn', 'llama_cpp') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
