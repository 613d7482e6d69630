"""`corral serve`: the backend over HTTP — OpenAI-compatible /v1/*, the admin /api/*, /health, /metrics.

The wire format is fixed by a separate contract (the remote backend is written against it), so
this module owns no policy of its own: every error is a `CorralError` mapped by its own
`http_status` and `code`, and every route is a thin translation to one Backend call.

Three things need care beyond translation, and each is handled here rather than left to the
framework, because the framework's defaults are wrong for a model server:

- Clients leave. Starlette notices a streaming client's disconnect and cancels the body, which
  closes the backend stream and frees the engine slot at its next step; a non-streaming
  handler, though, would keep generating for nobody, so it races the generation against the
  connection's `http.disconnect` and cancels the generation when the client goes.
- Bad input never becomes a 500. Pydantic models with strict types and bounds reject it with
  a 400 naming the field; anything unexpected becomes a generic 500 (logged with its
  traceback) and the process keeps serving.
- Shutdown ends streams. uvicorn's `Server.run()` re-raises SIGTERM (exit 143) and waits
  forever on open SSE streams, so `serve()` runs `Server.serve()` under its own signal
  handling: health turns 503, event streams end, in-flight generations get a bounded grace,
  then the backend is closed, which ends whatever still runs with a final "cancelled" chunk.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import json
import logging
import math
import re
import signal
import socket
import struct
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, TypeVar

from fastapi import APIRouter, Depends, FastAPI, Header, Query, Request
from fastapi import HTTPException as FastAPIHTTPException
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .api import Backend
from .config import parse_duration
from .errors import (BadRequest, CorralError, GenerationFailed, ModelNotFound, NotFound, QueueFull, ShuttingDown,
                     Unauthorized)
from .events import Event, wait_event
from .generation import Chunk
from .metrics import CONTENT_TYPE, UNKNOWN_MODEL, Metrics

log = logging.getLogger("corral.server")

T = TypeVar("T")

MAX_BODY_BYTES = 8 << 20  # far above any prompt that fits a context; stops memory abuse
MAX_TOKENS = 1 << 20
PING_INTERVAL_S = 15.0  # keeps proxies from closing an idle /api/events stream
DEFAULT_GRACE_S = 10.0
_ID_PATTERN = re.compile(r"[A-Za-z0-9._:\-]{1,128}")  # ids are echoed in headers and logs


# -- errors of the HTTP layer ----------------------------------------------------------------


class _ClientGone(Exception):
    """The client disconnected while its request was running."""


_HTTP_CODES = {400: "invalid_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
               405: "method_not_allowed", 413: "request_too_large", 415: "unsupported_media_type"}


# -- request bodies --------------------------------------------------------------------------


def _content_text(value: Any) -> Any:
    """OpenAI content: a string, null (assistant turns with tool calls), or a list of text parts."""
    if value is None:
        return ""
    if isinstance(value, list):
        texts = []
        for j, part in enumerate(value):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise ValueError(f"part [{j}] is {kind!r}; only text parts ({{'type': 'text', 'text': ...}}) "
                                 "are supported")
            texts.append(part["text"])
        return "\n".join(texts)
    return value


def _stop_list(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


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


def _input_list(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


class _Body(BaseModel):
    """Strict types (no "5" for 5, no true for 1) and extra fields ignored, as OpenAI clients send many."""

    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Annotated[str, BeforeValidator(_content_text)] = ""

    def as_dict(self) -> dict[str, str]:
        # OpenAI's "developer" role is its newer name for system instructions.
        return {"role": "system" if self.role == "developer" else self.role, "content": self.content}


class StreamOptions(_Body):
    include_usage: bool = False  # accepted; usage always rides on the last chunk


class _Generation(_Body):
    model: str = Field(min_length=1, max_length=256)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    temperature: float | None = Field(None, ge=0, le=100)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, le=MAX_TOKENS)
    min_p: float | None = Field(None, ge=0, le=1)
    repeat_penalty: float | None = Field(None, gt=0, le=10)
    seed: int | None = Field(None, ge=-(1 << 63), le=(1 << 64) - 1)
    stop: Annotated[Annotated[list[Annotated[str, Field(min_length=1, max_length=1024)]], Field(max_length=16)]
                    | None, BeforeValidator(_stop_list)] = None
    ignore_eos: bool | None = None
    keep_alive: Annotated[float | None, BeforeValidator(_duration)] = None
    n: int | None = Field(None, ge=1, le=1, description="only one choice per request")
    cache: bool = Field(True, description="false: neither read nor fill the response cache")

    def sampling(self) -> dict[str, Any]:
        """The backend's sampling options: only what the client set, so backend defaults apply."""
        options: dict[str, Any] = {}
        max_tokens = self.max_completion_tokens or self.max_tokens
        if max_tokens is not None:
            options["max_tokens"] = max_tokens
        for name in ("temperature", "top_p", "top_k", "min_p", "repeat_penalty", "seed", "stop", "ignore_eos"):
            value = getattr(self, name)
            if value is not None:
                options[name] = value
        return options


class ChatRequest(_Generation):
    messages: list[ChatMessage] = Field(min_length=1, max_length=100_000)


class CompletionRequest(_Generation):
    prompt: Annotated[str, BeforeValidator(_one_prompt)]


class EmbeddingRequest(_Body):
    model: str = Field(min_length=1, max_length=256)
    input: Annotated[list[str], BeforeValidator(_input_list), Field(min_length=1, max_length=2048)]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    keep_alive: Annotated[float | None, BeforeValidator(_duration)] = None


# -- app state -------------------------------------------------------------------------------


@dataclass
class ServerState:
    """What the routes share: the backend, readiness, drain status and in-flight generations."""

    backend: Backend
    api_key: str | None
    metrics: Metrics = field(default_factory=Metrics)
    ready: bool = False
    ready_error: str | None = None
    draining: bool = False
    in_flight: int = 0
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    idle: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.idle.set()

    async def wait_ready(self) -> None:
        """Health turns 200 once the catalog is scanned and a warm restart has loaded the
        models of the last run."""
        try:
            await self.backend.warmed()
        except Exception as exc:  # shown by /health; the first request will raise it again
            log.exception("backend failed to start")
            self.ready_error = f"backend failed to start: {exc}"
            return
        self.ready = True

    def begin_drain(self) -> None:
        """Health → 503 draining, new generations refused, /api/events streams end."""
        self.draining = True
        self.stopping.set()

    def check_accepting(self) -> None:
        if self.draining:
            raise ShuttingDown("the server is shutting down; retry on another instance or after restart")

    def flight(self) -> _Flight:
        self.in_flight += 1
        self.idle.clear()
        return _Flight(self)

    async def wait_idle(self, timeout: float) -> bool:
        """True when no generation is running, waiting at most `timeout` seconds."""
        return await wait_event(self.idle, timeout)


class _Flight:
    """One generation counted as in flight until `close`, which also closes its backend stream."""

    def __init__(self, state: ServerState) -> None:
        self._state = state
        self._closed = False

    async def close(self, stream: AsyncIterator[Any] | None = None) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if stream is not None and hasattr(stream, "aclose"):
                await stream.aclose()  # releases the model lease; cancels the request if still running
        finally:
            self._state.in_flight -= 1
            if self._state.in_flight == 0:
                self._state.idle.set()


def _state(request: Request) -> ServerState:
    return request.app.state.corral


def _ids(request: Request) -> tuple[str, str | None]:
    return request.scope["corral.request_id"], request.scope.get("corral.session_id")


# -- responses -------------------------------------------------------------------------------


def _error_body(code: str, message: str, request_id: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": code, "code": code, "request_id": request_id}}


def _error_response(status: int, code: str, message: str, request_id: str | None,
                    headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(_error_body(code, message, request_id), status_code=status, headers=headers)


def _json_line(data: Any) -> str:
    return "data: " + json.dumps(data, ensure_ascii=False, separators=(",", ":")) + "\n\n"


class _Stream(StreamingResponse):
    """A streaming response that always runs `on_close`, even if its body never started
    (a client that leaves before the first byte), so the in-flight count and the model lease
    are never leaked."""

    def __init__(self, body: AsyncGenerator[str, None], on_close: Callable[[], Awaitable[None]],
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(body, media_type="text/event-stream",
                         headers={"cache-control": "no-cache", "x-accel-buffering": "no", **(headers or {})})
        self._body = body
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                await self._body.aclose()  # runs the body's own cleanup if a disconnect left it suspended
            finally:
                await self._on_close()


async def _wait_disconnect(request: Request) -> None:
    """Return when the client closes the connection (the body has been read by then)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Run `work`, cancelling it if the client disconnects first (then raise _ClientGone).

    A non-streaming handler is not cancelled when its client leaves; without this, a client
    that times out would keep a slot generating for nobody until max_tokens."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
    if task.cancelled():
        raise _ClientGone()
    return task.result()


def _usage(chunk: Chunk) -> dict[str, Any]:
    prompt = chunk.stats.prompt_tokens if chunk.stats else 0
    completion = chunk.stats.completion_tokens if chunk.stats else 0
    cached = chunk.stats.cached_tokens if chunk.stats else 0
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def _corral_stats(chunk: Chunk, request_id: str, session_id: str | None, cache: str | None) -> dict[str, Any]:
    s = chunk.stats
    return {
        "request_id": request_id, "session_id": session_id,
        "queue_wait_s": s.queue_wait_s if s else None, "ttft_s": s.ttft_s if s else None,
        "duration_s": s.duration_s if s else None, "tokens_per_s": s.tokens_per_s if s else None,
        "cache": cache,
    }


@dataclass
class _Shape:
    """How one endpoint dresses chunks: chat (message/delta) or text completion (text)."""

    chat: bool
    response_id: str
    model: str
    created: int
    cache: str | None = None  # the response cache's verdict, from the request's first chunk

    @property
    def headers(self) -> dict[str, str]:
        return {"x-corral-cache": self.cache} if self.cache else {}

    def _base(self, obj: str) -> dict[str, Any]:
        return {"id": self.response_id, "object": obj, "created": self.created, "model": self.model}

    def piece(self, text: str, first: bool, finish_reason: str | None = None) -> dict[str, Any]:
        if self.chat:
            delta: dict[str, str] = {"role": "assistant"} if first else {}
            if text:
                delta["content"] = text
            choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish_reason}
            return {**self._base("chat.completion.chunk"), "choices": [choice]}
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        return {**self._base("text_completion"), "choices": [choice]}

    def final_piece(self, chunk: Chunk, first: bool, request_id: str, session_id: str | None) -> dict[str, Any]:
        data = self.piece(chunk.text, first, chunk.finish_reason or "error")
        data["usage"] = _usage(chunk)
        data["corral"] = _corral_stats(chunk, request_id, session_id, self.cache)
        if chunk.finish_reason == "error":
            data["error"] = _error_body("generation_failed", chunk.error or "generation failed",
                                        request_id)["error"]
        return data

    def whole(self, text: str, last: Chunk, request_id: str, session_id: str | None) -> dict[str, Any]:
        if self.chat:
            choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text},
                                      "finish_reason": last.finish_reason}
            data = {**self._base("chat.completion"), "choices": [choice]}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": last.finish_reason}
            data = {**self._base("text_completion"), "choices": [choice]}
        data["usage"] = _usage(last)
        data["corral"] = _corral_stats(last, request_id, session_id, self.cache)
        return data


async def _collect(stream: AsyncIterator[Chunk]) -> list[Chunk]:
    return [chunk async for chunk in stream]


async def _generate(request: Request, body: _Generation, shape: _Shape,
                    open_stream: Callable[[], AsyncIterator[Chunk]]) -> Response:
    """Run one generation as a JSON response or an SSE stream (wire.md)."""
    state = _state(request)
    request_id, session_id = _ids(request)
    state.check_accepting()
    flight = state.flight()
    stream = open_stream()
    try:
        # The first chunk comes before any byte of the response, so an unknown model, a full
        # queue or a bad parameter is an ordinary JSON error, never a stream.
        first = await _unless_disconnected(request, stream.__anext__())
    except _ClientGone:
        await flight.close(stream)
        return Response(status_code=499)
    except StopAsyncIteration:
        await flight.close(stream)
        raise GenerationFailed("the backend ended the request without a result") from None
    except CorralError as exc:
        await flight.close(stream)
        label = UNKNOWN_MODEL if isinstance(exc, ModelNotFound) else body.model
        state.metrics.rejected(label, exc.http_status)
        raise
    except BaseException:
        await flight.close(stream)
        raise
    shape.cache = first.cache

    if not body.stream:
        try:
            chunks = [first]
            if first.finish_reason is None:
                chunks += await _unless_disconnected(request, _collect(stream))
        except _ClientGone:
            return Response(status_code=499)
        finally:
            await flight.close(stream)
        last = chunks[-1]
        if last.finish_reason is None:
            raise GenerationFailed("the backend ended the request without a final chunk")
        if last.stats is None:  # ended before it ran (cancelled while queued): no event counts it
            state.metrics.unfinished(body.model, last.finish_reason)
        if last.finish_reason == "error":
            raise GenerationFailed(f"model {body.model!r}: {last.error or 'generation failed'}")
        return JSONResponse(shape.whole("".join(c.text for c in chunks), last, request_id, session_id),
                            headers=shape.headers)

    async def events() -> AsyncGenerator[str, None]:
        chunk, first_piece = first, True
        try:
            while chunk.finish_reason is None:
                if chunk.text:
                    yield _json_line(shape.piece(chunk.text, first_piece))
                    first_piece = False
                try:
                    chunk = await stream.__anext__()
                except StopAsyncIteration:
                    chunk = Chunk("", "error", error="the backend ended the stream without a final chunk")
            if chunk.stats is None:
                state.metrics.unfinished(body.model, chunk.finish_reason)
            yield _json_line(shape.final_piece(chunk, first_piece, request_id, session_id))
        except CorralError as exc:  # raised mid-stream: the status line is long gone
            yield _json_line(shape.final_piece(Chunk("", "error", error=exc.message), first_piece,
                                               request_id, session_id))
        except Exception:
            log.exception("stream %s failed", request_id)
            yield _json_line(shape.final_piece(
                Chunk("", "error", error=f"internal error (request {request_id}); see the server log"),
                first_piece, request_id, session_id))
        yield "data: [DONE]\n\n"

    return _Stream(events(), on_close=lambda: flight.close(stream), headers=shape.headers)


# -- middleware ------------------------------------------------------------------------------


class _BodyTooLarge(FastAPIHTTPException):
    """Raised while the body streams in; FastAPI re-raises HTTPExceptions from body reading."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body is larger than {limit} bytes")


class RequestContext:
    """Pure ASGI middleware: request ids, body limit, the per-request log line, and a last-resort
    500 that never carries a traceback.

    Pure ASGI rather than BaseHTTPMiddleware so streamed responses pass through untouched and a
    client's disconnect still reaches the route."""

    def __init__(self, app: ASGIApp, state: ServerState, max_body: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.state = state
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        bad = [name for name in ("x-request-id", "x-session-id")
               if headers.get(name) is not None and not _ID_PATTERN.fullmatch(headers[name])]
        request_id = uuid.uuid4().hex if bad or not headers.get("x-request-id") else headers["x-request-id"]
        session_id = None if bad else headers.get("x-session-id")
        scope["corral.request_id"], scope["corral.session_id"] = request_id, session_id
        echo = [(b"x-request-id", request_id.encode())]
        if session_id:
            echo.append((b"x-session-id", session_id.encode()))
        status: int | None = None
        started = time.perf_counter()

        async def send_with_ids(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", []), *echo]}
            await send(message)

        received = 0

        async def receive_limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    raise _BodyTooLarge(self.max_body)
            return message

        try:
            declared = headers.get("content-length")
            if bad:  # an id we would silently replace would break the caller's tracing: say so
                scope["corral.error"] = "bad id header"
                response = _error_response(400, "invalid_request", f"header {bad[0]}: must be 1-128 letters, "
                                           "digits or . _ : - characters", request_id)
                await response(scope, receive, send_with_ids)
            elif declared is not None and re.fullmatch(r"[0-9]{1,18}", declared) and int(declared) > self.max_body:
                scope["corral.error"] = "body too large"
                response = _error_response(413, "request_too_large",
                                           f"request body is larger than {self.max_body} bytes", request_id)
                await response(scope, receive, send_with_ids)
            else:
                await self.app(scope, receive_limited, send_with_ids)
        except Exception:
            log.exception("request %s (%s %s) failed", request_id, scope.get("method"), scope.get("path"))
            if status is None:  # nothing sent yet: answer with a generic 500
                response = _error_response(500, "internal_error", "internal server error; the server log "
                                           f"has the details under request id {request_id}", request_id)
                await response(scope, receive, send_with_ids)
        finally:
            self._account(scope, status or 500, time.perf_counter() - started)

    def _account(self, scope: Scope, status: int, seconds: float) -> None:
        route = scope.get("route")
        template = getattr(route, "path", None) or "(unmatched)"
        self.state.metrics.http(scope.get("method", "?"), template, status)
        model = scope.get("corral.model")
        error = scope.get("corral.error")
        log.info("%s %s %d %.3fs request_id=%s%s%s%s", scope.get("method"), scope.get("path"), status, seconds,
                 scope["corral.request_id"],
                 f" session_id={scope['corral.session_id']}" if scope.get("corral.session_id") else "",
                 f" model={model}" if model else "", f" error={error!r}" if error else "")


# -- error handlers --------------------------------------------------------------------------


def _describe_validation(errors: Iterable[Any]) -> str:
    """Pydantic's errors as one line a person can act on, each naming its field."""
    parts: list[str] = []
    for err in list(errors)[:5]:
        loc = list(err.get("loc", ()))
        where = loc.pop(0) if loc and loc[0] in ("body", "query", "header", "path") else "body"
        name = ""
        for item in loc:
            name += f"[{item}]" if isinstance(item, int) else (f".{item}" if name else str(item))
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        if not name:
            parts.append(f"request: {msg}")
            continue
        if where != "body":
            name = f"{where} parameter {name!r}"
        given = err.get("input")
        shown = "" if err.get("type") == "missing" or isinstance(given, (dict, list)) else f" (got {given!r:.60})"
        parts.append(f"{name}: {msg}{shown}")
    return "; ".join(parts) or "invalid request"


def _install_error_handlers(app: FastAPI) -> None:
    async def corral_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, CorralError)
        request.scope["corral.error"] = exc.message
        headers: dict[str, str] = {}
        if isinstance(exc, QueueFull):
            headers["retry-after"] = str(max(1, math.ceil(exc.retry_after)))
        if isinstance(exc, Unauthorized):
            headers["www-authenticate"] = "Bearer"
        if exc.http_status >= 500:
            log.error("request %s: %s: %s", request.scope.get("corral.request_id"), exc.code, exc.message)
        return _error_response(exc.http_status, exc.code, exc.message, request.scope.get("corral.request_id"),
                               headers)

    async def validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        message = _describe_validation(exc.errors())
        request.scope["corral.error"] = message
        return _error_response(400, "invalid_request", message, request.scope.get("corral.request_id"))

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        code = _HTTP_CODES.get(exc.status_code, f"http_{exc.status_code}")
        message = str(exc.detail)
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}"
        return _error_response(exc.status_code, code, message, request.scope.get("corral.request_id"),
                               dict(exc.headers or {}))

    app.add_exception_handler(CorralError, corral_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)


# -- the app ---------------------------------------------------------------------------------


def create_app(backend: Backend, *, api_key: str | None = None) -> FastAPI:
    """The HTTP face of `backend`. The caller creates and closes the backend; the app only
    waits for it to be ready (health) and reads its events (metrics)."""
    state = ServerState(backend, api_key or None)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        tasks = [asyncio.create_task(state.wait_ready(), name="corral-ready"),
                 asyncio.create_task(state.metrics.consume(backend.events(after_seq=0)), name="corral-metrics")]
        try:
            yield
        finally:
            state.begin_drain()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    app = FastAPI(title="corral", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None,
                  redirect_slashes=False)  # a redirect would skip auth and echo the Host header
    app.state.corral = state
    cache = getattr(backend, "response_cache", None)  # only an in-process backend keeps one
    if cache is not None:
        state.metrics.track_cache(cache.stats)
    _install_error_handlers(app)
    app.add_middleware(RequestContext, state=state)

    @app.get("/health")
    async def health() -> Response:
        if state.draining:
            return JSONResponse({"status": "draining", "reason": "shutting down: finishing in-flight requests"},
                                status_code=503)
        if not state.ready:
            return JSONResponse({"status": "starting", "reason": state.ready_error or
                                 "scanning the model catalog and restoring the models of the last run"},
                                status_code=503)
        return JSONResponse({"status": "ok"})

    async def require_key(authorization: Annotated[str | None, Header()] = None) -> None:
        if state.api_key is None:
            return
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), state.api_key.encode()):
            raise Unauthorized("missing or wrong API key; send the header 'Authorization: Bearer <key>'")

    api = APIRouter(dependencies=[Depends(require_key)])
    _openai_routes(api, state)
    _admin_routes(api, state)
    app.include_router(api)
    return app


B = TypeVar("B", bound=_Body)


async def _parse(request: Request, model: type[B]) -> B:
    """The JSON body as `model`, whatever Content-Type says (`curl -d` sends a form type), with
    every failure a 400 that names the field."""
    raw = await request.body()
    if not raw.strip():
        raise BadRequest("request body is required: a JSON object")
    try:
        data = json.loads(raw.decode("utf-8-sig"))  # JSON is UTF-8 (RFC 8259); json.loads would guess
    except UnicodeDecodeError:
        raise BadRequest("request body is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise BadRequest(f"request body is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})") from None
    except RecursionError:
        raise BadRequest("request body is nested too deeply") from None
    except ValueError as exc:  # e.g. an integer of thousands of digits
        raise BadRequest(f"request body has a value JSON parsing refused: {exc}") from None
    if not isinstance(data, dict):
        raise BadRequest(f"request body must be a JSON object, not {type(data).__name__}")
    _reject_surrogates(data)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise BadRequest(_describe_validation(exc.errors())) from None


def _reject_surrogates(value: Any, where: str = "body") -> None:
    """JSON can spell lone UTF-16 surrogates ("\\ud800") that no UTF-8 text can hold."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise BadRequest(f"{where}: contains a lone surrogate (\\ud800-\\udfff), which is not text") from None
    elif isinstance(value, dict):
        for key, item in value.items():
            _reject_surrogates(item, f"{where}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _reject_surrogates(item, f"{where}[{i}]")


def _openai_routes(api: APIRouter, state: ServerState) -> None:
    backend = state.backend

    @api.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        body = await _parse(request, ChatRequest)
        request.scope["corral.model"] = body.model
        request_id, session_id = _ids(request)
        shape = _Shape(True, f"chatcmpl-{request_id}", body.model, int(time.time()))
        messages = [m.as_dict() for m in body.messages]
        return await _generate(request, body, shape, lambda: backend.chat(
            body.model, messages, request_id=request_id, session_id=session_id, keep_alive=body.keep_alive,
            cache=body.cache, **body.sampling()))

    @api.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = await _parse(request, CompletionRequest)
        request.scope["corral.model"] = body.model
        request_id, session_id = _ids(request)
        shape = _Shape(False, f"cmpl-{request_id}", body.model, int(time.time()))
        return await _generate(request, body, shape, lambda: backend.complete(
            body.model, body.prompt, request_id=request_id, session_id=session_id, keep_alive=body.keep_alive,
            cache=body.cache, **body.sampling()))

    @api.post("/v1/embeddings")
    async def embeddings(request: Request) -> Response:
        body = await _parse(request, EmbeddingRequest)
        request.scope["corral.model"] = body.model
        request_id, session_id = _ids(request)
        state.check_accepting()
        flight = state.flight()
        try:
            # Not raced against a disconnect: an embedding is one short batch in a worker thread
            # that cancelling could not stop, and it holds no generation slot.
            result = await backend.embed(body.model, body.input, request_id=request_id, session_id=session_id,
                                         keep_alive=body.keep_alive)
        except CorralError as exc:
            state.metrics.rejected(UNKNOWN_MODEL if isinstance(exc, ModelNotFound) else body.model, exc.http_status)
            raise
        finally:
            await flight.close()
        if body.dimensions is not None and result.vectors and body.dimensions != len(result.vectors[0]):
            raise BadRequest(f"dimensions = {body.dimensions}: model {body.model!r} gives "
                               f"{len(result.vectors[0])}-dimensional vectors and cannot shorten them")
        data = [{"object": "embedding", "index": i, "embedding": _encode(vector, body.encoding_format)}
                for i, vector in enumerate(result.vectors)]
        return JSONResponse({"object": "list", "model": body.model, "data": data,
                             "usage": {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens}})

    @api.get("/v1/models")
    async def models() -> dict[str, Any]:
        listed = [{"id": m.name, "object": "model", "created": 0, "owned_by": "corral"}
                  for m in await backend.models() if m.usable]
        return {"object": "list", "data": listed}


HIDDEN = "(hidden)"
_SECRET_KEYS = frozenset({"api_key"})
_SECRET_LINE = re.compile(r"(?m)^(\s*api_key\s*=\s*).*$")  # in a TOML file's text
_SECRET_DIFF = re.compile(r"^(server\.api_key): .*$")  # a config diff line: "server.api_key: old → new"


def without_secrets(value: Any, key: str | None = None) -> Any:
    """`value` (a config version or an event, as JSON data) with every API key replaced.

    A version carries its settings, the config file's text and a diff, and a config event
    carries the diff: each would hand the key (and any earlier one) to whoever reads the
    versions or the event stream. Rollback still works: it uses the backend's own copy."""
    if key in _SECRET_KEYS and value is not None:
        return HIDDEN
    if isinstance(value, dict):
        return {k: without_secrets(v, k) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [without_secrets(v) for v in value]
    if isinstance(value, str):
        return _SECRET_LINE.sub(rf'\g<1>"{HIDDEN}"', _SECRET_DIFF.sub(rf"\g<1>: changed {HIDDEN}", value))
    return value


def _encode(vector: list[float], encoding: str) -> list[float] | str:
    """base64 is what the official OpenAI client asks for by default: little-endian float32."""
    if encoding == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
    return vector


def _admin_routes(api: APIRouter, state: ServerState) -> None:
    backend = state.backend

    @api.get("/api/ps")
    async def ps() -> dict[str, Any]:
        return (await backend.status()).to_dict()

    @api.post("/api/config/reload")
    async def reload_config(source: str = "api") -> dict[str, Any]:
        """Read the config file again and apply what changed (400 naming the key if invalid)."""
        return without_secrets((await backend.reload_config(_config_source(source))).to_dict())

    @api.get("/api/config/versions")
    async def config_versions() -> dict[str, Any]:
        versions = await backend.config_versions()
        return {"current": versions[-1].number, "versions": [without_secrets(v.to_dict()) for v in versions]}

    @api.get("/api/config/versions/{number}")
    async def config_version(number: int) -> dict[str, Any]:
        for version in await backend.config_versions():
            if version.number == number:
                return without_secrets(version.to_dict(with_settings=True))
        raise NotFound(f"config version {number} does not exist; list them at /api/config/versions")

    @api.post("/api/config/rollback/{number}")
    async def rollback_config(number: int, source: str = "api") -> dict[str, Any]:
        return without_secrets((await backend.rollback_config(number, _config_source(source))).to_dict())

    @api.post("/api/models/{name:path}/load")
    async def load(name: str) -> dict[str, Any]:
        return (await backend.load(name)).to_dict()

    @api.post("/api/models/{name:path}/evict")
    async def evict(name: str, force: bool = False) -> dict[str, Any]:
        return (await backend.evict(name, force=force)).to_dict()

    @api.post("/api/models/{name:path}/pin")
    async def pin(name: str) -> dict[str, Any]:
        return (await backend.pin(name, True)).to_dict()

    @api.post("/api/models/{name:path}/unpin")
    async def unpin(name: str) -> dict[str, Any]:
        return (await backend.pin(name, False)).to_dict()

    @api.post("/api/unload-all")
    async def unload_all() -> dict[str, Any]:
        await backend.unload_all()
        return {"ok": True}

    @api.post("/api/rescan")
    async def rescan() -> dict[str, Any]:
        return {"models": [m.to_dict() for m in await backend.rescan()]}

    @api.get("/metrics")
    async def metrics() -> Response:
        status = None
        if state.ready:
            try:
                status = await backend.status()
            except Exception:  # counters still scrape when the status cannot be read
                log.exception("metrics: could not read the backend status")
        return Response(state.metrics.render(status), media_type=CONTENT_TYPE)

    @api.get("/api/events")
    async def events(request: Request, after: Annotated[int | None, Query(ge=0)] = None,
                     last_event_id: Annotated[str | None, Header()] = None) -> Response:
        if last_event_id is not None:
            if not re.fullmatch(r"[0-9]{1,18}", last_event_id.strip()):
                raise BadRequest(f"Last-Event-ID = {last_event_id!r}: must be an event sequence number")
            after = int(last_event_id)
        state.check_accepting()
        # Subscribe before answering: nothing published after the headers arrive is missed.
        subscription = backend.events(after_seq=after)
        return _Stream(_event_stream(subscription, state.stopping),
                       on_close=lambda: _close_iterator(subscription))


async def _close_iterator(iterator: AsyncIterator[Any]) -> None:
    close = getattr(iterator, "aclose", None)
    if close is not None:
        await close()


async def _next(iterator: AsyncIterator[T]) -> T:
    return await iterator.__anext__()


async def _event_stream(subscription: AsyncIterator[Event], stopping: asyncio.Event) -> AsyncGenerator[str, None]:
    """SSE of backend events with `id:` for resuming, a ping when idle, and an end on shutdown."""
    stop = asyncio.ensure_future(stopping.wait())
    pending: asyncio.Future[Event] | None = None
    try:
        yield ": connected\n\n"
        while True:
            if pending is None:
                pending = asyncio.ensure_future(_next(subscription))
            done, _ = await asyncio.wait({pending, stop}, timeout=PING_INTERVAL_S,
                                         return_when=asyncio.FIRST_COMPLETED)
            if stop in done:
                return
            if pending not in done:
                yield ": ping\n\n"
                continue
            try:
                event = pending.result()
            except StopAsyncIteration:  # the backend closed its bus
                return
            pending = None
            data = json.dumps(without_secrets(event.to_dict()), ensure_ascii=False, separators=(",", ":"))
            head = f"id: {event.seq}\n" if event.seq else ""  # a Dropped notice has no seq to resume from
            yield f"{head}event: {event.type}\ndata: {data}\n\n"
    finally:
        stop.cancel()
        if pending is not None:
            pending.cancel()


# -- running it ------------------------------------------------------------------------------


def _quiet_server(config: Any) -> Any:
    """uvicorn's server without its signal capture: `serve()` owns SIGTERM/SIGINT.

    uvicorn's own handlers re-raise the signal after shutdown (exit status 143) and would wait
    forever on open SSE streams. uvicorn is imported here, not at the top: building the app
    (tests, notebooks) does not need it."""
    import uvicorn

    class QuietServer(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Any:
            yield

        def install_signal_handlers(self) -> None:  # the same hook's name before uvicorn 0.29
            return

    return QuietServer(config)


def bind(host: str, port: int) -> socket.socket:
    """Bind the listening socket ourselves: a clear error when the port is taken, and the real
    port when 0 was asked for."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise CorralError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise CorralError(f"cannot listen on {host}:{port}: {exc.strerror or exc}; choose another --port "
                          "or stop the program using it") from None
    return sock


async def serve(backend: Backend, *, host: str = "127.0.0.1", port: int = 8377, api_key: str | None = None,
                grace_s: float = DEFAULT_GRACE_S,
                on_listening: Callable[[str, int, int], None] | None = None) -> None:
    """Serve until SIGTERM/SIGINT, then drain and return (the caller exits 0).

    On the first signal: health → 503 draining, uvicorn stops accepting, /api/events streams
    end, and running generations get `grace_s` to finish; after that the backend is closed,
    which ends each with a final "cancelled" chunk (streams then send `[DONE]`). A second
    signal skips the grace. `on_listening(host, port, n_models)` runs once the socket is open
    and the catalog is scanned.
    """
    import uvicorn

    sock = bind(host, port)
    port = sock.getsockname()[1]
    app = create_app(backend, api_key=api_key)
    state: ServerState = app.state.corral
    config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="on", ws="none",
                            timeout_keep_alive=5, server_header=False)
    server = _quiet_server(config)
    loop = asyncio.get_running_loop()
    stop, hurry = asyncio.Event(), asyncio.Event()

    def on_signal(signum: int) -> None:
        if stop.is_set():
            log.warning("second %s: ending running requests now", signal.Signals(signum).name)
            hurry.set()
        else:
            log.info("%s: shutting down (grace %.0f s for running requests)", signal.Signals(signum).name, grace_s)
            stop.set()

    def on_hangup() -> None:  # the Unix way to say "read your config again"
        reloading = asyncio.ensure_future(backend.reload_config("signal"))
        reloading.add_done_callback(_log_reload)

    handled = (signal.SIGTERM, signal.SIGINT)
    for signum in handled:
        loop.add_signal_handler(signum, on_signal, signum)
    loop.add_signal_handler(signal.SIGHUP, on_hangup)
    serving = asyncio.create_task(server.serve(sockets=[sock]), name="corral-uvicorn")
    announce = asyncio.create_task(_announce(server, backend, host, port, on_listening))
    try:
        stopper = asyncio.ensure_future(stop.wait())
        await asyncio.wait({serving, stopper}, return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        if serving.done():  # uvicorn stopped on its own (a startup failure): report it
            announce.cancel()
            serving.result()
            return
        announce.cancel()
        state.begin_drain()  # /health says 503 draining and new generations are refused ...
        await _until(state.wait_idle(grace_s), hurry)
        server.should_exit = True  # ... until the grace is over; then uvicorn stops listening
        if state.in_flight:
            log.warning("%d request(s) still running after the grace period; ending them", state.in_flight)
            # every engine ends its requests with a final "cancelled" chunk; bounded, and a second
            # signal stops waiting (an embedding batch cannot be interrupted mid-decode)
            await _until(backend.aclose(), hurry, timeout=grace_s)
        # Streams have their last chunk by now; give their connections a moment to flush.
        done, _ = await asyncio.wait({serving}, timeout=2.0 if hurry.is_set() else grace_s + 5)
        if not done:
            log.warning("connections still open; closing them")
            server.force_exit = True  # uvicorn then skips the app's lifespan shutdown: run it here
        with contextlib.suppress(asyncio.CancelledError):
            await serving
        if server.force_exit:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.lifespan.shutdown(), 5)
    finally:
        for signum in (*handled, signal.SIGHUP):
            loop.remove_signal_handler(signum)
        with contextlib.suppress(Exception):
            sock.close()


CONFIG_SOURCES = ("api", "console", "cli")  # who may be named as a config change's source over HTTP


def _config_source(source: str) -> str:
    """The `source` a client names for a reload or rollback, from a short fixed list so the
    version history cannot be filled with arbitrary text."""
    if source not in CONFIG_SOURCES:
        raise BadRequest(f"source = {source!r}: must be one of {', '.join(CONFIG_SOURCES)}")
    return source


def _log_reload(task: asyncio.Future[Any]) -> None:
    """A SIGHUP reload has no caller to answer: its outcome goes to the log (and, from the
    backend, to the event stream)."""
    if task.cancelled():
        return
    error = task.exception()
    if error is not None:
        log.error("SIGHUP reload: %s", error)
    else:
        log.info("SIGHUP reload: config version %d", task.result().number)


async def _until(work: Awaitable[Any], hurry: asyncio.Event, timeout: float | None = None) -> bool:
    """Await `work` unless `hurry` is set (a second signal) or `timeout` passes; True when it finished."""
    task = asyncio.ensure_future(work)
    hurried = asyncio.ensure_future(hurry.wait())
    try:
        await asyncio.wait({task, hurried}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        hurried.cancel()
    if not task.done():
        task.cancel()
        return False
    return True


async def _announce(server: Any, backend: Backend, host: str, port: int,
                    on_listening: Callable[[str, int, int], None] | None) -> None:
    """Tell the caller once requests can be served; a backend that fails to start is reported by
    /health and the log instead (the server stays up so an operator can see why)."""
    while not server.started:
        await asyncio.sleep(0.02)
    try:
        await backend.ready()
        count = len(await backend.models())
    except Exception:
        return  # ServerState.wait_ready has logged it
    if on_listening is not None:
        on_listening(host, port, count)
