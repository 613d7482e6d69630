"""ollama's API dialect: pure conversion between its wire JSON and corral's one generation
request (`GenerationRequest`) and chunk stream (`Chunk`), and corral's model pictures as
ollama's model lists. Only pydantic and the standard library are imported.

- Streams are NDJSON, on by default (`"stream": false` gives one object); the last object
  has ollama's `done`, `done_reason` and timings in nanoseconds. A failure mid-stream is a
  line `{"error": ...}`, as ollama sends it.
- ollama's clients name models `name:tag`; corral's names have no tag, so `:latest` is dropped
  on the way in and added on the way out.
- `options` map onto corral's sampling options (`num_predict` is `max_tokens`). Options that
  only switch off something corral does not do (`mirostat: 0`, `typical_p: 1`, ...) are
  accepted; ones that would ask for it, and load-time ones that corral takes from its config,
  are a 400 naming the option and what to do instead, never silently ignored.
- ollama's tool calls carry no ids: each call gets one here, and a `tool` message answers the
  earliest unanswered call of its `tool_name` (or the earliest one).
"""

from __future__ import annotations

import json
import time
from abc import ABC, abstractmethod
from datetime import datetime, timezone
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from .. import gotemplate
from ..errors import BadRequest
from ..generation import MAX_TOKENS, Chunk, Embeddings, RequestStats, SamplingFields, TokenLogprob, whole_calls
from ..request import MAX_TOP_LOGPROBS, REASONING_EFFORTS, GenerationRequest, Message, ResponseFormat, ToolCall, tool
from ..snapshot import ModelDetails, ModelInfo
from .openai import MAX_TOOLS, KeepAlive, ToolSpec

VERSION = "0.12.6"  # the ollama API whose shapes this module follows; clients gate features on it
MEDIA_TYPE = "application/x-ndjson"
# "cancelled" (by id, or by an unload) ends the answer like ollama's own "unload": done, with
# what was generated, rather than an error line that would drop it.
_DONE_REASONS = {"stop": "stop", "length": "length", "tool_calls": "stop", "cancelled": "cancelled"}
_NEUTRAL = {"mirostat": 0, "tfs_z": 1.0, "typical_p": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0,
            "repeat_last_n": 64, "penalize_newline": False}  # values that switch the option off
_LOAD_TIME = {"num_batch": "n_batch", "num_gpu": "n_gpu_layers", "num_thread": "n_threads", "main_gpu": None,
              "numa": None, "low_vram": None, "f16_kv": None, "logits_all": None, "vocab_only": None,
              "use_mmap": None, "use_mlock": None, "embedding_only": None, "num_keep": None}
_FOREVER = "9999-12-31T23:59:59Z"  # expires_at of a model that never expires


# -- names and times -----------------------------------------------------------------------------


def model_name(wire: str) -> str:
    """corral's name for what an ollama client sends: `gemma-3-270m:latest` is `gemma-3-270m`."""
    return wire.removesuffix(":latest")


def tagged(name: str) -> str:
    """The name with ollama's tag: `:latest` where its last part has none (a registry's port,
    as in `localhost:5000/model`, is not a tag)."""
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


def timestamp(unix: float | None = None) -> str:
    """RFC 3339 in UTC, as ollama writes `created_at` and `modified_at`."""
    moment = datetime.now(timezone.utc) if unix is None else datetime.fromtimestamp(unix, timezone.utc)
    return moment.isoformat().replace("+00:00", "Z")


def _ns(seconds: float) -> int:
    return max(0, int(seconds * 1e9))


# -- request bodies ------------------------------------------------------------------------------


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


class Options(SamplingFields):
    """ollama's `options`: corral's sampling options under ollama's names, plus the ones it
    refuses by name (see the module docstring)."""

    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)

    num_predict: int | None = Field(None, ge=-2, le=MAX_TOKENS, description="-1 or -2: until the context is full")
    num_ctx: int | None = Field(None, ge=1, le=1 << 24)
    mirostat: int | None = None
    tfs_z: float | None = None
    typical_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repeat_last_n: int | None = None
    penalize_newline: bool | None = None
    num_batch: int | None = None
    num_gpu: int | None = None
    num_thread: int | None = None
    main_gpu: int | None = None
    numa: bool | None = None
    low_vram: bool | None = None
    f16_kv: bool | None = None
    logits_all: bool | None = None
    vocab_only: bool | None = None
    use_mmap: bool | None = None
    use_mlock: bool | None = None
    embedding_only: bool | None = None
    num_keep: int | None = None

    def sampling(self) -> dict[str, Any]:
        """The sampling options set, as corral's; a 400 for those corral cannot honour."""
        for name, neutral in _NEUTRAL.items():
            value = getattr(self, name)
            if value is not None and value != neutral:
                raise BadRequest(f"options.{name} = {value!r}: corral does not sample with {name}; remove it "
                                 f"or set {neutral!r} (off)")
        for name, key in _LOAD_TIME.items():
            if getattr(self, name) is not None:
                instead = (f"set {key} in the model's [[models]] entry or [defaults] of the config"
                           if key else "corral does not offer it")
                raise BadRequest(f"options.{name}: a load-time setting, not taken per request; {instead}")
        options = {name: getattr(self, name) for name in SamplingFields.model_fields if getattr(self, name) is not None}
        if self.num_predict is not None:
            options["max_tokens"] = MAX_TOKENS if self.num_predict < 0 else self.num_predict
        return options


class _Generation(_Body):
    model: str = Field(min_length=1, max_length=256)
    stream: bool = True
    format: Literal["", "json"] | dict[str, Any] | None = None
    options: Options | None = None
    keep_alive: KeepAlive = None
    think: bool | Literal["low", "medium", "high"] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    images: list[Any] | None = None

    @property
    def name(self) -> str:
        return model_name(self.model)

    def _generation(self, request_id: str | None, session_id: str | None, **what: Any) -> GenerationRequest:
        if self.images:
            raise BadRequest("images: images are not supported yet; send text only")
        fmt = self.format
        if fmt == "json":
            response_format = ResponseFormat("json_object")
        elif isinstance(fmt, dict):
            response_format = ResponseFormat("json_schema", fmt)
        else:
            response_format = ResponseFormat()
        think = self.think
        return GenerationRequest(
            model=self.name, options=self.options.sampling() if self.options else {},
            response_format=response_format, logprobs=bool(self.logprobs), top_logprobs=self.top_logprobs or 0,
            reasoning=None if think is None else think is not False,
            reasoning_effort=think if isinstance(think, str) and think in REASONING_EFFORTS else None,
            keep_alive=self.keep_alive, request_id=request_id, session_id=session_id, api="ollama", **what)


class FunctionCall(_Body):
    name: str = Field(min_length=1, max_length=256)
    arguments: dict[str, Any] | str = Field(default_factory=dict)


class CallSpec(_Body):
    id: str | None = Field(None, max_length=256)
    function: FunctionCall


class MessageSpec(_Body):
    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    thinking: str | None = None
    images: list[Any] | None = None
    tool_calls: list[CallSpec] | None = Field(None, max_length=MAX_TOOLS)
    tool_name: str | None = Field(None, max_length=256)
    tool_call_id: str | None = Field(None, max_length=256)


class ChatRequest(_Generation):
    messages: list[MessageSpec] = Field(default_factory=list, max_length=100_000)
    tools: list[ToolSpec] | None = Field(None, max_length=MAX_TOOLS)

    @property
    def empty(self) -> bool:
        """Nothing to generate: the request only loads (or, with keep_alive 0, unloads) the model."""
        return not self.messages

    def generation(self, request_id: str | None = None, session_id: str | None = None) -> GenerationRequest:
        return self._generation(
            request_id, session_id, messages=_messages(self.messages),
            tools=tuple(tool(t.model_dump(exclude_none=True), f"tools[{i}]") for i, t in enumerate(self.tools or ())))

    def shape(self, request_id: str, session_id: str | None = None) -> ChatShape:
        return ChatShape(self.model)


class GenerateRequest(_Generation):
    prompt: str = ""
    system: str | None = None
    template: str | None = None
    raw: bool = False
    suffix: str | None = None
    context: list[int] | None = None

    @property
    def empty(self) -> bool:
        return not self.prompt and not self.images

    def generation(self, request_id: str | None = None, session_id: str | None = None) -> GenerationRequest:
        if self.suffix:
            raise BadRequest("suffix: fill-in-the-middle is not supported yet; send the prompt only")
        if self.context:
            raise BadRequest("context: continuing from token context is not supported; send the conversation "
                             "to /api/chat as messages")
        if self.raw and (self.system or self.template):
            raise BadRequest("raw: a raw prompt is sent as it is, so system and template cannot be used with it")
        if self.raw:
            return self._generation(request_id, session_id, prompt=self.prompt)
        if self.template is not None:
            prompt = gotemplate.render(self.template, {"System": self.system or "", "Prompt": self.prompt})
            return self._generation(request_id, session_id, prompt=prompt)
        turns = ([Message("system", self.system)] if self.system else []) + [Message("user", self.prompt)]
        return self._generation(request_id, session_id, messages=tuple(turns))

    def shape(self, request_id: str, session_id: str | None = None) -> GenerateShape:
        return GenerateShape(self.model)


class ShowRequest(_Body):
    model: str | None = Field(None, min_length=1, max_length=256)
    name: str | None = Field(None, min_length=1, max_length=256)  # the older field
    verbose: bool = False

    @property
    def target(self) -> str:
        given = self.model or self.name
        if given is None:
            raise BadRequest("model is required: the name of the model to show")
        return model_name(given)


class EmbedRequest(_Body):
    model: str = Field(min_length=1, max_length=256)
    input: str | list[str] = Field(min_length=1)
    truncate: bool = True
    dimensions: int | None = Field(None, ge=1)
    options: Options | None = None
    keep_alive: KeepAlive = None

    def inputs(self) -> list[str]:
        if self.dimensions is not None:
            raise BadRequest("dimensions: vectors come at the model's own size; leave dimensions out")
        if self.options is not None:
            self.options.sampling()  # refuses what corral cannot honour; none of it shapes a vector
        inputs = [self.input] if isinstance(self.input, str) else self.input
        if len(inputs) > 2048:
            raise BadRequest(f"input: at most 2048 texts per request, got {len(inputs)}")
        return inputs


class EmbeddingsRequest(_Body):
    """The older `/api/embeddings`: one prompt, one vector."""

    model: str = Field(min_length=1, max_length=256)
    prompt: str = Field(min_length=1)
    options: Options | None = None
    keep_alive: KeepAlive = None


def _messages(specs: list[MessageSpec]) -> tuple[Message, ...]:
    """ollama's turns as corral's, with ids given to calls and tool results matched to them."""
    messages: list[Message] = []
    pending: list[ToolCall] = []  # calls of the last assistant turn not answered yet
    for i, spec in enumerate(specs):
        if spec.images:
            raise BadRequest(f"messages[{i}].images: images are not supported yet; send text only")
        if spec.role == "assistant":
            calls = tuple(_call(call, f"call_{i}_{j}", f"messages[{i}].tool_calls[{j}]")
                          for j, call in enumerate(spec.tool_calls or ()))
            pending = list(calls)
            messages.append(Message("assistant", spec.content, tool_calls=calls, reasoning=spec.thinking))
        elif spec.role == "tool":
            answered = _answered(pending, spec, i)
            messages.append(Message("tool", spec.content, tool_call_id=answered.id, name=answered.name))
        else:
            messages.append(Message(spec.role, spec.content))
    return tuple(messages)


def _call(spec: CallSpec, default_id: str, where: str) -> ToolCall:
    arguments = spec.function.arguments
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            raise BadRequest(f"{where}.function.arguments is not JSON: {arguments!r:.80}") from None
        if not isinstance(arguments, dict):
            raise BadRequest(f"{where}.function.arguments must be an object")
    return ToolCall(spec.id or default_id, spec.function.name, json.dumps(arguments, ensure_ascii=False))


def _answered(pending: list[ToolCall], spec: MessageSpec, i: int) -> ToolCall:
    """The call a tool message answers (removed from `pending`)."""
    for call in pending:
        if spec.tool_call_id == call.id or (spec.tool_call_id is None and spec.tool_name in (None, call.name)):
            pending.remove(call)
            return call
    named = f" of {spec.tool_name!r}" if spec.tool_name else ""
    raise BadRequest(f"messages[{i}]: a tool message must answer a call{named} made by the assistant message "
                     "before it (tool_calls)")


# -- answers -------------------------------------------------------------------------------------


def error_body(code: str, message: str, request_id: str | None) -> dict[str, Any]:
    """ollama's error shape: one string."""
    return {"error": message}


def line(data: dict[str, Any]) -> str:
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")) + "\n"


def timings(stats: RequestStats | None, total_s: float) -> dict[str, int]:
    """ollama's counts and durations (ns). `load_duration` is the time before the engine took
    the request (loading the model included); prompt evaluation runs from then to the first
    token."""
    if stats is None:
        return {"total_duration": _ns(total_s), "load_duration": 0, "prompt_eval_count": 0,
                "prompt_eval_duration": 0, "eval_count": 0, "eval_duration": 0}
    first = stats.ttft_s if stats.ttft_s is not None else stats.duration_s
    return {"total_duration": _ns(total_s), "load_duration": _ns(total_s - stats.duration_s),
            "prompt_eval_count": stats.prompt_tokens, "prompt_eval_duration": _ns(first - stats.queue_wait_s),
            "eval_count": stats.completion_tokens, "eval_duration": _ns(stats.duration_s - first)}


def _logprobs(logprobs: tuple[TokenLogprob, ...]) -> list[dict[str, Any]]:
    return [{"token": p.token, "logprob": p.logprob,
             "top_logprobs": [{"token": t.token, "logprob": t.logprob} for t in p.top]} for p in logprobs]


def _calls(chunks: list[Chunk]) -> list[dict[str, Any]]:
    """The whole calls of an answer; a call cut off before its JSON was whole is left out."""
    out = []
    for call in whole_calls(d for c in chunks for d in c.tool_calls):
        try:
            arguments = json.loads(call.arguments)
        except ValueError:
            continue
        if isinstance(arguments, dict):
            out.append({"id": call.id or "", "function": {"index": call.index, "name": call.name or "",
                                                          "arguments": arguments}})
    return out


class _Shape(ABC):
    """An answer as ollama's objects, whole or as NDJSON (`streams.Shape`). One per request:
    it keeps when the request began and, streaming, the tool-call pieces until calls are whole."""

    media_type = MEDIA_TYPE

    def __init__(self, model: str) -> None:
        self.model = model
        self.began = time.perf_counter()
        self.cache: str | None = None
        self._calls: list[Chunk] = []

    def _object(self, content: Chunk, calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """One object of the answer, without its `done` fields."""
        data: dict[str, Any] = {"model": self.model, "created_at": timestamp(), **self._content(content, calls)}
        if content.logprobs:
            data["logprobs"] = _logprobs(content.logprobs)
        return data

    @abstractmethod
    def _content(self, chunk: Chunk, calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """The answer's own fields: a chat's message, a generation's response."""

    def piece(self, chunk: Chunk) -> str:
        if chunk.tool_calls:
            self._calls.append(chunk)
        return line({**self._object(chunk), "done": False}) if chunk.text or chunk.reasoning or chunk.logprobs else ""

    def end(self, last: Chunk) -> str:
        if last.finish_reason == "error":
            return line({"error": last.error or "generation failed"})
        out = self.piece(last)
        calls = _calls(self._calls)
        if calls:
            out += line({**self._object(Chunk(""), calls), "done": False})
        return out + line(self._final(Chunk(""), last))

    def whole(self, chunks: list[Chunk]) -> dict[str, Any]:
        joined = Chunk("".join(c.text for c in chunks), reasoning="".join(c.reasoning for c in chunks),
                       logprobs=tuple(p for c in chunks for p in c.logprobs))
        return self._final(joined, chunks[-1], _calls(chunks))

    def _final(self, content: Chunk, last: Chunk, calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        return {**self._object(content, calls), "done": True, "done_reason": _DONE_REASONS.get(last.finish_reason or "stop", "stop"),
                **timings(last.stats, time.perf_counter() - self.began)}


class ChatShape(_Shape):
    def _content(self, chunk: Chunk, calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": chunk.text}
        if chunk.reasoning:
            message["thinking"] = chunk.reasoning
        if calls:
            message["tool_calls"] = calls
        return {"message": message}


class GenerateShape(_Shape):
    def _content(self, chunk: Chunk, calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        data: dict[str, Any] = {"response": chunk.text}
        if chunk.reasoning:
            data["thinking"] = chunk.reasoning
        return data


def load_answer(request: ChatRequest | GenerateRequest, reason: Literal["load", "unload"]) -> dict[str, Any]:
    """The answer to a request with nothing to generate, which only loaded or unloaded the model."""
    return {**request.shape("")._object(Chunk("")), "done": True, "done_reason": reason}


def embed_answer(model: str, result: Embeddings, total_s: float) -> dict[str, Any]:
    return {"model": model, "embeddings": result.vectors, "total_duration": _ns(total_s), "load_duration": 0,
            "prompt_eval_count": result.prompt_tokens}


# -- the model list ------------------------------------------------------------------------------


def _size_text(parameters: int | None) -> str:
    if not parameters:
        return ""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if parameters >= scale:
            return f"{parameters / scale:.1f}{unit}" if unit == "B" else f"{parameters / scale:.0f}{unit}"
    return str(parameters)


def details(d: ModelDetails) -> dict[str, Any]:
    family = d.architecture or ""
    return {"parent_model": tagged(d.alias_of) if d.alias_of else "", "format": "gguf", "family": family,
            "families": [family] if family else None, "parameter_size": _size_text(d.parameters),
            "quantization_level": d.quantization or ""}


def tag(d: ModelDetails) -> dict[str, Any]:
    """One model of `/api/tags`; `corral` says where the model's file is and which source
    (a folder, the config, ollama's or another tool's store) listed it."""
    return {"name": tagged(d.name), "model": tagged(d.name), "modified_at": timestamp(d.modified_at or 0),
            "size": d.file_size or 0, "digest": d.digest or "", "details": details(d),
            "corral": {"source": d.source, "path": d.path}}


def running(info: ModelInfo, d: ModelDetails) -> dict[str, Any]:
    """One loaded model of `/api/ps`; `expires_at` is when its keep-alive runs out."""
    if info.ttl_left_s is not None:
        expires = timestamp(time.time() + info.ttl_left_s)
    elif info.pinned or info.keep_alive_s < 0:
        expires = _FOREVER
    else:  # busy: the keep-alive starts over when its requests end
        expires = timestamp(time.time() + info.keep_alive_s)
    size = info.measured_bytes or info.estimate_bytes or d.file_size or 0
    vram = sum((info.measured_vram or {}).values())
    return {**tag(d), "size": size, "size_vram": vram, "expires_at": expires, "context_length": info.n_ctx}


def capabilities(d: ModelDetails) -> list[str]:
    """What the model does (`ModelDetails.kind`): an embedding model embeds, a reranker (which
    ollama has no word for) ranks; others complete, and call tools (corral holds any model's
    tool calls to their schemas)."""
    return {"embedding": ["embedding"], "rerank": ["rerank"]}.get(d.kind or "", ["completion", "tools"])


def show(d: ModelDetails) -> dict[str, Any]:
    """`/api/show`. The template is the one corral renders chats with (the GGUF's, or config's);
    a model from ollama's store also shows its manifest's parameters and system prompt."""
    answer = {"license": str(d.metadata.get("general.license", "")),
              "modelfile": f"# corral serves this model from its GGUF file\nFROM {d.path or ''}\n",
              "parameters": _parameters(d.store.params) if d.store else "", "template": d.chat_template or "",
              "details": details(d), "model_info": d.metadata, "capabilities": capabilities(d),
              "modified_at": timestamp(d.modified_at or 0)}
    if d.store is not None and d.store.system:
        answer["system"] = d.store.system
    return answer


def _parameters(params: dict[str, Any]) -> str:
    """A params layer as ollama's show prints it: one `name value` line per value, strings quoted."""
    values = [(name, item) for name, value in params.items()
              for item in (value if isinstance(value, list) else [value])]
    return "\n".join(f"{name:<30} {json.dumps(item) if isinstance(item, str) else item}" for name, item in values)
