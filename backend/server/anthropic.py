"""Anthropic's Messages dialect: pure conversion between its wire JSON and corral's one
generation request (`GenerationRequest`) and chunk stream (`Chunk`).

The server reads `/v1/messages` bodies into `GenerationRequest`s and dresses chunks as
Anthropic's message object and its named SSE events (`MessagesShape`); `RemoteBackend` writes
count_tokens bodies (`count_body`). Only pydantic and the standard library are imported.

Content blocks map onto corral's messages: `text` blocks are message text, an assistant's
`tool_use` blocks its tool calls and `thinking` blocks its reasoning, and each `tool_result`
block in a user turn becomes a `tool` message answering its call. An answer a stop string ended
has `stop_reason` "stop_sequence" and names it (its text is cut before it, as Anthropic does).
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..errors import BadRequest
from ..generation import MAX_STOP_CHARS, MAX_STOPS, Chunk, RequestStats, bounds, whole_calls
from ..request import GenerationRequest, Message, Tool, ToolCall, ToolChoice, content_text
from .openai import MAX_TOOLS

# corral's error codes (errors.py, middleware's HTTP codes) as Anthropic's error types
_ERROR_TYPES = {
    "invalid_request": "invalid_request_error", "invalid_config": "invalid_request_error",
    "model_file_invalid": "invalid_request_error", "model_unusable": "invalid_request_error",
    "method_not_allowed": "invalid_request_error", "unsupported_media_type": "invalid_request_error",
    "model_busy": "invalid_request_error", "model_pinned": "invalid_request_error",
    "unauthorized": "authentication_error", "forbidden": "permission_error",
    "not_found": "not_found_error", "model_not_found": "not_found_error",
    "request_too_large": "request_too_large", "queue_full": "rate_limit_error",
    "shutting_down": "overloaded_error", "server_unreachable": "overloaded_error",
}
# "cancelled" is corral's own: a request cancelled by id (or by an unload) ends as a message
# with what it had, not as an error, so a client keeps the partial answer and sees why it ended.
_STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use", "cancelled": "cancelled"}
_TOOL_CHOICES: dict[str, Literal["none", "auto", "required"]] = {"auto": "auto", "any": "required",
                                                                  "tool": "required", "none": "none"}


# -- request bodies ----------------------------------------------------------------------------


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


class MessageSpec(_Body):
    role: Literal["user", "assistant"]
    content: str | list[dict[str, Any]]


class ToolSpec(_Body):
    type: Literal["custom"] | None = None  # Anthropic's server tools (bash, web search...) are not served
    name: str = Field(min_length=1, max_length=256)
    description: str | None = None
    input_schema: dict[str, Any]


class ToolChoiceSpec(_Body):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = Field(None, min_length=1, max_length=256)
    disable_parallel_tool_use: bool = False

    def choice(self) -> ToolChoice:
        if self.type == "tool" and self.name is None:
            raise BadRequest("tool_choice.name is required when tool_choice.type is 'tool'")
        return ToolChoice(_TOOL_CHOICES[self.type], self.name if self.type == "tool" else None)


class ThinkingSpec(_Body):
    type: Literal["enabled", "disabled"]
    budget_tokens: int | None = Field(None, ge=1)  # accepted; thinking ends when the model ends it


class CountTokensRequest(_Body):
    """What a prompt is made of: the body of `/v1/messages/count_tokens`, and the base of a
    `/v1/messages` body."""

    model: str = Field(min_length=1, max_length=256)
    messages: list[MessageSpec] = Field(min_length=1)
    system: str | list[dict[str, Any]] | None = None
    tools: list[ToolSpec] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: ToolChoiceSpec | None = None
    thinking: ThinkingSpec | None = None

    def generation(self, request_id: str | None = None, session_id: str | None = None) -> GenerationRequest:
        system = content_text(self.system, "system") if self.system is not None else ""
        messages = [Message("system", system)] if system else []
        for i, spec in enumerate(self.messages):
            messages += _turn(spec, f"messages[{i}].content")
        choice = self.tool_choice
        return GenerationRequest(
            model=self.model, messages=tuple(messages), options=self.options(),
            tools=tuple(Tool(t.name, t.description or "", t.input_schema) for t in self.tools or ()),
            tool_choice=choice.choice() if choice else ToolChoice(),
            parallel_tool_calls=not (choice and choice.disable_parallel_tool_use),
            reasoning=None if self.thinking is None else self.thinking.type == "enabled",
            request_id=request_id, session_id=session_id, api="anthropic")

    def options(self) -> dict[str, Any]:
        """The sampling options the client set (none: counting samples nothing)."""
        return {}


class MessagesRequest(CountTokensRequest):
    max_tokens: int = Field(**bounds("max_tokens"))
    stop_sequences: list[Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]] | None = Field(
        None, max_length=MAX_STOPS)
    temperature: float | None = Field(None, **bounds("temperature"))
    top_p: float | None = Field(None, **bounds("top_p"))
    top_k: int | None = Field(None, **bounds("top_k"))
    stream: bool = False
    metadata: dict[str, Any] | None = None  # accepted (user_id); corral has its own session ids

    def options(self) -> dict[str, Any]:
        options: dict[str, Any] = {"max_tokens": self.max_tokens}
        for name in ("temperature", "top_p", "top_k"):
            if getattr(self, name) is not None:
                options[name] = getattr(self, name)
        if self.stop_sequences:
            options["stop"] = list(self.stop_sequences)
        return options

    def shape(self, request_id: str, session_id: str | None = None) -> MessagesShape:
        return MessagesShape(self.model, request_id)


def _turn(spec: MessageSpec, where: str) -> list[Message]:
    """One Anthropic turn as corral messages: a user turn's tool results become tool messages
    (in their order among its text), an assistant turn one message with its calls."""
    if isinstance(spec.content, str):
        return [Message(spec.role, spec.content)]
    if spec.role == "assistant":
        texts, calls, thoughts = [], [], []
        for j, block in enumerate(spec.content):
            kind = block.get("type")
            if kind == "tool_use":
                calls.append(_tool_use(block, f"{where}[{j}]"))
            elif kind == "thinking" and isinstance(block.get("thinking"), str):
                thoughts.append(block["thinking"])
            elif kind != "redacted_thinking":
                texts.append(content_text([block], f"{where}[{j}]"))
        return [Message("assistant", "\n".join(texts), tool_calls=tuple(calls), reasoning="\n".join(thoughts) or None)]
    messages: list[Message] = []
    texts = []
    for j, block in enumerate(spec.content):
        if block.get("type") == "tool_result":
            if texts:
                messages.append(Message("user", "\n".join(texts)))
                texts = []
            messages.append(_tool_result(block, f"{where}[{j}]"))
        else:
            texts.append(content_text([block], f"{where}[{j}]"))
    if texts or not messages:
        messages.append(Message("user", "\n".join(texts)))
    return messages


def _tool_use(block: dict[str, Any], where: str) -> ToolCall:
    id_, name, input_ = block.get("id"), block.get("name"), block.get("input")
    if not (isinstance(id_, str) and id_ and isinstance(name, str) and name and isinstance(input_, dict)):
        raise BadRequest(f"{where}: a tool_use block needs id and name (strings) and input (an object)")
    return ToolCall(id_, name, json.dumps(input_, ensure_ascii=False))


def _tool_result(block: dict[str, Any], where: str) -> Message:
    id_ = block.get("tool_use_id")
    if not isinstance(id_, str) or not id_:
        raise BadRequest(f"{where}.tool_use_id is required: the id of the tool_use block it answers")
    is_error = block.get("is_error", False)
    if not isinstance(is_error, bool):
        raise BadRequest(f"{where}.is_error must be true or false")
    text = content_text(block.get("content"), f"{where}.content")
    return Message("tool", f"Error: {text}" if is_error else text, tool_call_id=id_)


# -- answers -------------------------------------------------------------------------------------


def error_body(code: str, message: str, request_id: str | None) -> dict[str, Any]:
    """Anthropic's error shape (plus the request id, as Anthropic's own answers carry one)."""
    return {"type": "error", "error": {"type": _ERROR_TYPES.get(code, "api_error"), "message": message},
            "request_id": request_id}


def event(name: str, data: dict[str, Any]) -> str:
    return f"event: {name}\ndata: " + json.dumps({"type": name, **data}, ensure_ascii=False,
                                                 separators=(",", ":")) + "\n\n"


def usage(stats: RequestStats | None) -> dict[str, int]:
    return {"input_tokens": stats.prompt_tokens if stats else 0,
            "output_tokens": stats.completion_tokens if stats else 0}  # thinking tokens included


def _stop(last: Chunk) -> dict[str, str | None]:
    """`stop_reason` and `stop_sequence` of a finished answer."""
    sequence = last.stats.stop_sequence if last.stats else None
    if last.finish_reason == "stop" and sequence is not None:
        return {"stop_reason": "stop_sequence", "stop_sequence": sequence}
    return {"stop_reason": _STOP_REASONS[last.finish_reason or "stop"], "stop_sequence": None}


def _tool_input(arguments: str) -> dict[str, Any] | None:
    """A call's arguments as its `input`; None for a call cut off before its JSON was whole."""
    try:
        parsed = json.loads(arguments)
    except ValueError:
        return None
    return parsed if isinstance(parsed, dict) else None


class MessagesShape:
    """Anthropic's message object, or its stream of named events (`streams.Shape`). One per
    request: a stream's shape remembers which content block is open."""

    media_type = "text/event-stream"

    def __init__(self, model: str, request_id: str) -> None:
        self.model, self.id = model, f"msg_{request_id}"
        self.cache: str | None = None  # the response cache's verdict, from the request's first chunk
        self._started = False
        self._block: tuple[str, int] | None = None  # the open block: its kind (a call: its index)
        self._blocks = 0  # blocks opened so far

    def _message(self, content: list[dict[str, Any]], stop: dict[str, str | None],
                 stats: RequestStats | None) -> dict[str, Any]:
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.model, "content": content,
                **stop, "usage": usage(stats)}

    def whole(self, chunks: list[Chunk]) -> dict[str, Any]:
        content: list[dict[str, Any]] = []
        reasoning = "".join(c.reasoning for c in chunks)
        if reasoning:
            content.append({"type": "thinking", "thinking": reasoning, "signature": ""})
        text = "".join(c.text for c in chunks)
        if text:
            content.append({"type": "text", "text": text})
        for call in whole_calls(d for c in chunks for d in c.tool_calls):
            input_ = _tool_input(call.arguments)
            if input_ is not None:  # a call cut off by max_tokens is left out; stop_reason says why
                content.append({"type": "tool_use", "id": call.id or "", "name": call.name or "", "input": input_})
        last = chunks[-1]
        return self._message(content, _stop(last), last.stats)

    def piece(self, chunk: Chunk) -> str:
        out = self._start(None)
        if chunk.reasoning:
            out += self._delta(("thinking", 0), {"type": "thinking", "thinking": "", "signature": ""},
                               {"type": "thinking_delta", "thinking": chunk.reasoning})
        if chunk.text:
            out += self._delta(("text", 0), {"type": "text", "text": ""}, {"type": "text_delta", "text": chunk.text})
        for delta in chunk.tool_calls:
            opening = {"type": "tool_use", "id": delta.id or "", "name": delta.name or "", "input": {}}
            out += self._delta(("tool_use", delta.index), opening,
                               {"type": "input_json_delta", "partial_json": delta.arguments})
        return out

    def end(self, last: Chunk) -> str:
        if last.finish_reason == "error":
            return event("error", {"error": {"type": "api_error", "message": last.error or "generation failed"}})
        out = self._start(last.stats) + self.piece(last) + self._close()
        return (out + event("message_delta", {"delta": _stop(last),
                                              "usage": {"output_tokens": usage(last.stats)["output_tokens"]}})
                + event("message_stop", {}))

    def _start(self, stats: RequestStats | None) -> str:
        if self._started:
            return ""
        self._started = True
        return (event("message_start", {"message": self._message([], {"stop_reason": None, "stop_sequence": None},
                                                                  stats)})
                + event("ping", {}))

    def _delta(self, block: tuple[str, int], opening: dict[str, Any], delta: dict[str, Any]) -> str:
        out = ""
        if block != self._block:
            out = self._close() + event("content_block_start", {"index": self._blocks, "content_block": opening})
            self._block = block
            self._blocks += 1
        return out + event("content_block_delta", {"index": self._blocks - 1, "delta": delta})

    def _close(self) -> str:
        if self._block is None:
            return ""
        self._block = None
        return event("content_block_stop", {"index": self._blocks - 1})


# -- the other way: what RemoteBackend sends -----------------------------------------------------


def count_body(request: GenerationRequest) -> dict[str, Any]:
    """The count_tokens body of a chat request: the turns, tools and switches that shape its
    prompt (sampling does not)."""
    if request.messages is None:
        raise BadRequest("count_tokens counts a chat request's prompt (messages), not a plain prompt")
    system = "\n".join(m.content for m in request.messages if m.role == "system")
    turns: list[dict[str, Any]] = []
    for m in request.messages:
        if m.role == "system":
            continue
        if m.role == "tool":
            blocks = [{"type": "tool_result", "tool_use_id": m.tool_call_id, "content": m.content}]
        else:
            blocks = [{"type": "thinking", "thinking": m.reasoning, "signature": ""}] if m.reasoning else []
            blocks += [{"type": "text", "text": m.content}] if m.content else []
            blocks += [{"type": "tool_use", "id": c.id, "name": c.name, "input": json.loads(c.arguments)}
                       for c in m.tool_calls]
        role = "assistant" if m.role == "assistant" else "user"
        previous = turns[-1]["content"] if turns and turns[-1]["role"] == role == "user" else None
        if previous is not None and (m.role == "tool" or previous[-1:] and previous[-1]["type"] == "tool_result"):
            previous += blocks  # tool results and the text after them are one user turn
        else:
            turns.append({"role": role, "content": blocks})
    body: dict[str, Any] = {"model": request.model, "messages": turns}
    if system:
        body["system"] = system
    if request.tools:
        body["tools"] = [{"name": t.name, "description": t.description, "input_schema": t.parameters}
                         for t in request.tools]
    choice = request.tool_choice
    body["tool_choice"] = {"type": "tool", "name": choice.function} if choice.function else {
        "type": {"required": "any"}.get(choice.mode, choice.mode)}
    if not request.parallel_tool_calls:
        body["tool_choice"]["disable_parallel_tool_use"] = True
    if request.reasoning is not None:
        body["thinking"] = {"type": "enabled" if request.reasoning else "disabled"}
    return body
