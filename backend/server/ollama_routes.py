"""ollama's routes: each reads its body with ollama.py and makes one Backend call (or runs the
shared generation runner), and errors come back as `{"error": ...}` by the route table's
prefix.

They live under `/ollama` on corral's own port, beside corral's admin API (whose `/api/ps`
ollama's would collide with): point an ollama client at `http://HOST:PORT/ollama`. On the
ollama port (`--ollama-port`), `OllamaPort` serves them at ollama's own paths, so clients that
assume `127.0.0.1:11434` work with no setting changed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from fastapi import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from ..errors import BadRequest, NotSupported
from . import ollama, ollama_models
from .middleware import ids, read_json, state_of
from .streams import answer, embedding

PREFIX = "/ollama"


class OllamaPort:
    """Pure ASGI: a request that arrives on the ollama port for `/` or `/api/*` is served by the
    ollama routes under PREFIX; everything else there (`/v1/*`, `/health`) is served as on the main
    port, as ollama also serves OpenAI's API."""

    def __init__(self, app: ASGIApp, port: int) -> None:
        self.app, self.port = app, port

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        server = scope.get("server") or (None, None)
        path = scope.get("path", "")
        if scope["type"] == "http" and server[1] == self.port and (path == "/" or path.startswith("/api/")):
            path = PREFIX if path == "/" else PREFIX + path
            scope = {**scope, "path": path, "raw_path": path.encode()}
        await self.app(scope, receive, send)


async def root(request: Request) -> Response:
    return PlainTextResponse("corral is running (ollama API)")


async def version(request: Request) -> dict[str, Any]:
    return {"version": ollama.VERSION}


async def tags(request: Request) -> dict[str, Any]:
    backend = state_of(request).backend
    names = [m.name for m in await backend.models() if m.usable]
    return {"models": [ollama.tag(await backend.details(name)) for name in names]}


async def ps(request: Request) -> dict[str, Any]:
    backend = state_of(request).backend
    loaded = [m for m in await backend.models() if m.loaded]
    return {"models": [ollama.running(m, await backend.details(m.name)) for m in loaded]}


async def show(request: Request) -> dict[str, Any]:
    body = await read_json(request, ollama.ShowRequest)
    return ollama.show(await state_of(request).backend.details(body.target))


async def chat(request: Request) -> Response:
    return await _generate(request, await read_json(request, ollama.ChatRequest))


async def generate(request: Request) -> Response:
    return await _generate(request, await read_json(request, ollama.GenerateRequest))


async def _generate(request: Request, body: ollama.ChatRequest | ollama.GenerateRequest) -> Response:
    state = state_of(request)
    request.scope["corral.model"] = body.name
    if body.empty:  # ollama's clients load and unload models this way
        state.check_accepting()
        if body.keep_alive == 0:
            await state.backend.evict(body.name)
            return JSONResponse(ollama.load_answer(body, "unload"))
        await state.backend.load(body.name, keep_alive=body.keep_alive)
        return JSONResponse(ollama.load_answer(body, "load"))
    request_id, session_id = ids(request)
    generation = body.generation(request_id, session_id)
    generation.validate()
    if body.options is not None and body.options.num_ctx is not None:
        await _check_context(request, body.name, body.options.num_ctx)
    return await answer(request, generation, body.shape(request_id, session_id), stream=body.stream)


async def _check_context(request: Request, name: str, num_ctx: int) -> None:
    """corral loads a model once for every client, at its configured context: a request may ask
    for less (its prompt and answer must fit either way) but not for more."""
    info = next((m for m in await state_of(request).backend.models() if m.name == name), None)
    if info is not None and num_ctx > info.n_ctx:
        raise BadRequest(f"options.num_ctx = {num_ctx}: model {name!r} runs with a context of {info.n_ctx} tokens; "
                         "set n_ctx in its [[models]] entry of the config and reload it for a larger one")


async def embed(request: Request) -> dict[str, Any]:
    began = time.perf_counter()
    body = await read_json(request, ollama.EmbedRequest)
    name = ollama.model_name(body.model)
    result = await embedding(request, name, body.inputs(), keep_alive=body.keep_alive, api="ollama")
    return ollama.embed_answer(body.model, result, time.perf_counter() - began)


async def embeddings(request: Request) -> dict[str, Any]:
    body = await read_json(request, ollama.EmbeddingsRequest)
    if body.options is not None:
        body.options.sampling()
    result = await embedding(request, ollama.model_name(body.model), [body.prompt], keep_alive=body.keep_alive,
                             api="ollama")
    return {"embedding": result.vectors[0]}


def _refuse(message: str) -> Callable[[Request], Any]:
    async def refuse(request: Request) -> None:
        raise NotSupported(message)

    return refuse


async def refuse_blob(request: Request, digest: str) -> None:
    raise NotSupported("corral does not take model blobs; see /api/create")


routes: list[tuple[str, str, Callable[..., Any]]] = [
    ("GET", "", root),
    ("HEAD", "", root),
    ("GET", "/api/version", version),
    ("GET", "/api/tags", tags),
    ("GET", "/api/ps", ps),
    ("POST", "/api/show", show),
    ("POST", "/api/chat", chat),
    ("POST", "/api/generate", generate),
    ("POST", "/api/embed", embed),
    ("POST", "/api/embeddings", embeddings),
    ("POST", "/api/pull", ollama_models.pull),
    ("POST", "/api/push", _refuse("corral does not push models to a registry")),
    ("POST", "/api/create", _refuse("corral does not build models from Modelfiles; add a [[models]] entry (path, "
                                    "chat_template, params) or an [[alias]] with a system prompt to the config")),
    ("POST", "/api/copy", _refuse("to give a model a second name, add an [[alias]] (name, model) to corral's "
                                  "config and reload it (POST /api/config/reload)")),
    ("DELETE", "/api/delete", ollama_models.delete),
    ("HEAD", "/api/blobs/{digest}", refuse_blob),
    ("POST", "/api/blobs/{digest}", refuse_blob),
]
