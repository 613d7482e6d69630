"""One generation request, whatever API dialect it arrived in.

Every dialect (OpenAI chat and completions today; Anthropic Messages, OpenAI Responses and
ollama later) converts its wire JSON into a `GenerationRequest`, and the Python API builds
the same object from keyword arguments, so validation, defaults, templates, grammars and
output parsing exist once. Nothing here imports llama.cpp or a web framework.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from .errors import BadRequest
from .generation import sampling_params

ROLES = ("system", "user", "assistant", "tool")  # "developer" arrives as OpenAI's name for system
MAX_TOP_LOGPROBS = 20
REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high")


@dataclass(frozen=True)
class ToolCall:
    """A whole call in a message: what an assistant turn carries back into the next prompt."""

    id: str
    name: str
    arguments: str  # JSON text of an object, as the OpenAI wire format has it

    def template_dict(self) -> dict[str, Any]:
        """Hugging Face chat templates read `function.arguments` as a mapping, not text."""
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": json.loads(self.arguments)}}


@dataclass(frozen=True)
class Message:
    role: str  # one of ROLES
    content: str = ""
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None  # a tool message: the call it answers
    name: str | None = None  # a tool message: the function's name, where the client gives it
    reasoning: str | None = None  # an assistant turn's thinking, where a client sends it back

    def template_dict(self) -> dict[str, Any]:
        """The message as chat templates expect it (Hugging Face's conventions)."""
        out: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.tool_calls:
            out["tool_calls"] = [call.template_dict() for call in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            out["name"] = self.name
        if self.reasoning:
            out["reasoning_content"] = self.reasoning
        return out


@dataclass(frozen=True)
class Tool:
    """A function the model may call; `parameters` is a JSON schema of its arguments object."""

    name: str
    description: str = ""
    parameters: dict[str, Any] = field(default_factory=lambda: {"type": "object", "properties": {}})

    def template_dict(self) -> dict[str, Any]:
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}


@dataclass(frozen=True)
class ToolChoice:
    """`none`: never call; `auto`: the model decides; `required`: at least one call, of
    `function` only when it is named."""

    mode: Literal["none", "auto", "required"] = "auto"
    function: str | None = None


@dataclass(frozen=True)
class ResponseFormat:
    type: Literal["text", "json_object", "json_schema"] = "text"
    schema: dict[str, Any] | None = None  # json_schema only
    name: str | None = None
    strict: bool = False


# corral's own faces that reach a server through RemoteBackend: it names them in an X-Corral-Api
# header, so the server lists and counts a console's or a script's request as such rather than
# by the OpenAI route it travelled on.
OWN_APIS = ("console", "python")


@dataclass(frozen=True)
class GenerationRequest:
    """A chat (`messages`) or a plain completion (`prompt`), with everything that shapes the
    answer. `options` holds only the sampling options the caller set: the backend lays them
    over the model's and alias's configured defaults."""

    model: str
    messages: tuple[Message, ...] | None = None
    prompt: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    tools: tuple[Tool, ...] = ()
    tool_choice: ToolChoice = ToolChoice()
    parallel_tool_calls: bool = True
    response_format: ResponseFormat = ResponseFormat()
    grammar: str | None = None  # GBNF text: llama.cpp's grammar extension
    logprobs: bool = False
    top_logprobs: int = 0
    reasoning: bool | None = None  # None: as the template does by default; False: thinking off
    reasoning_effort: str | None = None
    template_kwargs: dict[str, Any] = field(default_factory=dict)
    keep_alive: float | str | None = None
    cache: bool = True
    request_id: str | None = None
    session_id: str | None = None
    api: str = "python"  # which API it came in by: "openai", "anthropic", "responses", ...

    @property
    def kind(self) -> str:
        return "chat" if self.messages is not None else "completion"

    @property
    def constrained(self) -> bool:
        """The output is held to a grammar (a schema, JSON, GBNF, or a required tool call)."""
        return (self.grammar is not None or self.response_format.type != "text"
                or (bool(self.tools) and self.tool_choice.mode != "none"))

    def with_options(self, **options: Any) -> GenerationRequest:
        return replace(self, options={**self.options, **{k: v for k, v in options.items() if v is not None}})

    def validate(self) -> None:
        """Everything that can be checked without the model: a 400 naming the field."""
        if (self.messages is None) == (self.prompt is None):
            raise BadRequest("a request has either messages (chat) or a prompt (completion)")
        if self.prompt is not None and not isinstance(self.prompt, str):
            raise BadRequest("prompt must be a string")
        if self.messages is not None:
            validate_messages(self.messages)
        sampling_params(self.options)  # names, types and limits; defaults come later
        if not isinstance(self.cache, bool):
            raise BadRequest(f"cache = {self.cache!r}: must be true or false")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise BadRequest(f"top_logprobs = {self.top_logprobs}: must be between 0 and {MAX_TOP_LOGPROBS}")
        if self.top_logprobs and not self.logprobs:
            raise BadRequest("top_logprobs needs logprobs: true")
        if self.reasoning_effort is not None and self.reasoning_effort not in REASONING_EFFORTS:
            raise BadRequest(f"reasoning_effort = {self.reasoning_effort!r}: must be one of "
                             f"{', '.join(REASONING_EFFORTS)}")
        names = [tool.name for tool in self.tools]
        for i, tool in enumerate(self.tools):
            if not tool.name or not isinstance(tool.name, str):
                raise BadRequest(f"tools[{i}].function.name is required")
            if names.count(tool.name) > 1:
                raise BadRequest(f"tools[{i}].function.name = {tool.name!r}: two tools have this name")
            if not isinstance(tool.parameters, dict) or tool.parameters.get("type", "object") != "object":
                raise BadRequest(f"tools[{i}].function.parameters: must be a JSON schema of an object "
                                 "(\"type\": \"object\")")
        if self.tool_choice.function is not None and self.tool_choice.function not in names:
            raise BadRequest(f"tool_choice names function {self.tool_choice.function!r}, which is not in tools"
                             + (f" ({', '.join(names)})" if names else " (no tools given)"))
        if self.tool_choice.mode == "required" and not self.tools:
            raise BadRequest("tool_choice = 'required' needs at least one tool in tools")
        if self.messages is None and self.tools:
            raise BadRequest("tools need a chat request (messages), not a prompt")
        if self.response_format.type == "json_schema" and not isinstance(self.response_format.schema, dict):
            raise BadRequest("response_format.json_schema.schema must be a JSON schema object")
        if self.grammar is not None and self.response_format.type != "text":
            raise BadRequest("give either grammar or response_format, not both")
        if self.grammar is not None and (not isinstance(self.grammar, str) or not self.grammar.strip()):
            raise BadRequest("grammar must be non-empty GBNF text")
        if self.tools and self.tool_choice.mode != "none" and (
                self.grammar is not None or self.response_format.type != "text"):
            raise BadRequest("tools cannot be combined with grammar or response_format; set tool_choice "
                             "to 'none' to use them")


def validate_messages(messages: Any) -> None:
    """Chat messages as the template will see them: roles listed once (ROLES), calls parsed."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise BadRequest("messages must be a non-empty list of {role, content} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, Message):
            raise BadRequest(f"messages[{i}] must be a message with role and content")
        if m.role not in ROLES:
            raise BadRequest(f"messages[{i}].role = {m.role!r}: must be one of {', '.join(ROLES)}")
        if not isinstance(m.content, str):
            raise BadRequest(f"messages[{i}].content must be a string")
        if m.role == "tool" and not m.tool_call_id:
            raise BadRequest(f"messages[{i}]: a tool message needs tool_call_id, the id of the call it answers")
        for j, call in enumerate(m.tool_calls):
            try:
                arguments = json.loads(call.arguments)
            except (TypeError, ValueError):
                raise BadRequest(f"messages[{i}].tool_calls[{j}].function.arguments is not JSON: "
                                 f"{call.arguments!r:.80}") from None
            if not isinstance(arguments, dict):
                raise BadRequest(f"messages[{i}].tool_calls[{j}].function.arguments must be a JSON object")


def message(value: Message | dict[str, Any], where: str = "messages[0]") -> Message:
    """A Message from the Python API's dict form ({"role", "content", "tool_calls", ...}),
    content as a string or a list of text parts, tool calls in OpenAI's shape."""
    if isinstance(value, Message):
        return value
    if not isinstance(value, dict):
        raise BadRequest(f"{where} must be an object with role and content")
    role = value.get("role")
    role = "system" if role == "developer" else role
    calls = []
    for j, call in enumerate(value.get("tool_calls") or ()):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise BadRequest(f"{where}.tool_calls[{j}] needs function.name and function.arguments")
        arguments = function.get("arguments", "{}")
        if not isinstance(arguments, str):
            arguments = json.dumps(arguments)
        calls.append(ToolCall(str(call.get("id") or f"call_{j}"), function["name"], arguments))
    return Message(role=role, content=content_text(value.get("content"), f"{where}.content"),
                   tool_calls=tuple(calls), tool_call_id=value.get("tool_call_id"), name=value.get("name"),
                   reasoning=value.get("reasoning_content"))


def content_text(value: Any, where: str = "content") -> str:
    """Message content: a string, null (an assistant turn that only calls tools), or a list of
    text parts. An image part is refused by name: no model here reads images yet."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = []
        for j, part in enumerate(value):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            if kind in ("image_url", "image", "input_image"):
                raise BadRequest(f"{where}[{j}] is an image; images are not supported yet, send text parts only")
            if kind not in ("text", "input_text", "output_text") or not isinstance(part.get("text"), str):
                raise BadRequest(f"{where}[{j}] is {kind!r}; only text parts ({{'type': 'text', 'text': ...}}) "
                                 "are supported")
            texts.append(part["text"])
        return "\n".join(texts)
    raise BadRequest(f"{where} must be a string or a list of text parts")


def tool(value: Tool | dict[str, Any], where: str = "tools[0]") -> Tool:
    """A Tool from OpenAI's {"type": "function", "function": {...}} (or the bare function)."""
    if isinstance(value, Tool):
        return value
    if not isinstance(value, dict):
        raise BadRequest(f"{where} must be an object")
    if value.get("type", "function") != "function":
        raise BadRequest(f"{where}.type = {value.get('type')!r}: only function tools are supported")
    function = value.get("function", value)
    if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
        raise BadRequest(f"{where}.function.name is required")
    parameters = function.get("parameters")
    if parameters is None:
        parameters = {"type": "object", "properties": {}}
    if not isinstance(parameters, dict):
        raise BadRequest(f"{where}.function.parameters must be a JSON schema object")
    description = function.get("description") or ""
    return Tool(function["name"], description if isinstance(description, str) else str(description), parameters)


def tool_choice(value: ToolChoice | str | dict[str, Any] | None) -> ToolChoice:
    """OpenAI's tool_choice: "none" | "auto" | "required" | {"type": "function", "function": {"name"}}."""
    if value is None:
        return ToolChoice()
    if isinstance(value, ToolChoice):
        return value
    if value in ("none", "auto", "required"):
        return ToolChoice(value)  # type: ignore[arg-type]
    if isinstance(value, dict):
        function = value.get("function")
        name = function.get("name") if isinstance(function, dict) else value.get("name")
        if isinstance(name, str) and name:
            return ToolChoice("required", name)
    raise BadRequest(f"tool_choice = {value!r}: must be 'none', 'auto', 'required' or "
                     "{'type': 'function', 'function': {'name': ...}}")


def response_format(value: ResponseFormat | dict[str, Any] | None) -> ResponseFormat:
    """OpenAI's response_format: {"type": "text" | "json_object" | "json_schema", "json_schema": {...}}."""
    if value is None:
        return ResponseFormat()
    if isinstance(value, ResponseFormat):
        return value
    if not isinstance(value, dict):
        raise BadRequest("response_format must be an object with a type")
    kind = value.get("type")
    if kind in ("text", "json_object"):
        schema = value.get("schema")  # llama-server's extension: json_object with a schema
        return ResponseFormat(kind, schema if isinstance(schema, dict) else None)
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise BadRequest("response_format.json_schema.schema is required: a JSON schema object")
        return ResponseFormat("json_schema", spec["schema"], spec.get("name"), bool(spec.get("strict", False)))
    raise BadRequest(f"response_format.type = {kind!r}: must be text, json_object or json_schema")


def chat_request(model: str, messages: list[Any] | tuple[Any, ...], **fields: Any) -> GenerationRequest:
    """A chat request from the Python API's keywords: request fields by name, the rest are
    sampling options."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise BadRequest("messages must be a non-empty list of {role, content} objects")
    converted = tuple(message(m, f"messages[{i}]") for i, m in enumerate(messages))
    return _request(model, fields, messages=converted)


def completion_request(model: str, prompt: str, **fields: Any) -> GenerationRequest:
    if not isinstance(prompt, str):
        raise BadRequest("prompt must be a string")
    return _request(model, fields, prompt=prompt)


_FIELDS = frozenset(GenerationRequest.__dataclass_fields__) - {"model", "messages", "prompt", "options"}


def _request(model: str, fields: dict[str, Any], **what: Any) -> GenerationRequest:
    known = {k: v for k, v in fields.items() if k in _FIELDS}
    options = {k: v for k, v in fields.items() if k not in _FIELDS and v is not None}
    if "tools" in known:
        known["tools"] = tuple(tool(t, f"tools[{i}]") for i, t in enumerate(known["tools"] or ()))
    if "tool_choice" in known:
        known["tool_choice"] = tool_choice(known["tool_choice"])
    if "response_format" in known:
        known["response_format"] = response_format(known["response_format"])
    if known.get("top_logprobs") is None:
        known.pop("top_logprobs", None)
    if known.get("template_kwargs") is None:
        known.pop("template_kwargs", None)
    for name in ("logprobs", "parallel_tool_calls", "cache"):
        if known.get(name) is None:
            known.pop(name, None)
    request = GenerationRequest(model=model, options=options, **what, **known)
    request.validate()
    return request
