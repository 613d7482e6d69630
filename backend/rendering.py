"""From a `GenerationRequest` to what one loaded model runs, and from its raw text back.

`prepare` (blocking: Jinja, tokenizer, schema conversion) turns a request into prompt tokens,
the engine's `Decoding` (sampling, grammar, logprobs, stop tokens) and an `OutputParser`. The
parser splits the model's raw text into answer text, reasoning and tool calls by the model's
own formats, which only the loaded model's template can tell — so this runs per model, after
the lease, and every API dialect gets the same structured chunks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from . import reasoning as reasoning_formats
from . import toolcalls
from .generation import Chunk, Decoding, Grammar, SamplingParams
from .request import GenerationRequest
from .samplers import check_grammar
from .schema_grammar import json_object_grammar, schema_grammar
from .toolparse import new_parser

if TYPE_CHECKING:
    from .engine import Engine


@dataclass(frozen=True)
class Prepared:
    tokens: list[int]
    decoding: Decoding
    parser: OutputParser | None  # None: the raw text is the answer


def prepare(engine: Engine, request: GenerationRequest, params: SamplingParams,
            grammar: Grammar | None) -> Prepared:
    """Blocking: render and tokenize the prompt, build the tool grammar (`grammar` is the
    request's own, from `check_request`) and the output parser."""
    weights = engine.weights
    if request.messages is None:
        assert request.prompt is not None
        tokens = weights.tokenize(request.prompt, add_special=True)
        decoding = Decoding(params, grammar, request.logprobs, request.top_logprobs)
        return Prepared(tokens, decoding, None)
    template = engine.template
    assert template is not None
    messages = [m.template_dict() for m in request.messages]
    thinking = reasoning_formats.detect_reasoning(template.text)
    kwargs = reasoning_formats.template_kwargs(thinking, request.reasoning, request.reasoning_effort,
                                               request.template_kwargs)
    calls = bool(request.tools) and request.tool_choice.mode != "none"
    replayed = any(m.tool_calls or m.role == "tool" for m in request.messages)  # earlier calls, results
    fmt = toolcalls.detect_format(template.text) if calls or replayed else None
    tools: list[dict[str, Any]] | None = None
    if fmt is not None and not fmt.native:  # a template that knows no tools reads them as text
        messages = toolcalls.prepare_messages(fmt, messages, request.tools if calls else (), request.tool_choice)
    if fmt is not None and calls:
        if fmt.native:
            tools = [tool.template_dict() for tool in request.tools]
        grammar = toolcalls.tool_grammar(fmt, request.tools, request.tool_choice, request.parallel_tool_calls)
    else:
        fmt = None  # no calls to hold or parse
    prompt = template.render(messages, tools=tools, **kwargs)
    tokens = weights.tokenize(prompt, add_special=False)
    starts_thinking = thinking is not None and thinking.opened_by(prompt)
    if grammar is not None and thinking is not None and kwargs.get(reasoning_formats.SWITCH) is not False:
        grammar = thinking.allow_thinking(grammar, starts_thinking)  # a schema must not forbid thinking
    markers = [*(toolcalls.MARKERS[fmt] if fmt is not None else ()),
               *((thinking.start, thinking.end) if thinking is not None else ())]
    decoding = Decoding(params, grammar, request.logprobs, request.top_logprobs, weights.turn_tokens,
                        weights.control_tokens(markers) if markers else frozenset())
    parser = OutputParser.of(thinking, starts_thinking, fmt, request)
    return Prepared(tokens, decoding, parser)


def _format_grammar(request: GenerationRequest) -> Grammar | None:
    if request.grammar is not None:
        return Grammar(request.grammar)
    fmt = request.response_format
    if fmt.type == "json_schema" and fmt.schema is not None:
        return schema_grammar(fmt.schema, where="response_format.json_schema.schema")
    if fmt.type == "json_object":
        return schema_grammar(fmt.schema, where="response_format.schema") if fmt.schema else json_object_grammar()
    return None


def check_request(request: GenerationRequest) -> Grammar | None:
    """Blocking: refuse what can be refused before any model is touched (schemas the grammar
    cannot honour, GBNF that llama.cpp cannot parse); returns the request's own grammar."""
    grammar = _format_grammar(request)
    if request.grammar is not None and grammar is not None:
        check_grammar(grammar)
    for i, tool in enumerate(request.tools):
        schema_grammar(tool.parameters, where=f"tools[{i}].function.parameters")
    return grammar


class OutputParser:
    """Raw model text in, chunks with answer text, reasoning and tool-call deltas out."""

    def __init__(self, thinking: Any, calls: Any) -> None:
        self._thinking = thinking  # a reasoning splitter, or None
        self._calls = calls  # a tool-call parser, or None
        self.called = 0

    @classmethod
    def of(cls, thinking: reasoning_formats.ReasoningFormat | None, inside: bool,
           fmt: toolcalls.ToolFormat | None, request: GenerationRequest) -> OutputParser | None:
        splitter = thinking.splitter(inside) if thinking is not None else None
        calls = new_parser(fmt, request.tools) if fmt is not None else None
        if splitter is None and calls is None:
            return None
        return cls(splitter, calls)

    def chunk(self, raw: Chunk) -> Chunk:
        """`raw` with its text split; the final chunk also flushes what was held back."""
        final = raw.finish_reason is not None
        content, reasoning = raw.text, ""
        if self._thinking is not None:
            content, reasoning = self._thinking.feed(content)
            if final:
                more_content, more_reasoning = self._thinking.finish()
                content, reasoning = content + more_content, reasoning + more_reasoning
        deltas: list[Any] = []
        if self._calls is not None:
            content, deltas = self._calls.feed(content)
            if final:
                more, more_deltas = self._calls.finish()
                content, deltas = content + more, deltas + more_deltas
            self.called = self._calls.calls
        finish = raw.finish_reason
        if finish == "stop" and self.called:
            finish = "tool_calls"
        return replace(raw, text=content, reasoning=reasoning, tool_calls=tuple(deltas), finish_reason=finish)


def cache_payload(request: GenerationRequest) -> Any:
    """What besides the prompt and sampling decides a request's answer, for the cache key."""
    if request.messages is None:
        return [request.prompt, request.grammar, _json(request.response_format)]
    return {"messages": [m.template_dict() for m in request.messages],
            "tools": [t.template_dict() for t in request.tools], "tool_choice": _json(request.tool_choice),
            "parallel": request.parallel_tool_calls, "format": _json(request.response_format),
            "grammar": request.grammar, "reasoning": [request.reasoning, request.reasoning_effort],
            "template_kwargs": request.template_kwargs}


def _json(value: Any) -> Any:
    return json.loads(json.dumps(value, default=lambda v: getattr(v, "__dict__", repr(v))))

