"""The one generation request: what the Python API builds from keywords and what it refuses
before any model is touched, and sampling limits that mean the same everywhere."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from corral.backend.config import SamplingDefaults
from corral.backend.errors import BadRequest
from corral.backend.generation import LIMITS, SamplingParams, sampling_params
from corral.backend.request import Message, ToolChoice, chat_request, completion_request

TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}


@pytest.mark.parametrize(("name", "bad", "good"), [
    ("temperature", -0.5, 0.0), ("top_p", 0.0, 1.0), ("min_p", 1.5, 0.5), ("repeat_penalty", 0.0, 1.1),
    ("max_tokens", 0, 1), ("top_k", -1, 0),
])
def test_a_limit_means_the_same_in_config_requests_and_the_engine(name: str, bad: Any, good: Any) -> None:
    assert name in LIMITS
    with pytest.raises(ValidationError):
        SamplingDefaults(**{name: bad})
    with pytest.raises(BadRequest, match=name):
        sampling_params({name: bad})
    with pytest.raises(BadRequest, match=name):
        SamplingParams(**{name: bad}).validate()
    SamplingDefaults(**{name: good})
    sampling_params({name: good}).validate()


def test_keywords_split_into_request_fields_and_sampling_options() -> None:
    request = chat_request("m", [{"role": "developer", "content": "be brief"}, {"role": "user", "content": "hi"}],
                           tools=[TOOL], tool_choice="required", logprobs=True, top_logprobs=3,
                           temperature=0.2, max_tokens=9, stop=None)
    assert request.messages == (Message("system", "be brief"), Message("user", "hi"))
    assert request.tools[0].name == "f" and request.tool_choice == ToolChoice("required")
    assert (request.logprobs, request.top_logprobs) == (True, 3)
    assert request.options == {"temperature": 0.2, "max_tokens": 9}
    assert request.constrained and request.kind == "chat"
    assert completion_request("m", "x").kind == "completion"


@pytest.mark.parametrize(("fields", "mentions"), [
    ({"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "g"}}}, "'g', which is not in tools"),
    ({"tool_choice": "required"}, "needs at least one tool"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]}, "parameters"),
    ({"tools": [TOOL, TOOL]}, "two tools have this name"),
    ({"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
    ({"top_logprobs": 2}, "needs logprobs"),
    ({"reasoning_effort": "extreme"}, "reasoning_effort"),
    ({"grammar": "root ::= \"a\"", "response_format": {"type": "json_object"}}, "either grammar or response_format"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"temperature": "hot"}, "temperature"),
    ({"wobble": 1}, "unknown option"),
])
def test_bad_fields_are_refused_by_name(fields: dict[str, Any], mentions: str) -> None:
    with pytest.raises(BadRequest) as info:
        chat_request("m", [{"role": "user", "content": "hi"}], **fields)
    assert mentions in str(info.value)


def test_tools_need_a_chat() -> None:
    with pytest.raises(BadRequest, match="tools need a chat request"):
        completion_request("m", "x", tools=[TOOL])
