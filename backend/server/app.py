"""The app: its shared state, its lifespan, /health, and the one route table of every dialect.

The wire format is fixed by a separate contract (the remote backend is written against it), so
no route holds policy of its own: every error is a `CorralError` mapped by its `http_status`
and `code`, and every route is a thin translation to one Backend call.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Depends, FastAPI, Request
from starlette.responses import JSONResponse, Response

from ..errors import NotFound, ShuttingDown
from ..events import wait_event
from ..metrics import Metrics
from ..snapshot import ModelInfo
from . import admin, anthropic, ollama, ollama_routes, openai, rerank, responses
from .middleware import (ErrorShapes, RequestContext, ids, install_error_handlers, read_json, require_key,
                         state_of)
from .stored import Store
from .streams import embedding, generation_route, pooled

if TYPE_CHECKING:
    from ..protocol import Backend

log = logging.getLogger("corral.server")

# Each dialect's error body, by path prefix (the longest wins). corral's own admin API answers
# in OpenAI's shape, which RemoteBackend reads.
ERROR_BODIES = {"": openai.error_body, "/v1/messages": anthropic.error_body,
                ollama_routes.PREFIX: ollama.error_body}


@dataclass
class ServerState:
    """What the routes share: the backend, readiness, drain status and in-flight generations."""

    backend: Backend
    api_key: str | None
    metrics: Metrics = field(default_factory=Metrics)
    stored: Store = field(default_factory=Store)  # the Responses API's stored responses
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

    def flight(self) -> Flight:
        self.in_flight += 1
        self.idle.clear()
        return Flight(self)

    async def wait_idle(self, timeout: float) -> bool:
        """True when no generation is running, waiting at most `timeout` seconds."""
        return await wait_event(self.idle, timeout)


class Flight:
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


def create_app(backend: Backend, *, api_key: str | None = None, ollama_port: int | None = None,
               stored: Store | None = None) -> FastAPI:
    """The HTTP face of `backend`. The caller creates and closes the backend; the app only
    waits for it to be ready (health) and reads its events (metrics). Requests that arrive on
    `ollama_port` get ollama's API at ollama's own paths; `stored` bounds the stored
    Responses (default: 1,000 for an hour)."""
    state = ServerState(backend, api_key or None, stored=stored or Store())

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
    errors = ErrorShapes(ERROR_BODIES)
    install_error_handlers(app, errors)
    app.add_middleware(RequestContext, metrics=state.metrics, errors=errors)
    if ollama_port is not None:
        app.add_middleware(ollama_routes.OllamaPort, port=ollama_port)  # outermost: errors see the ollama path
    app.add_api_route("/health", health, methods=["GET"])  # probes carry no key

    api = APIRouter(dependencies=[Depends(require_key(state.api_key))])
    routes: list[tuple[str, str, Callable[..., Any]]] = [
        # OpenAI: /v1/*
        ("POST", "/v1/chat/completions", generation_route(openai.ChatRequest)),
        ("POST", "/v1/completions", generation_route(openai.CompletionRequest)),
        # OpenAI Responses
        ("POST", "/v1/responses", generation_route(responses.ResponsesRequest,
                                                   bind=lambda body, state: body.use(state.stored))),
        ("GET", "/v1/responses/{response_id}", stored_response),
        ("DELETE", "/v1/responses/{response_id}", delete_response),
        ("POST", "/v1/embeddings", embeddings),
        *(("POST", path, reranking) for path in rerank.PATHS),
        ("GET", "/v1/models", models),
        ("GET", "/v1/models/{name:path}", model),
        # Anthropic Messages
        ("POST", "/v1/messages", generation_route(anthropic.MessagesRequest)),
        ("POST", "/v1/messages/count_tokens", count_tokens),
        # admin: /api/*, /metrics
        ("GET", "/api/ps", admin.ps),
        ("POST", "/api/config/reload", admin.reload_config),
        ("GET", "/api/config/versions", admin.config_versions),
        ("GET", "/api/config/versions/{number}", admin.config_version),
        ("POST", "/api/config/rollback/{number}", admin.rollback_config),
        ("POST", "/api/models/{name:path}/load", admin.load),
        ("POST", "/api/models/{name:path}/evict", admin.evict),
        ("POST", "/api/models/{name:path}/pin", admin.pin),
        ("POST", "/api/models/{name:path}/unpin", admin.unpin),
        ("POST", "/api/unload-all", admin.unload_all),
        ("GET", "/api/requests", admin.requests),
        ("DELETE", "/api/requests/{request_id:path}", admin.cancel_request),
        ("POST", "/api/rescan", admin.rescan),
        ("POST", "/api/models/pull", admin.pull),
        ("GET", "/api/pulls", admin.pulls),
        ("DELETE", "/api/pulls/{pull_id}", admin.cancel_pull),
        ("DELETE", "/api/models/{name:path}", admin.remove),
        ("GET", "/metrics", admin.metrics),
        ("GET", "/api/events", admin.events),
        ("GET", "/api/models/{name:path}/plan", admin.plan),
        ("GET", "/api/models/{name:path}/logs", admin.logs),
        ("GET", "/api/models/{name:path}", admin.details),
        # ollama: under /ollama here, at its own paths on the ollama port
        *((method, ollama_routes.PREFIX + path, handler) for method, path, handler in ollama_routes.routes),
    ]
    for method, path, handler in routes:
        api.add_api_route(path, handler, methods=[method])
    app.include_router(api)
    return app


async def health(request: Request) -> Response:
    state = state_of(request)
    if state.draining:
        return JSONResponse({"status": "draining", "reason": "shutting down: finishing in-flight requests"},
                            status_code=503)
    if not state.ready:
        return JSONResponse({"status": "starting", "reason": state.ready_error or
                             "scanning the model catalog and restoring the models of the last run"},
                            status_code=503)
    return JSONResponse({"status": "ok"})


async def embeddings(request: Request) -> Response:
    body = await read_json(request, openai.EmbeddingRequest)
    result = await embedding(request, body.model, body.input, keep_alive=body.keep_alive, api="openai")
    return JSONResponse(openai.embedding_response(body, result))


async def reranking(request: Request) -> Response:
    body = await read_json(request, rerank.RerankRequest)
    result = await pooled(request, body.model, "openai", lambda backend, ids: backend.rerank(
        body.model, body.query, body.documents, body.top_n, keep_alive=body.keep_alive, api="openai", **ids))
    return JSONResponse(rerank.rerank_response(body, result))


async def count_tokens(request: Request) -> dict[str, Any]:
    """Anthropic's count_tokens: the request's prompt as the model's template renders it. It
    leases the model like a generation, so it counts as in flight for the drain."""
    state = state_of(request)
    body = await read_json(request, anthropic.CountTokensRequest)
    request.scope["corral.model"] = body.model
    generation = body.generation(*ids(request))
    generation.validate()
    state.check_accepting()
    flight = state.flight()
    try:
        return {"input_tokens": await state.backend.count_tokens(generation)}
    finally:
        await flight.close()


async def stored_response(request: Request, response_id: str) -> dict[str, Any]:
    store = state_of(request).stored
    stored = store.get(response_id)
    if stored is None:
        raise store.missing(response_id)
    return stored.response


async def delete_response(request: Request, response_id: str) -> dict[str, Any]:
    store = state_of(request).stored
    if not store.delete(response_id):
        raise store.missing(response_id)
    return {"id": response_id, "object": "response.deleted", "deleted": True}


async def _usable(request: Request) -> list[ModelInfo]:
    return [m for m in await state_of(request).backend.models() if m.usable]


async def models(request: Request) -> dict[str, Any]:
    return {"object": "list", "data": [openai.model_card(m.name, m.kind) for m in await _usable(request)]}


async def model(request: Request, name: str) -> dict[str, Any]:
    """One model's card, by its name or its short name (a store model's file part)."""
    found = next((m for m in await _usable(request) if name in (m.name, m.short_name)), None)
    if found is None:
        raise NotFound(f"model {name!r} does not exist or cannot be used; GET /v1/models lists the models")
    return openai.model_card(name, found.kind)
