"""OpenAI's chat and completions dialect: pure conversion between its wire JSON and corral's
one generation request (`GenerationRequest`) and chunk stream (`Chunk`).

Both directions live here. The server reads request bodies into `GenerationRequest`s and
dresses chunks as OpenAI's whole answers and SSE chunks (`ChatShape`, `CompletionShape`);
`RemoteBackend` writes request bodies (`wire_body`) and reads the SSE chunks back
(`chunk_from_wire`). Only pydantic and the standard library are imported, never a web
framework, so the remote backend and the console on it stay free of FastAPI.

Bodies are strict (no "5" for 5, no true for 1) and ignore unknown fields, as OpenAI clients
send many. Shapes that request.py already reads (messages, tools, tool_choice,
response_format) are checked for their types here and converted there, so a message, a tool
or a format has one reading whichever dialect it came in.
"""

from __future__ import annotations

import base64
import json
import math
import struct
import time
from abc import ABC, abstractmethod
from dataclasses import replace
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema

from ..config import parse_duration
from ..errors import BadRequest
from ..generation import (Chunk, Embeddings, RequestStats, SamplingFields, TokenLogprob, ToolCallDelta, TopLogprob,
                          bounds, whole_calls)
from ..request import (MAX_TOP_LOGPROBS, GenerationRequest, Message, ResponseFormat, message, response_format, tool,
                       tool_choice)
from ..respcache import HIT, STALE

MAX_TOOLS = 128  # OpenAI's own limit
DONE = "data: [DONE]\n\n"


# -- request bodies ----------------------------------------------------------------------------


def _one_prompt(value: Any) -> Any:
    if isinstance(value, list):
        if len(value) != 1 or not isinstance(value[0], str):
            raise ValueError("must be a string or a list holding exactly one string")
        return value[0]
    return value


def _duration(value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError("must be a number of seconds or a duration such as '5m' (-1: forever)")
    seconds = parse_duration(value)
    if not math.isfinite(seconds):
        raise ValueError("must be finite")
    return seconds


KeepAlive = Annotated[float | None, BeforeValidator(_duration)]  # a request's keep_alive, in seconds


def _input_list(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


# Fields whose value request.py reads (it names the field in its errors); the schemas tell a
# client or a fuzzer what the wire allows.
_CONTENT = WithJsonSchema({"anyOf": [
    {"type": "string"}, {"type": "null"},
    {"type": "array", "items": {"type": "object", "required": ["type", "text"],
                                "properties": {"type": {"const": "text"}, "text": {"type": "string"}}}}]})
_TOOL_CHOICE = WithJsonSchema({"anyOf": [
    {"enum": ["none", "auto", "required"]},
    {"type": "object", "required": ["type", "function"],
     "properties": {"type": {"const": "function"},
                    "function": {"type": "object", "required": ["name"],
                                 "properties": {"name": {"type": "string"}}}}}]})


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


class FunctionCallSpec(_Body):
    name: str = Field(min_length=1, max_length=256)
    arguments: str  # JSON text of an object; request.validate_messages parses it


class ToolCallSpec(_Body):
    id: str = Field(min_length=1, max_length=256)
    type: Literal["function"] = "function"
    function: FunctionCallSpec


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Annotated[Any, _CONTENT] = None
    name: str | None = Field(None, max_length=256)
    tool_calls: list[ToolCallSpec] | None = Field(None, max_length=MAX_TOOLS)
    tool_call_id: str | None = Field(None, max_length=256)
    reasoning_content: str | None = None

    def message(self, where: str) -> Message:
        return message(self.model_dump(exclude_none=True), where)


class FunctionSpec(_Body):
    name: str = Field(min_length=1, max_length=256)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolSpec(_Body):
    type: Literal["function"] = "function"
    function: FunctionSpec


class JsonSchemaSpec(_Body):
    name: str | None = Field(None, max_length=256)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormatSpec(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")  # llama-server's json_object with a schema

    def format(self) -> ResponseFormat:
        return response_format(self.model_dump(by_alias=True, exclude_none=True))


class StreamOptions(_Body):
    include_usage: bool = False  # accepted; usage always rides on the last chunk


class _Generation(_Body, SamplingFields):
    model: str = Field(min_length=1, max_length=256)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_completion_tokens: int | None = Field(None, **bounds("max_tokens"))
    ignore_eos: bool | None = None
    keep_alive: KeepAlive = None
    n: int | None = Field(None, ge=1, le=1, description="only one choice per request")
    cache: bool = Field(True, description="false: neither read nor fill the response cache")
    grammar: str | None = Field(None, description="GBNF text (llama.cpp's extension)")
    response_format: ResponseFormatSpec | None = None

    def options(self) -> dict[str, Any]:
        """The sampling options the client set, so the backend's defaults apply to the rest."""
        options: dict[str, Any] = {}
        max_tokens = self.max_completion_tokens or self.max_tokens
        if max_tokens is not None:
            options["max_tokens"] = max_tokens
        for name in (*(f for f in SamplingFields.model_fields if f != "max_tokens"), "ignore_eos"):
            value = getattr(self, name)
            if value is not None:
                options[name] = value
        return options

    def _generation(self, request_id: str | None, session_id: str | None, **what: Any) -> GenerationRequest:
        return GenerationRequest(
            model=self.model, options=self.options(), grammar=self.grammar,
            response_format=self.response_format.format() if self.response_format else ResponseFormat(),
            keep_alive=self.keep_alive, cache=self.cache, request_id=request_id, session_id=session_id, api="openai",
            **what)


class ChatRequest(_Generation):
    messages: list[ChatMessage] = Field(min_length=1, max_length=100_000)
    tools: list[ToolSpec] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: Annotated[Any, _TOOL_CHOICE] = None
    parallel_tool_calls: bool | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    reasoning_effort: str | None = Field(None, max_length=32)
    chat_template_kwargs: dict[str, Any] | None = None

    def generation(self, request_id: str | None = None, session_id: str | None = None) -> GenerationRequest:
        kwargs = self.chat_template_kwargs or {}
        thinking = kwargs.get("enable_thinking")
        return self._generation(
            request_id, session_id,
            messages=tuple(m.message(f"messages[{i}]") for i, m in enumerate(self.messages)),
            tools=tuple(tool(t.model_dump(exclude_none=True), f"tools[{i}]") for i, t in enumerate(self.tools or ())),
            tool_choice=tool_choice(self.tool_choice), parallel_tool_calls=self.parallel_tool_calls is not False,
            logprobs=bool(self.logprobs), top_logprobs=self.top_logprobs or 0,
            reasoning=thinking if isinstance(thinking, bool) else None, reasoning_effort=self.reasoning_effort,
            template_kwargs=dict(kwargs))

    def shape(self, request_id: str, session_id: str | None) -> ChatShape:
        return ChatShape(self.model, request_id, session_id)


class CompletionRequest(_Generation):
    prompt: Annotated[str, BeforeValidator(_one_prompt)]
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS,
                                 description="the legacy form: log-probabilities with this many alternatives")

    def generation(self, request_id: str | None = None, session_id: str | None = None) -> GenerationRequest:
        return self._generation(request_id, session_id, prompt=self.prompt, logprobs=self.logprobs is not None,
                                top_logprobs=self.logprobs or 0)

    def shape(self, request_id: str, session_id: str | None) -> CompletionShape:
        return CompletionShape(self.model, request_id, session_id)


class EmbeddingRequest(_Body):
    model: str = Field(min_length=1, max_length=256)
    input: Annotated[list[str], BeforeValidator(_input_list), Field(min_length=1, max_length=2048)]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    keep_alive: KeepAlive = None


# -- answers -------------------------------------------------------------------------------------


def error_body(code: str, message: str, request_id: str | None) -> dict[str, Any]:
    """OpenAI's error shape (plus the request id); corral's admin API answers errors in it too."""
    return {"error": {"message": message, "type": code, "code": code, "request_id": request_id}}


def sse(data: dict[str, Any]) -> str:
    return "data: " + json.dumps(data, ensure_ascii=False, separators=(",", ":")) + "\n\n"


def usage(stats: RequestStats | None) -> dict[str, Any]:
    prompt = stats.prompt_tokens if stats else 0
    completion = stats.completion_tokens if stats else 0  # reasoning tokens included
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": stats.cached_tokens if stats else 0}}


class _Shape(ABC):
    """How one OpenAI endpoint dresses an answer, whole or streamed (`streams.Shape`). One per
    request: a stream's shape remembers what it already sent."""

    media_type = "text/event-stream"
    prefix = whole_object = chunk_object = ""

    def __init__(self, model: str, request_id: str, session_id: str | None = None,
                 created: int | None = None) -> None:
        self.model, self.request_id, self.session_id = model, request_id, session_id
        self.id = f"{self.prefix}-{request_id}"
        self.created = int(time.time()) if created is None else created
        self.cache: str | None = None  # the response cache's verdict, from the request's first chunk

    def piece(self, chunk: Chunk) -> str:
        return sse(self.chunk_dict(chunk))

    def end(self, last: Chunk) -> str:
        return sse(self.final_dict(last)) + DONE

    def chunk_dict(self, chunk: Chunk) -> dict[str, Any]:
        return {**self._base(self.chunk_object), "choices": [self._delta_choice(chunk)]}

    def final_dict(self, last: Chunk) -> dict[str, Any]:
        data = {**self.chunk_dict(last), "usage": usage(last.stats), "corral": self._corral(last)}
        if last.finish_reason == "error":
            data["error"] = error_body("generation_failed", last.error or "generation failed", self.request_id)["error"]
        return data

    def whole(self, chunks: list[Chunk]) -> dict[str, Any]:
        last = chunks[-1]
        return {**self._base(self.whole_object), "choices": [self._whole_choice(chunks)],
                "usage": usage(last.stats), "corral": self._corral(last)}

    def _base(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def _corral(self, last: Chunk) -> dict[str, Any]:
        s = last.stats
        return {"request_id": self.request_id, "session_id": self.session_id,
                "queue_wait_s": s.queue_wait_s if s else None, "ttft_s": s.ttft_s if s else None,
                "duration_s": s.duration_s if s else None, "tokens_per_s": s.tokens_per_s if s else None,
                "cache": self.cache, "stop_sequence": s.stop_sequence if s else None}

    @abstractmethod
    def _delta_choice(self, chunk: Chunk) -> dict[str, Any]:
        """The choice of one streamed chunk."""

    @abstractmethod
    def _whole_choice(self, chunks: list[Chunk]) -> dict[str, Any]:
        """The choice of the whole answer, from all of its chunks."""


class ChatShape(_Shape):
    prefix, whole_object, chunk_object = "chatcmpl", "chat.completion", "chat.completion.chunk"
    _first = True  # until the first piece is sent: it carries the role

    def _delta_choice(self, chunk: Chunk) -> dict[str, Any]:
        delta: dict[str, Any] = {"role": "assistant"} if self._first else {}
        self._first = False
        if chunk.text:
            delta["content"] = chunk.text
        if chunk.reasoning:
            delta["reasoning_content"] = chunk.reasoning
        if chunk.tool_calls:
            delta["tool_calls"] = _call_entries(chunk.tool_calls)
        return {"index": 0, "delta": delta, "logprobs": _chat_logprobs(chunk.logprobs),
                "finish_reason": chunk.finish_reason}

    def _whole_choice(self, chunks: list[Chunk]) -> dict[str, Any]:
        text = "".join(c.text for c in chunks)
        reasoning = "".join(c.reasoning for c in chunks)
        calls = whole_calls(d for c in chunks for d in c.tool_calls)
        message: dict[str, Any] = {"role": "assistant", "content": text if text or not calls else None}
        if calls:
            message["tool_calls"] = [{"id": call.id or "", "type": "function",
                                      "function": {"name": call.name or "", "arguments": call.arguments}}
                                     for call in calls]
        if reasoning:
            message["reasoning_content"] = reasoning
        return {"index": 0, "message": message, "logprobs": _chat_logprobs([t for c in chunks for t in c.logprobs]),
                "finish_reason": chunks[-1].finish_reason}


class CompletionShape(_Shape):
    prefix, whole_object, chunk_object = "cmpl", "text_completion", "text_completion"
    _offset = 0  # where the next token starts in the answer's text

    def _delta_choice(self, chunk: Chunk) -> dict[str, Any]:
        return {"index": 0, "text": chunk.text, "logprobs": self._legacy_logprobs(chunk.logprobs),
                "finish_reason": chunk.finish_reason}

    def _whole_choice(self, chunks: list[Chunk]) -> dict[str, Any]:
        return {"index": 0, "text": "".join(c.text for c in chunks),
                "logprobs": self._legacy_logprobs([t for c in chunks for t in c.logprobs]),
                "finish_reason": chunks[-1].finish_reason}

    def _legacy_logprobs(self, tokens: tuple[TokenLogprob, ...] | list[TokenLogprob]) -> dict[str, Any] | None:
        """The completions API's own shape: parallel lists, alternatives as {token: logprob}."""
        if not tokens:
            return None
        offsets = []
        for token in tokens:
            offsets.append(self._offset)
            self._offset += len(token.token)
        return {"tokens": [t.token for t in tokens], "token_logprobs": [t.logprob for t in tokens],
                "top_logprobs": [{top.token: top.logprob for top in t.top} for t in tokens], "text_offset": offsets}


def _call_entries(deltas: tuple[ToolCallDelta, ...]) -> list[dict[str, Any]]:
    """OpenAI's stream entries for a chunk's call pieces: one entry per call and chunk (pieces
    of one call are joined), the first of a call with its id, type and name. Clients such as
    langchain merge entries by index across chunks and break on two of one index in a chunk."""
    entries: list[dict[str, Any]] = []
    for delta in whole_calls(deltas):
        if delta.id is None and delta.name is None:
            entries.append({"index": delta.index, "function": {"arguments": delta.arguments}})
        else:
            entries.append({"index": delta.index, "id": delta.id, "type": "function",
                            "function": {"name": delta.name, "arguments": delta.arguments}})
    return entries


def _chat_logprobs(tokens: tuple[TokenLogprob, ...] | list[TokenLogprob]) -> dict[str, Any] | None:
    if not tokens:
        return None
    return {"content": [{"token": t.token, "logprob": t.logprob, "bytes": list(t.bytes),
                         "top_logprobs": [{"token": top.token, "logprob": top.logprob, "bytes": list(top.bytes)}
                                          for top in t.top]} for t in tokens]}


def model_card(name: str, kind: str | None) -> dict[str, Any]:
    """OpenAI's model object, and what the model serves (chat, embedding or rerank; null when its
    header is unread), as llama-server adds its own fields beside OpenAI's."""
    return {"id": name, "object": "model", "created": 0, "owned_by": "corral", "kind": kind}


def embedding_response(body: EmbeddingRequest, result: Embeddings) -> dict[str, Any]:
    if body.dimensions is not None and result.vectors and body.dimensions != len(result.vectors[0]):
        raise BadRequest(f"dimensions = {body.dimensions}: model {body.model!r} gives "
                         f"{len(result.vectors[0])}-dimensional vectors and cannot shorten them")
    data = [{"object": "embedding", "index": i, "embedding": _encode(vector, body.encoding_format)}
            for i, vector in enumerate(result.vectors)]
    return {"object": "list", "model": body.model, "data": data,
            "usage": {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens}}


def _encode(vector: list[float], encoding: str) -> list[float] | str:
    """base64 is what the official OpenAI client asks for by default: little-endian float32."""
    if encoding == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
    return vector


# -- the other way: what RemoteBackend sends and reads -------------------------------------------


def wire_body(request: GenerationRequest) -> tuple[str, dict[str, Any]]:
    """The path and body that ask a server for `request`; only what differs from the
    defaults is sent, so the server's defaults apply as they would in-process."""
    body: dict[str, Any] = {"model": request.model}
    chat = request.messages is not None
    if request.messages is not None:
        body["messages"] = [_message_wire(m) for m in request.messages]
    else:
        body["prompt"] = request.prompt
    for name, value in request.options.items():
        body[name] = list(value) if isinstance(value, tuple) else value
    if request.tools:
        body["tools"] = [t.template_dict() for t in request.tools]
    choice = request.tool_choice
    if choice.function is not None:
        body["tool_choice"] = {"type": "function", "function": {"name": choice.function}}
    elif choice.mode != "auto":
        body["tool_choice"] = choice.mode
    if not request.parallel_tool_calls:
        body["parallel_tool_calls"] = False
    if request.response_format.type != "text":
        body["response_format"] = _format_wire(request.response_format)
    if request.grammar is not None:
        body["grammar"] = request.grammar
    if request.logprobs and chat:
        body["logprobs"] = True
        if request.top_logprobs:
            body["top_logprobs"] = request.top_logprobs
    elif request.logprobs:
        body["logprobs"] = request.top_logprobs
    kwargs = dict(request.template_kwargs)
    if request.reasoning is not None:
        kwargs.setdefault("enable_thinking", request.reasoning)
    if kwargs and chat:
        body["chat_template_kwargs"] = kwargs
    if request.reasoning_effort is not None:
        body["reasoning_effort"] = request.reasoning_effort
    if request.keep_alive is not None:
        body["keep_alive"] = request.keep_alive
    if request.cache is not True:
        body["cache"] = request.cache
    return ("/v1/chat/completions" if chat else "/v1/completions"), body


def _message_wire(m: Message) -> dict[str, Any]:
    out: dict[str, Any] = {"role": m.role, "content": m.content}
    if m.tool_calls:
        out["tool_calls"] = [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                             for c in m.tool_calls]
    for key, value in (("tool_call_id", m.tool_call_id), ("name", m.name), ("reasoning_content", m.reasoning)):
        if value is not None:
            out[key] = value
    return out


def _format_wire(fmt: ResponseFormat) -> dict[str, Any]:
    if fmt.type == "json_schema":
        spec: dict[str, Any] = {"schema": fmt.schema, "strict": fmt.strict}
        if fmt.name is not None:
            spec["name"] = fmt.name
        return {"type": "json_schema", "json_schema": spec}
    return {"type": fmt.type, **({"schema": fmt.schema} if fmt.schema is not None else {})}


def chunk_from_wire(data: dict[str, Any], chat: bool) -> Chunk:
    """One streamed chunk (chat or completions) as a `Chunk`; the final one carries corral's stats."""
    choice = (data.get("choices") or [{}])[0]
    if chat:
        delta = choice.get("delta") or {}
        text, reasoning = delta.get("content") or "", delta.get("reasoning_content") or ""
        calls = _calls_from_wire(delta.get("tool_calls") or ())
        logprobs = tuple(_logprob_from_wire(t) for t in (choice.get("logprobs") or {}).get("content") or ())
    else:
        text, reasoning, calls = choice.get("text") or "", "", ()
        logprobs = _legacy_from_wire(choice.get("logprobs"))
    reason = choice.get("finish_reason")
    stats = None
    usage_, extra = data.get("usage"), data.get("corral")
    # A request that never ran (cancelled while queued) has no stats: the server then sends
    # zero usage and null timings, and the local backend gives `stats=None` for it.
    if reason is not None and usage_ and extra and extra.get("duration_s") is not None:
        stats = RequestStats(prompt_tokens=int(usage_.get("prompt_tokens", 0)),
                             completion_tokens=int(usage_.get("completion_tokens", 0)),
                             queue_wait_s=float(extra.get("queue_wait_s") or 0.0),
                             ttft_s=extra.get("ttft_s"),
                             duration_s=float(extra.get("duration_s") or 0.0),
                             cached_tokens=int((usage_.get("prompt_tokens_details") or {}).get("cached_tokens", 0)),
                             cached=extra.get("cache") in (HIT, STALE), stop_sequence=extra.get("stop_sequence"))
    error = data.get("error")
    message_ = (error.get("message") if isinstance(error, dict) else str(error)) if error else None
    return Chunk(text, reason, stats, message_, reasoning=reasoning, tool_calls=calls, logprobs=logprobs)


def _calls_from_wire(entries: list[dict[str, Any]]) -> tuple[ToolCallDelta, ...]:
    """Call pieces from a chunk's entries; arguments that follow their call's opening entry
    in the same chunk join it."""
    calls: list[ToolCallDelta] = []
    for entry in entries:
        function = entry.get("function") or {}
        call = ToolCallDelta(int(entry["index"]), entry.get("id"), function.get("name"),
                             function.get("arguments") or "")
        if calls and calls[-1].index == call.index and call.id is None and call.name is None:
            calls[-1] = replace(calls[-1], arguments=calls[-1].arguments + call.arguments)
        else:
            calls.append(call)
    return tuple(calls)


def _logprob_from_wire(data: dict[str, Any]) -> TokenLogprob:
    return TokenLogprob(data["token"], float(data["logprob"]), tuple(data.get("bytes") or ()),
                        tuple(TopLogprob(t["token"], float(t["logprob"]), tuple(t.get("bytes") or ()))
                              for t in data.get("top_logprobs") or ()))


def _legacy_from_wire(data: dict[str, Any] | None) -> tuple[TokenLogprob, ...]:
    """The completions shape has no bytes: they are the tokens' UTF-8."""
    if not data:
        return ()
    tops = data.get("top_logprobs") or [{}] * len(data["tokens"])
    return tuple(TokenLogprob(token, float(logprob), tuple(token.encode()),
                              tuple(TopLogprob(t, float(lp), tuple(t.encode())) for t, lp in top.items()))
                 for token, logprob, top in zip(data["tokens"], data["token_logprobs"], tops))
