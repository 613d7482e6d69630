"""OpenAI's Responses API through the unchanged official client against a real `corral serve` on
the default model (a base model with no chat template): whole and streamed answers, function
tools and their round trip, structured output, stored responses continued by
`previous_response_id`, and refusals that name the field.

A base model cannot be judged on what it says, so these tests check structure: output items,
usage, stream events that assemble into the whole answer, and what the grammar promises.
"""

from __future__ import annotations

import json
from pathlib import Path

import openai
import pytest

from corral.backend.catalog import DEFAULT_MODEL_NAME
from corral.backend.server.stored import Store, Stored
from support import WEATHER_PARAMETERS, Person, Server, check_weather, start_server, tiny_settings, write_config

pytestmark = pytest.mark.e2e
MODEL = DEFAULT_MODEL_NAME

WEATHER = {"type": "function", "name": "get_weather", "description": "Current weather in a city",
           "parameters": {**WEATHER_PARAMETERS, "additionalProperties": False}, "strict": True}
ASK = "What is the weather in Paris right now?"


@pytest.fixture
def oai(default_server: Server) -> openai.OpenAI:
    return default_server.openai()


def test_a_whole_answer_and_the_same_answer_streamed(oai: openai.OpenAI) -> None:
    whole = oai.responses.create(model=MODEL, input="Say hello.", instructions="Answer briefly.",
                                 temperature=0, max_output_tokens=16)
    assert whole.object == "response" and whole.id.startswith("resp_") and whole.model == MODEL
    assert whole.status in ("completed", "incomplete") and whole.output_text
    [message] = whole.output
    assert message.type == "message" and message.role == "assistant" and message.id.startswith("msg_")
    assert message.content[0].type == "output_text" and message.content[0].text == whole.output_text
    assert whole.usage and whole.usage.input_tokens > 0 and 0 < whole.usage.output_tokens <= 16
    assert whole.usage.total_tokens == whole.usage.input_tokens + whole.usage.output_tokens
    if whole.status == "incomplete":
        assert whole.incomplete_details and whole.incomplete_details.reason == "max_output_tokens"

    events = list(oai.responses.create(model=MODEL, input="Say hello.", instructions="Answer briefly.",
                                       temperature=0, max_output_tokens=16, stream=True))
    kinds = [e.type for e in events]
    final = "response.completed" if whole.status == "completed" else "response.incomplete"
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          final]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    last = events[-1].response  # type: ignore[union-attr]
    assert deltas == last.output_text == whole.output_text
    assert last.usage and last.usage.output_tokens == whole.usage.output_tokens

    with oai.responses.stream(model=MODEL, input="Say hello.", instructions="Answer briefly.", temperature=0,
                              max_output_tokens=16) as stream:
        seen = list(stream)
    texts = [e.delta for e in seen if e.type == "response.output_text.delta"]
    assert seen[-1].type == final  # get_final_response() is for completed ones only, as with OpenAI
    assert "".join(texts) == seen[-1].response.output_text == whole.output_text  # type: ignore[union-attr]


def test_a_function_tool_and_its_round_trip(oai: openai.OpenAI) -> None:
    first = oai.responses.create(model=MODEL, input=ASK, tools=[WEATHER], tool_choice="required",  # type: ignore[list-item]
                                 parallel_tool_calls=False, temperature=0, max_output_tokens=80)
    [call] = first.output
    assert call.type == "function_call" and call.name == "get_weather" and call.call_id
    assert call.id and call.id.startswith("fc_") and call.status == "completed" and first.status == "completed"
    check_weather(call.arguments)
    assert first.tools[0].type == "function" and first.tool_choice == "required"

    streamed = list(oai.responses.create(model=MODEL, input=ASK, tools=[WEATHER], tool_choice="required",  # type: ignore[list-item]
                                         parallel_tool_calls=False, temperature=0, max_output_tokens=80,
                                         stream=True))
    arguments = "".join(e.delta for e in streamed if e.type == "response.function_call_arguments.delta")
    [done] = [e for e in streamed if e.type == "response.function_call_arguments.done"]
    assert arguments == done.arguments == call.arguments

    answered = [{"role": "user", "content": ASK}, *[item.model_dump(exclude_none=True) for item in first.output],
                {"type": "function_call_output", "call_id": call.call_id, "output": '{"temperature": 21}'}]
    answer = oai.responses.create(model=MODEL, input=answered, tools=[WEATHER], tool_choice="none",  # type: ignore[arg-type, list-item]
                                  temperature=0, max_output_tokens=20)
    unanswered = oai.responses.create(model=MODEL, input=answered[:-1], tools=[WEATHER],  # type: ignore[arg-type, list-item]
                                      tool_choice="none", temperature=0, max_output_tokens=1)
    assert answer.output_text and all(item.type == "message" for item in answer.output)
    assert answer.usage and unanswered.usage  # the call and its result both reach the prompt
    assert answer.usage.input_tokens > unanswered.usage.input_tokens + 5


def test_structured_output(oai: openai.OpenAI) -> None:
    schema = {"type": "object", "additionalProperties": False, "required": ["colors"],
              "properties": {"colors": {"type": "array", "items": {"type": "string", "maxLength": 20},
                                        "minItems": 1, "maxItems": 3}}}
    answer = oai.responses.create(model=MODEL, input="Name some colors.", temperature=0, max_output_tokens=60,
                                  text={"format": {"type": "json_schema", "name": "colors", "schema": schema,
                                                   "strict": True}})
    data = json.loads(answer.output_text)
    assert set(data) == {"colors"} and 1 <= len(data["colors"]) <= 3
    assert answer.text and answer.text.format and answer.text.format.type == "json_schema"
    parsed = oai.responses.parse(model=MODEL, input="Invent a person: name, age and role.", text_format=Person,
                                 temperature=0, max_output_tokens=80)
    assert isinstance(parsed.output_parsed, Person), parsed.output_text


def test_stored_responses_continue_and_can_be_deleted(oai: openai.OpenAI) -> None:
    first = oai.responses.create(model=MODEL, input="My name is Ada.", temperature=0, max_output_tokens=8)
    assert oai.responses.retrieve(first.id).output_text == first.output_text
    alone = oai.responses.create(model=MODEL, input="What is my name?", temperature=0, max_output_tokens=8,
                                 store=False)
    second = oai.responses.create(model=MODEL, input="What is my name?", previous_response_id=first.id,
                                  temperature=0, max_output_tokens=8)
    assert second.previous_response_id == first.id and second.output_text
    assert first.usage and second.usage and alone.usage
    # the first turn, its answer and the new input all reach the prompt, and the slot's KV is reused
    assert second.usage.input_tokens >= first.usage.input_tokens + first.usage.output_tokens + alone.usage.input_tokens - 2
    assert second.usage.input_tokens_details.cached_tokens > 0
    with pytest.raises(openai.NotFoundError):
        oai.responses.retrieve(alone.id)  # store: false keeps nothing
    oai.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        oai.responses.retrieve(first.id)
    with pytest.raises(openai.NotFoundError, match="previous_response_id"):
        oai.responses.create(model=MODEL, input="Again?", previous_response_id=first.id, max_output_tokens=4)


def test_bad_bodies_are_refused_naming_the_field(oai: openai.OpenAI) -> None:
    bad = [({"input": [{"type": "function_call", "name": "f"}]}, "input[0].function_call.call_id"),
           ({"input": [{"type": "web_search_call"}]}, "input[0]"),
           ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "data:,"}]}]},
            "images are not supported yet"),
           ({"input": "hi", "tools": [{"type": "web_search"}]}, "tools[0].type"),
           ({"input": "hi", "max_output_tokens": 0}, "max_output_tokens"),
           ({"input": "hi", "text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format.schema"),
           ({"input": "hi", "tool_choice": "required"}, "tool_choice")]
    for fields, named in bad:
        with pytest.raises(openai.BadRequestError, match=named.replace("[", r"\[").replace("]", r"\]")):
            oai.responses.create(model=MODEL, **fields)  # type: ignore[call-overload]


def test_the_store_keeps_a_bounded_number_for_a_while() -> None:
    now = [0.0]
    store = Store(limit=2, ttl_s=10, clock=lambda: now[0])
    for name in ("a", "b", "c"):
        store.put(name, Stored({"id": name}, ()))
    assert store.get("a") is None and store.get("b") and store.get("c")  # the oldest went first
    now[0] = 5
    store.put("d", Stored({"id": "d"}, ()))
    now[0] = 10.5
    assert store.get("b") is None and store.get("c") is None and store.get("d")  # b and c outlived the TTL
    assert store.delete("d") and not store.delete("d")


def test_the_store_bounds_come_from_the_config(tmp_path: Path, tiny_models: Path) -> None:
    config = write_config(tmp_path / "corral.toml", tiny_settings(tiny_models, server={"responses_max": 1,
                                                                                          "responses_ttl": "1h"}))
    server = start_server(tmp_path, config)
    try:
        oai = server.openai()
        first, second = (oai.responses.create(model="tiny-a", input="hi", max_output_tokens=2) for _ in range(2))
        assert oai.responses.retrieve(second.id).id == second.id
        with pytest.raises(openai.NotFoundError, match="at most 1,"):
            oai.responses.retrieve(first.id)  # one is kept: the older went
    finally:
        assert server.stop() == 0, server.log()
