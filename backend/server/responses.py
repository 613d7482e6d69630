"""OpenAI's Responses dialect (`/v1/responses`): pure conversion between its wire JSON and
corral's one generation request (`GenerationRequest`) and chunk stream (`Chunk`), beside the
chat dialect in openai.py, whose body conventions, error shape and SSE lines it shares.

- Input items (messages, `function_call`, `function_call_output`, `reasoning`) become chat
  messages; `instructions` a leading system message; flat function tools, `tool_choice` and
  `text.format` the request's tools and response format.
- The answer is a list of output items (`reasoning`, a `message` with `output_text`,
  `function_call`s) built by one `_Output`, which both the whole answer and the stream use:
  a stream sends the same items as named SSE events (`event:` lines, `sequence_number`).
- `store` (OpenAI's default: true) keeps the response in memory (stored.py) for
  `GET`/`DELETE /v1/responses/{id}` and for `previous_response_id`, whose conversation (its
  input and its output, not its instructions) leads the next request's messages, so the
  next turn's prompt extends the last one and reuses the slot's KV cache.
"""

from __future__ import annotations

import copy
import time
import uuid
from dataclasses import replace
from functools import cached_property
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Discriminator, Field, PrivateAttr, Tag

from ..errors import BadRequest
from ..generation import Chunk, ToolCallDelta, bounds
from ..request import (GenerationRequest, Message, ResponseFormat, ToolCall, content_text, response_format, tool,
                       tool_choice)
from .openai import _TOOL_CHOICE, MAX_TOOLS, _Body, _duration, sse
from .stored import Store, Stored

# -- request bodies ----------------------------------------------------------------------------


class MessageItem(_Body):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: Any  # a string or a list of input_text / output_text parts; content_text reads it


class FunctionCallItem(_Body):
    type: Literal["function_call"]
    call_id: str = Field(min_length=1, max_length=256)
    name: str = Field(min_length=1, max_length=256)
    arguments: str  # JSON text of an object; request.validate_messages parses it


class FunctionCallOutputItem(_Body):
    type: Literal["function_call_output"]
    call_id: str = Field(min_length=1, max_length=256)
    output: Any  # a string or a list of text parts


class ReasoningItem(_Body):
    """An earlier answer's thinking, sent back: it rides on the next assistant turn."""

    type: Literal["reasoning"]
    content: list[dict[str, Any]] | None = None


def _item_type(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("type", "message")
    return getattr(value, "type", None)


InputItem = Annotated[
    Annotated[MessageItem, Tag("message")] | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")] | Annotated[ReasoningItem, Tag("reasoning")],
    Discriminator(_item_type, custom_error_type="item_type",
                  custom_error_message="must be an object whose type is message, function_call, "
                                       "function_call_output or reasoning")]


def _input_items(value: Any) -> Any:
    return [{"type": "message", "role": "user", "content": value}] if isinstance(value, str) else value


class FunctionTool(_Body):
    type: Literal["function"]
    name: str = Field(min_length=1, max_length=256)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class TextFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = Field(None, max_length=256)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None

    def format(self) -> ResponseFormat:
        if self.type != "json_schema":
            return response_format({"type": self.type})
        if self.schema_ is None:
            raise BadRequest("text.format.schema is required for type json_schema: a JSON schema object")
        return response_format({"type": "json_schema", "json_schema": {
            "name": self.name, "schema": self.schema_, "strict": bool(self.strict)}})


class TextConfig(_Body):
    format: TextFormat | None = None


class ReasoningConfig(_Body):
    effort: str | None = Field(None, max_length=32)


class ResponsesRequest(_Body):
    model: str = Field(min_length=1, max_length=256)
    input: Annotated[list[InputItem], BeforeValidator(_input_items), Field(min_length=1, max_length=100_000)]
    instructions: str | None = None
    tools: list[FunctionTool] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: Annotated[Any, _TOOL_CHOICE] = None
    parallel_tool_calls: bool = True
    text: TextConfig | None = None
    reasoning: ReasoningConfig | None = None
    max_output_tokens: int | None = Field(None, **bounds("max_tokens"))
    temperature: float | None = Field(None, **bounds("temperature"))
    top_p: float | None = Field(None, **bounds("top_p"))
    stream: bool = False
    store: bool = True
    previous_response_id: str | None = Field(None, min_length=1, max_length=256)
    metadata: dict[str, str] | None = Field(None, max_length=16)
    keep_alive: Annotated[float | None, BeforeValidator(_duration)] = None  # corral's, as in chat
    cache: bool = Field(True, description="false: neither read nor fill the response cache")
    _store: Store = PrivateAttr()  # the server's, given by `use` before anything reads it

    def use(self, store: Store) -> None:
        """Continue from, and store into, the server's `store`."""
        self._store = store

    @cached_property
    def history(self) -> tuple[Message, ...]:
        """The conversation this request continues (`previous_response_id`) and its input:
        what a stored response keeps, the answer added."""
        earlier: tuple[Message, ...] = ()
        if self.previous_response_id is not None:
            stored = self._store.get(self.previous_response_id)
            if stored is None:
                raise self._store.missing(self.previous_response_id, "previous_response_id: ")
            earlier = stored.conversation
        return earlier + _messages(self.input, earlier)

    def generation(self, request_id: str | None = None, session_id: str | None = None) -> GenerationRequest:
        options = {name: value for name, value in (("max_tokens", self.max_output_tokens),
                                                   ("temperature", self.temperature), ("top_p", self.top_p))
                   if value is not None}
        lead = (Message("system", self.instructions),) if self.instructions is not None else ()
        return GenerationRequest(
            model=self.model, messages=lead + self.history, options=options,
            tools=tuple(tool(t.model_dump(exclude_none=True), f"tools[{i}]") for i, t in enumerate(self.tools or ())),
            tool_choice=tool_choice(self.tool_choice), parallel_tool_calls=self.parallel_tool_calls,
            response_format=self.text.format.format() if self.text and self.text.format else ResponseFormat(),
            reasoning_effort=self.reasoning.effort if self.reasoning else None,
            keep_alive=self.keep_alive, cache=self.cache, request_id=request_id, session_id=session_id,
            api="responses")

    def shape(self, request_id: str, session_id: str | None) -> ResponsesShape:
        return ResponsesShape(self, request_id, session_id)


def _messages(items: list[Any], earlier: tuple[Message, ...]) -> tuple[Message, ...]:
    """Input items as chat messages: a call joins the assistant turn before it (parallel calls
    are one turn), a call's output names its function, thinking rides on the next assistant turn."""
    names = {call.id: call.name for m in earlier for call in m.tool_calls}
    out: list[Message] = []
    thinking: list[str] = []
    for i, item in enumerate(items):
        where = f"input[{i}]"
        if isinstance(item, ReasoningItem):
            thinking += [part["text"] for part in item.content or () if isinstance(part.get("text"), str)]
            continue
        if isinstance(item, FunctionCallOutputItem):
            out.append(Message("tool", content_text(item.output, f"{where}.output"), tool_call_id=item.call_id,
                               name=names.get(item.call_id)))
            continue
        if isinstance(item, FunctionCallItem):
            names[item.call_id] = item.name
            call = ToolCall(item.call_id, item.name, item.arguments)
            if out and out[-1].role == "assistant":
                out[-1] = replace(out[-1], tool_calls=out[-1].tool_calls + (call,))
                continue
            turn = Message("assistant", tool_calls=(call,))
        else:
            role = "system" if item.role == "developer" else item.role
            turn = Message(role, content_text(item.content, f"{where}.content"))
        if turn.role == "assistant" and thinking:
            turn, thinking = replace(turn, reasoning="\n".join(thinking)), []
        out.append(turn)
    return tuple(out)


# -- answers -------------------------------------------------------------------------------------


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def event(kind: str, data: dict[str, Any]) -> str:
    return f"event: {kind}\n" + sse(data)


class _Output:
    """An answer's output items, built chunk by chunk, and the stream events that build them
    (each a type and its fields, without the sequence number). One item is open at a time:
    text after thinking, or a call after text, closes the item before."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []
        self._open: dict[str, Any] | None = None
        self._calls: dict[int, dict[str, Any]] = {}  # a call's index among the answer's calls → its item

    def feed(self, chunk: Chunk) -> list[tuple[str, dict[str, Any]]]:
        events = []
        if chunk.reasoning:
            events += self._write("reasoning", chunk.reasoning)
        if chunk.text:
            events += self._write("message", chunk.text)
        for delta in chunk.tool_calls:
            events += self._call(delta)
        return events

    def close(self, status: str) -> list[tuple[str, dict[str, Any]]]:
        """The events that finish the open item; every item gets `status`."""
        events = self._finish(status) if self._open is not None else []
        for item in self.items:
            item["status"] = status
        return events

    def _write(self, kind: str, text: str) -> list[tuple[str, dict[str, Any]]]:
        events = []
        if self._open is None or self._open["type"] != kind:
            events += self._finish("completed") if self._open is not None else []
            if kind == "message":
                item = {"id": _id("msg"), "type": "message", "role": "assistant", "status": "in_progress",
                        "content": []}
                part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            else:
                item = {"id": _id("rs"), "type": "reasoning", "status": "in_progress", "summary": [], "content": []}
                part = {"type": "reasoning_text", "text": ""}
            events += self._add(item)
            item["content"].append(part)
            events.append(("response.content_part.added", {**self._where(item), "content_index": 0,
                                                           "part": dict(part)}))
        item = self._open
        assert item is not None
        item["content"][0]["text"] += text
        delta_type = "response.output_text.delta" if kind == "message" else "response.reasoning_text.delta"
        fields = {"logprobs": []} if kind == "message" else {}
        events.append((delta_type, {**self._where(item), "content_index": 0, "delta": text, **fields}))
        return events

    def _call(self, delta: ToolCallDelta) -> list[tuple[str, dict[str, Any]]]:
        events = []
        item = self._calls.get(delta.index)
        if item is None:
            events += self._finish("completed") if self._open is not None else []
            item = {"id": _id("fc"), "type": "function_call", "status": "in_progress",
                    "call_id": delta.id or _id("call"), "name": delta.name or "", "arguments": ""}
            self._calls[delta.index] = item
            events += self._add(item)
        if delta.arguments:
            item["arguments"] += delta.arguments
            events.append(("response.function_call_arguments.delta", {**self._where(item), "delta": delta.arguments}))
        return events

    def _add(self, item: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        self.items.append(item)
        self._open = item
        return [("response.output_item.added", {"output_index": len(self.items) - 1, "item": copy.deepcopy(item)})]

    def _finish(self, status: str) -> list[tuple[str, dict[str, Any]]]:
        item, self._open = self._open, None
        assert item is not None
        item["status"] = status
        where = self._where(item)
        if item["type"] == "function_call":
            events = [("response.function_call_arguments.done",
                       {**where, "name": item["name"], "arguments": item["arguments"]})]
        else:
            part = item["content"][0]
            done = "response.output_text.done" if item["type"] == "message" else "response.reasoning_text.done"
            fields = {"logprobs": []} if item["type"] == "message" else {}
            events = [(done, {**where, "content_index": 0, "text": part["text"], **fields}),
                      ("response.content_part.done", {**where, "content_index": 0, "part": dict(part)})]
        return events + [("response.output_item.done", {"output_index": where["output_index"],
                                                        "item": copy.deepcopy(item)})]

    def _where(self, item: dict[str, Any]) -> dict[str, Any]:
        return {"item_id": item["id"], "output_index": self.items.index(item)}

    def message(self) -> Message:
        """The answer as the assistant turn of the conversation it continues."""
        def text(kind: str) -> str:
            return "".join(i["content"][0]["text"] for i in self.items if i["type"] == kind)
        calls = tuple(ToolCall(i["call_id"], i["name"], i["arguments"]) for i in self.items
                      if i["type"] == "function_call")
        return Message("assistant", text("message"), calls, reasoning=text("reasoning") or None)


def usage(last: Chunk) -> dict[str, Any]:
    s = last.stats
    prompt, completion = (s.prompt_tokens, s.completion_tokens) if s else (0, 0)
    return {"input_tokens": prompt, "output_tokens": completion, "total_tokens": prompt + completion,
            "input_tokens_details": {"cached_tokens": s.cached_tokens if s else 0, "cache_write_tokens": 0},
            "output_tokens_details": {"reasoning_tokens": 0}}  # the engine does not count thinking apart


_STATUS = {"stop": "completed", "tool_calls": "completed", "length": "incomplete", "cancelled": "cancelled",
           "error": "failed"}
# Responses has no event of its own for a cancelled answer: it finished short, as an incomplete
# one does, and says "cancelled" in its status.
_FINAL_EVENT = {"completed": "response.completed", "incomplete": "response.incomplete",
                "cancelled": "response.incomplete"}  # else response.failed


class ResponsesShape:
    """A Responses answer, whole or streamed (`streams.Shape`); one per request."""

    media_type = "text/event-stream"

    def __init__(self, body: ResponsesRequest, request_id: str, session_id: str | None = None) -> None:
        self.body, self.request_id, self.session_id = body, request_id, session_id
        self.id = _id("resp")
        self.created = int(time.time())
        self.cache: str | None = None  # the response cache's verdict, from the request's first chunk
        self._output = _Output()
        self._sequence = 0
        self._started = False

    def piece(self, chunk: Chunk) -> str:
        return self._events(self._start() + self._output.feed(chunk))

    def end(self, last: Chunk) -> str:
        events = self._start() + self._output.feed(last)
        status = _STATUS[last.finish_reason or "error"]
        events += self._output.close("completed" if status == "completed" else "incomplete")
        response = self._finished(last, status)
        return self._events(events + [(_FINAL_EVENT.get(status, "response.failed"), {"response": response})])

    def whole(self, chunks: list[Chunk]) -> dict[str, Any]:
        for chunk in chunks:
            self._output.feed(chunk)
        last = chunks[-1]
        status = _STATUS[last.finish_reason or "error"]
        self._output.close("completed" if status == "completed" else "incomplete")
        return self._finished(last, status)

    def _start(self) -> list[tuple[str, dict[str, Any]]]:
        if self._started:
            return []
        self._started = True
        response = self._response("in_progress")
        return [("response.created", {"response": response}), ("response.in_progress", {"response": response})]

    def _events(self, events: list[tuple[str, dict[str, Any]]]) -> str:
        out = []
        for kind, fields in events:
            out.append(event(kind, {"type": kind, "sequence_number": self._sequence, **fields}))
            self._sequence += 1
        return "".join(out)

    def _finished(self, last: Chunk, status: str) -> dict[str, Any]:
        """The final response object, stored when the request asks and it ran to an end."""
        response = self._response(status, last)
        if self.body.store and status in ("completed", "incomplete"):
            self.body._store.put(self.id, Stored(response, self.body.history + (self._output.message(),)))
        return response

    def _response(self, status: str, last: Chunk | None = None) -> dict[str, Any]:
        body = self.body
        items = copy.deepcopy(self._output.items) if last is not None else []
        fmt = body.text.format.model_dump(by_alias=True, exclude_none=True) if body.text and body.text.format else {
            "type": "text"}
        response: dict[str, Any] = {
            "id": self.id, "object": "response", "created_at": self.created, "status": status,
            "completed_at": int(time.time()) if status == "completed" else None,
            "error": None, "incomplete_details": None, "instructions": body.instructions,
            "max_output_tokens": body.max_output_tokens, "model": body.model, "output": items,
            "output_text": "".join(part["text"] for item in items if item["type"] == "message"
                                   for part in item["content"]),
            "parallel_tool_calls": body.parallel_tool_calls, "previous_response_id": body.previous_response_id,
            "reasoning": {"effort": body.reasoning.effort if body.reasoning else None, "summary": None},
            "store": body.store, "temperature": body.temperature, "top_p": body.top_p,
            "text": {"format": fmt}, "tool_choice": body.tool_choice or "auto",
            "tools": [t.model_dump(exclude_none=True) for t in body.tools or ()], "truncation": "disabled",
            "metadata": body.metadata or {}, "usage": usage(last) if last is not None else None}
        if status == "incomplete":
            response["incomplete_details"] = {"reason": "max_output_tokens"}
        elif last is not None and (status == "failed" or last.error):  # a cancel by id is no error; an unload says why
            response["error"] = {"code": "server_error", "message": last.error or "generation failed"}
        return response
