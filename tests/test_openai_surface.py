"""The OpenAI surface agents use, through unchanged official clients against a real `corral serve`
on the default model (a base model with no chat template): structured output, tool calls,
logprobs, model lookup, and langchain-openai on top.

A base model cannot be judged on what it says, so these tests check what the grammar and the
parsers promise: every constrained answer parses and matches its schema, tool calls name a
listed function with arguments that fit its parameters, and stream deltas assemble into the
whole answer.
"""

from __future__ import annotations

import json

import openai
import pytest

from corral.backend.catalog import DEFAULT_MODEL_NAME
from support import WEATHER_PARAMETERS, Person, Server, check_weather

pytestmark = pytest.mark.e2e
MODEL = DEFAULT_MODEL_NAME
TINY = "tiny-side"

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                            "parameters": WEATHER_PARAMETERS}}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Current time in a time zone",
        "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 40}},
                       "required": ["zone"]},
    },
}
ASK = [{"role": "user", "content": "What is the weather in Paris right now?"}]


@pytest.fixture
def oai(default_server: Server) -> openai.OpenAI:
    return default_server.openai()


def test_parse_with_a_pydantic_model(oai: openai.OpenAI) -> None:
    completion = oai.chat.completions.parse(
        model=MODEL, messages=[{"role": "user", "content": "Invent a person: name, age and role."}],
        response_format=Person, temperature=0, max_tokens=80)
    person = completion.choices[0].message.parsed
    assert isinstance(person, Person), completion.choices[0].message.content


def test_json_schema_strict_and_json_object(oai: openai.OpenAI) -> None:
    schema = {"type": "object", "additionalProperties": False, "required": ["colors"],
              "properties": {"colors": {"type": "array", "items": {"type": "string", "maxLength": 20},
                                        "minItems": 1, "maxItems": 3}}}
    answer = oai.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Name some colors."}], temperature=0, max_tokens=60,
        response_format={"type": "json_schema", "json_schema": {"name": "colors", "schema": schema, "strict": True}})
    data = json.loads(answer.choices[0].message.content or "")
    assert set(data) == {"colors"} and 1 <= len(data["colors"]) <= 3
    assert all(isinstance(c, str) for c in data["colors"])
    anything = oai.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Describe a cat as JSON."}], temperature=0.7, seed=3,
        max_tokens=120, response_format={"type": "json_object"})
    if anything.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(anything.choices[0].message.content or ""), dict)


def test_tool_choice_required_named_and_auto(oai: openai.OpenAI) -> None:
    one = oai.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER, TIME], tool_choice="required",
                                      parallel_tool_calls=False, temperature=0, max_tokens=80)
    [call] = one.choices[0].message.tool_calls or []
    assert one.choices[0].finish_reason == "tool_calls" and call.id and call.type == "function"
    assert call.function.name in ("get_weather", "get_time")
    # parallel calls: a base model may go on calling until max_tokens; every whole call is valid
    several = oai.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER, TIME], tool_choice="required",
                                          temperature=0, max_tokens=120)
    calls = several.choices[0].message.tool_calls or []
    assert calls and several.choices[0].finish_reason in ("tool_calls", "length")
    for call in calls:
        assert call.function.name in ("get_weather", "get_time")
        if call.function.name == "get_weather":
            check_weather(call.function.arguments)
        else:
            assert set(json.loads(call.function.arguments)) == {"zone"}
    named = oai.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER, TIME], temperature=0,
                                        tool_choice={"type": "function", "function": {"name": "get_time"}},
                                        max_tokens=60)
    [call] = named.choices[0].message.tool_calls or []
    assert call.function.name == "get_time" and set(json.loads(call.function.arguments)) == {"zone"}
    auto = oai.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="auto",
                                       parallel_tool_calls=False, temperature=0, max_tokens=80)
    message = auto.choices[0].message
    if auto.choices[0].finish_reason == "tool_calls":
        assert message.tool_calls and all(c.function.name == "get_weather" for c in message.tool_calls)
        check_weather(message.tool_calls[0].function.arguments)
    else:  # the model chose to answer: plain text, no call markup leaking into it
        assert message.tool_calls is None and message.content and "tool_calls" not in message.content


def test_a_streamed_tool_call_assembles_into_the_whole_answer(oai: openai.OpenAI) -> None:
    whole = oai.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="required",
                                        temperature=0, max_tokens=80, parallel_tool_calls=False)
    calls: dict[int, dict[str, str]] = {}
    finish = None
    for chunk in oai.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="required",
                                             temperature=0, max_tokens=80, parallel_tool_calls=False, stream=True):
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        for piece in delta.tool_calls or []:
            call = calls.setdefault(piece.index, {"id": "", "name": "", "arguments": ""})
            call["id"] += piece.id or ""
            call["name"] += (piece.function.name or "") if piece.function else ""
            call["arguments"] += (piece.function.arguments or "") if piece.function else ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and list(calls) == [0]
    assert calls[0]["id"].startswith("call_") and calls[0]["name"] == "get_weather"
    [expected] = whole.choices[0].message.tool_calls or []
    assert check_weather(calls[0]["arguments"]) == json.loads(expected.function.arguments)


def test_a_tool_round_trip(oai: openai.OpenAI) -> None:
    first = oai.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="required",
                                        temperature=0, max_tokens=80)
    [call] = (first.choices[0].message.tool_calls or [])[:1]
    messages = [*ASK, first.choices[0].message.model_dump(exclude_none=True),
                {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21, "sky": "clear"}'}]
    answer = oai.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER], tool_choice="none",
                                         temperature=0, max_tokens=30)
    assert answer.choices[0].finish_reason in ("stop", "length")
    assert answer.choices[0].message.content and not answer.choices[0].message.tool_calls
    unanswered = oai.chat.completions.create(model=MODEL, messages=messages[:-1], tools=[WEATHER],
                                             tool_choice="none", temperature=0, max_tokens=1)
    assert answer.usage and unanswered.usage  # the call and its result both reach the prompt
    assert answer.usage.prompt_tokens > unanswered.usage.prompt_tokens + 10


def test_logprobs_whole_and_streamed(oai: openai.OpenAI) -> None:
    answer = oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Say hello."}],
                                         temperature=0, max_tokens=8, logprobs=True, top_logprobs=5)
    content = answer.choices[0].logprobs.content if answer.choices[0].logprobs else None
    assert content and answer.usage and len(content) == answer.usage.completion_tokens
    for token in content:
        assert token.logprob <= 0 and len(token.top_logprobs) == 5
        tops = [t.logprob for t in token.top_logprobs]
        assert tops == sorted(tops, reverse=True)
        assert token.top_logprobs[0].token == token.token  # greedy: the chosen token is the likeliest
    streamed = [lp for chunk in oai.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Say hello."}], temperature=0, max_tokens=8,
        logprobs=True, top_logprobs=5, stream=True)
        for choice in chunk.choices if choice.logprobs for lp in choice.logprobs.content or []]
    assert [t.token for t in streamed] == [t.token for t in content]
    legacy = oai.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=5, temperature=0, logprobs=3)
    lp = legacy.choices[0].logprobs
    assert lp and lp.tokens and len(lp.tokens) == len(lp.token_logprobs or []) == len(lp.top_logprobs or [])
    assert all(len(top) == 3 for top in lp.top_logprobs or [])


def test_models_retrieve(oai: openai.OpenAI) -> None:
    assert oai.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError) as info:
        oai.models.retrieve("no-such-model")
    assert "no-such-model" in str(info.value)


def test_langchain_bind_tools_and_structured_output(default_server: Server) -> None:
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    @tool
    def get_weather(city: str) -> str:
        """Current weather in a city."""
        return "sunny"

    chat = ChatOpenAI(model=MODEL, base_url=f"{default_server.url}/v1", api_key="none", temperature=0, max_tokens=80,
                      max_retries=0)
    message = chat.bind_tools([get_weather], tool_choice="any").invoke("What is the weather in Paris?")
    assert message.tool_calls and message.tool_calls[0]["name"] == "get_weather"
    assert isinstance(message.tool_calls[0]["args"].get("city"), str)
    person = chat.with_structured_output(Person, method="json_schema").invoke("Invent a person.")
    assert isinstance(person, Person)
    # streamed: langchain joins the tool-call entries of every chunk by index
    bound = chat.bind_tools([get_weather], tool_choice="any", parallel_tool_calls=False)
    whole = None
    for piece in bound.stream("What is the weather in Paris?"):
        whole = piece if whole is None else whole + piece
    assert whole is not None and not whole.invalid_tool_calls, whole.invalid_tool_calls
    assert [call["name"] for call in whole.tool_calls] == ["get_weather"]
    assert whole.tool_calls[0]["args"] == message.tool_calls[0]["args"]


BAD = [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"n": {"type": "integer", "multipleOf": 3}}}}}}, "multipleOf"),
    ({"grammar": "root ::= \"a\" | undefined_rule"}, "grammar"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "launch"}}}, "launch"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]}, "parameters"),
    ({"messages": [*ASK, {"role": "tool", "content": "42"}]}, "tool_call_id"),
    ({"messages": [*ASK, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{city: Paris"}}]}]},
     "arguments"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}]},
     "images are not supported"),
]


def test_bad_input_is_a_400_naming_the_field_while_another_stream_goes_on(default_server: Server) -> None:
    tokens: list[str] = []
    with default_server.http() as http, http.stream("POST", "/v1/completions", json={
            "model": MODEL, "prompt": "Once upon a time", "max_tokens": 300, "ignore_eos": True,
            "temperature": 0, "stream": True}) as stream:
        lines = stream.iter_lines()
        while len(tokens) < 3:
            line = next(lines)
            if line.startswith("data: {"):
                tokens.append(line)
        for extra, mentions in BAD:
            body = {"model": TINY, "messages": ASK, "max_tokens": 8, **extra}
            response = http.post("/v1/chat/completions", json=body)
            assert response.status_code == 400, (extra, response.text)
            error = response.json()["error"]
            assert mentions in error["message"], (mentions, error)
        before = len(tokens)
        for line in lines:
            if line.startswith("data: {"):
                tokens.append(line)
        assert len(tokens) > before + 10
        assert json.loads(tokens[-1][6:])["choices"][0]["finish_reason"] == "length"
