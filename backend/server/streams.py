"""Answering one generation over HTTP, whatever the dialect: the dialect's body gives the
`GenerationRequest` and a `Shape` that dresses chunks in its wire format; everything else is
here, once.

- The first chunk is awaited before any byte of the response, so an unknown model, a full
  queue or a bad parameter is an ordinary JSON error, never a stream.
- Clients leave. Starlette notices a streaming client's disconnect and cancels the body, which
  closes the backend stream and frees the engine slot at its next step; a non-streaming
  handler, though, would keep generating for nobody, so it races the generation against the
  connection's `http.disconnect` and cancels the generation when the client goes.
- Every generation counts as in flight until its backend stream is closed (the drain on
  shutdown waits for that count), even when the client leaves before the first byte.
- The token path is short: one generator reads the backend's chunks and writes the wire text.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import replace
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, cast

from fastapi import Request
from pydantic import BaseModel
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from ..errors import BadRequest, CorralError, GenerationFailed, ModelNotFound
from ..generation import Chunk, Embeddings
from ..metrics import UNKNOWN_MODEL
from ..request import OWN_APIS, GenerationRequest
from .middleware import ids, read_json, state_of

if TYPE_CHECKING:
    from .app import ServerState

log = logging.getLogger("corral.server")

T = TypeVar("T")
B = TypeVar("B", bound=BaseModel)


class Shape(Protocol):
    """How a dialect dresses one request's answer. A stream's shape may keep state between
    pieces (it is made per request)."""

    media_type: str  # of a streamed answer
    cache: str | None  # set before any piece: the response cache's verdict

    def piece(self, chunk: Chunk) -> str:
        """The wire text of a chunk that is not the last and not empty."""

    def end(self, last: Chunk) -> str:
        """The wire text of the last chunk (finish reason, usage), and the stream's end."""

    def whole(self, chunks: list[Chunk]) -> dict[str, Any]:
        """The JSON answer of a request that does not stream; its last chunk is final."""


class WireRequest(Protocol):
    """A dialect's request body, parsed: what the runner needs of it."""

    model: str
    stream: bool

    def generation(self, request_id: str, session_id: str | None) -> GenerationRequest: ...

    def shape(self, request_id: str, session_id: str | None) -> Shape: ...


def generation_route(body_type: type[B], bind: Callable[[B, ServerState], None] | None = None,
                     ) -> Callable[[Request], Awaitable[Response]]:
    """The handler of a generation route whose body is `body_type` (a `WireRequest`); `bind`
    gives a body what it takes from the server before converting (the Responses store)."""

    async def generate(request: Request) -> Response:
        parsed = await read_json(request, body_type)
        if bind is not None:
            bind(parsed, state_of(request))
        body = cast(WireRequest, parsed)
        request.scope["corral.model"] = body.model
        request_id, session_id = ids(request)
        generation = body.generation(request_id, session_id)
        if (own := request.headers.get("x-corral-api")) is not None:
            if own not in OWN_APIS:
                raise BadRequest(f"X-Corral-Api = {own!r}: must be one of {', '.join(OWN_APIS)}")
            generation = replace(generation, api=own)
        generation.validate()  # a bad request never reaches a model
        return await answer(request, generation, body.shape(request_id, session_id), stream=body.stream)

    return generate


class _ClientGone(Exception):
    """The client disconnected while its request was running."""


async def answer(request: Request, generation: GenerationRequest, shape: Shape, *, stream: bool) -> Response:
    """Run `generation` on the backend and answer in `shape`: whole JSON or a stream."""
    state = state_of(request)
    state.check_accepting()
    flight = state.flight()
    chunks = state.backend.generate(generation)
    try:
        first = await _unless_disconnected(request, chunks.__anext__())
    except _ClientGone:
        await flight.close(chunks)
        return Response(status_code=499)
    except StopAsyncIteration:
        await flight.close(chunks)
        raise GenerationFailed("the backend ended the request without a result") from None
    except CorralError as exc:
        await flight.close(chunks)
        state.metrics.rejected(UNKNOWN_MODEL if isinstance(exc, ModelNotFound) else generation.model,
                               exc.http_status, generation.api)
        raise
    except BaseException:
        await flight.close(chunks)
        raise
    shape.cache = first.cache
    headers = {"x-corral-cache": first.cache} if first.cache else {}
    model = generation.model

    if not stream:
        try:
            collected = [first]
            if first.finish_reason is None:
                collected += await _unless_disconnected(request, _collect(chunks))
        except _ClientGone:
            return Response(status_code=499)
        finally:
            await flight.close(chunks)
        last = collected[-1]
        if last.finish_reason is None:
            raise GenerationFailed("the backend ended the request without a final chunk")
        if last.stats is None:  # ended before it ran (cancelled while queued): no event counts it
            state.metrics.unfinished(model, last.finish_reason, generation.api)
        if last.finish_reason == "error":
            raise GenerationFailed(f"model {model!r}: {last.error or 'generation failed'}")
        return JSONResponse(shape.whole(collected), headers=headers)

    cut = Chunk("", "error", error="the backend ended the stream without a final chunk")

    async def body() -> AsyncGenerator[str, None]:
        chunk = first
        try:
            while chunk.finish_reason is None:
                if not chunk.empty:
                    yield shape.piece(chunk)
                chunk = await anext(chunks, cut)
            if chunk.stats is None:
                state.metrics.unfinished(model, chunk.finish_reason, generation.api)
            yield shape.end(chunk)
        except CorralError as exc:  # raised mid-stream: the status line is long gone
            yield shape.end(Chunk("", "error", error=exc.message))
        except Exception:
            request_id = ids(request)[0]
            log.exception("stream %s failed", request_id)
            yield shape.end(Chunk("", "error", error=f"internal error (request {request_id}); see the server log"))

    return ClosingStream(body(), on_close=lambda: flight.close(chunks), media_type=shape.media_type,
                         headers=headers)


async def embedding(request: Request, model: str, inputs: list[str], *, keep_alive: float | None,
                    api: str) -> Embeddings:
    """Embed `inputs` with `model` for a route of any dialect."""
    return await pooled(request, model, api, lambda backend, ids: backend.embed(
        model, inputs, keep_alive=keep_alive, api=api, **ids))


async def pooled(request: Request, model: str, api: str,
                 call: Callable[[Any, dict[str, str | None]], Awaitable[T]]) -> T:
    """`call(backend, ids)`: an embeddings or reranking call on `model` with the request's ids,
    counted as in flight for the drain, and counted in /metrics when refused."""
    state = state_of(request)
    request.scope["corral.model"] = model
    request_id, session_id = ids(request)
    state.check_accepting()
    flight = state.flight()
    try:
        # Not raced against a disconnect: it is one short batch in a worker thread that
        # cancelling could not stop, and it holds no generation slot.
        return await call(state.backend, {"request_id": request_id, "session_id": session_id})
    except CorralError as exc:
        state.metrics.rejected(UNKNOWN_MODEL if isinstance(exc, ModelNotFound) else model, exc.http_status, api)
        raise
    finally:
        await flight.close()


async def _collect(chunks: AsyncIterator[Chunk]) -> list[Chunk]:
    return [chunk async for chunk in chunks]


class ClosingStream(StreamingResponse):
    """A streaming response that always runs `on_close`, even if its body never started
    (a client that leaves before the first byte), so the in-flight count and the model lease
    are never leaked."""

    def __init__(self, body: AsyncGenerator[str, None], on_close: Callable[[], Awaitable[None]],
                 media_type: str = "text/event-stream", headers: dict[str, str] | None = None) -> None:
        super().__init__(body, media_type=media_type,
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
    """Run `work`, cancelling it if the client disconnects first (then raise _ClientGone)."""
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
