"""The admin API: /api/* (status, model actions, configuration, the event stream) and /metrics.

Each handler is one Backend call; app.py's route table gives them their paths. Config
versions and events pass through `without_secrets` on the way out: an API key must not leak
to whoever may read the versions or the event stream.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Annotated, Any, TypeVar

from fastapi import Header, Query, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response

from ..errors import BadRequest, CorralError, NotFound
from ..events import Event
from ..metrics import CONTENT_TYPE
from ..pull.status import PullStatus
from . import openai
from .middleware import ids, read_json, state_of
from .streams import ClosingStream

log = logging.getLogger("corral.server")

T = TypeVar("T")

PING_INTERVAL_S = 15.0  # keeps proxies from closing an idle /api/events stream
CONFIG_SOURCES = ("api", "console", "cli")  # who may be named as a config change's source over HTTP
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


def _config_source(source: str) -> str:
    """The `source` a client names for a reload or rollback, from a short fixed list so the
    version history cannot be filled with arbitrary text."""
    if source not in CONFIG_SOURCES:
        raise BadRequest(f"source = {source!r}: must be one of {', '.join(CONFIG_SOURCES)}")
    return source


async def ps(request: Request) -> dict[str, Any]:
    return (await state_of(request).backend.status()).to_dict()


async def reload_config(request: Request, source: str = "api") -> dict[str, Any]:
    """Read the config file again and apply what changed (400 naming the key if invalid)."""
    return without_secrets((await state_of(request).backend.reload_config(_config_source(source))).to_dict())


async def config_versions(request: Request) -> dict[str, Any]:
    versions = await state_of(request).backend.config_versions()
    return {"current": versions[-1].number, "versions": [without_secrets(v.to_dict()) for v in versions]}


async def config_version(request: Request, number: int) -> dict[str, Any]:
    for version in await state_of(request).backend.config_versions():
        if version.number == number:
            return without_secrets(version.to_dict(with_settings=True))
    raise NotFound(f"config version {number} does not exist; list them at /api/config/versions")


async def rollback_config(request: Request, number: int, source: str = "api") -> dict[str, Any]:
    return without_secrets((await state_of(request).backend.rollback_config(number, _config_source(source))).to_dict())


async def load(request: Request, name: str, keep_alive: str | None = None) -> dict[str, Any]:
    """`keep_alive` as a request's: seconds ("300", "-1": forever) or a duration ("5m")."""
    return (await state_of(request).backend.load(name, keep_alive)).to_dict()


async def details(request: Request, name: str) -> dict[str, Any]:
    """One model's file: GET /api/models/{name} (hashed once per file version, off the loop)."""
    return (await state_of(request).backend.details(name)).to_dict()


async def plan(request: Request, name: str) -> dict[str, Any]:
    """A dry run of loading `name`: GET /api/models/{name}/plan?n_ctx=8192&type_k=q8_0..."""
    return (await state_of(request).backend.plan(name, **dict(request.query_params))).to_dict()


async def logs(request: Request, name: str) -> dict[str, Any]:
    """llama.cpp's lines of a model's loads and runs: GET /api/models/{name}/logs."""
    lines = await state_of(request).backend.logs(name)
    return {"model": name, "lines": [line.to_dict() for line in lines]}


async def evict(request: Request, name: str, force: bool = False) -> dict[str, Any]:
    return (await state_of(request).backend.evict(name, force=force)).to_dict()


async def pin(request: Request, name: str) -> dict[str, Any]:
    return (await state_of(request).backend.pin(name, True)).to_dict()


async def unpin(request: Request, name: str) -> dict[str, Any]:
    return (await state_of(request).backend.pin(name, False)).to_dict()


async def requests(request: Request) -> dict[str, Any]:
    """GET /api/requests: every request running or queued on a loaded model."""
    return {"requests": [r.to_dict() for r in await state_of(request).backend.requests()]}


async def cancel_request(request: Request, request_id: str, by: str = "api") -> dict[str, Any]:
    """DELETE /api/requests/{id}: end it with finish reason "cancelled" in its own dialect and free
    its slot at the next step; `by` (api, console, python) is named in its event."""
    cancelled = await state_of(request).backend.cancel_request(request_id, by)
    return {"cancelled": [r.to_dict() for r in cancelled]}


async def unload_all(request: Request) -> dict[str, Any]:
    await state_of(request).backend.unload_all()
    return {"ok": True}


async def rescan(request: Request) -> dict[str, Any]:
    return {"models": [m.to_dict() for m in await state_of(request).backend.rescan()]}


class PullBody(BaseModel):
    """POST /api/models/pull: what `corral pull` takes (`dir` is a folder on the server)."""

    model_config = ConfigDict(extra="forbid")
    source: str = Field(min_length=1, max_length=4096)
    name: str | None = Field(None, max_length=255)
    sha256: str | None = Field(None, max_length=71)
    dir: str | None = Field(None, max_length=4096)


async def pull(request: Request) -> Response:
    """Pull a model, its progress as SSE: `progress` events, then `done`, or `error` with the
    error body. Bad input is an ordinary JSON error before the stream starts; a client that
    disconnects stops following, which cancels the pull unless another client follows it."""
    body = await read_json(request, PullBody)
    state = state_of(request)
    state.check_accepting()
    flight = state.flight()  # the drain on shutdown waits for it, then the backend cancels it
    statuses = state.backend.pull(body.source, name=body.name, sha256=body.sha256, directory=body.dir)
    try:
        first = await anext(statuses)
    except BaseException:
        await flight.close(statuses)
        raise
    return ClosingStream(_pull_stream(first, statuses, ids(request)[0]), on_close=lambda: flight.close(statuses))


async def _pull_stream(first: PullStatus, statuses: AsyncIterator[PullStatus],
                       request_id: str) -> AsyncGenerator[str, None]:
    status: PullStatus | None = first
    try:
        while status is not None:
            yield _sse("done" if status.finished else "progress", status.to_dict())
            status = await anext(statuses, None)
    except CorralError as exc:
        yield _sse("error", openai.error_body(exc.code, exc.message, request_id))
    except Exception:
        log.exception("pull %s failed", request_id)
        yield _sse("error", openai.error_body("internal_error", f"internal error (request {request_id}); see the "
                                              "server log", request_id))


def _sse(event: str, data: dict[str, Any]) -> str:
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def pulls(request: Request) -> dict[str, Any]:
    return {"pulls": [p.to_dict() for p in await state_of(request).backend.pulls()]}


async def cancel_pull(request: Request, pull_id: str) -> dict[str, Any]:
    """DELETE /api/pulls/{id}: stop a running pull for every client; its partial file stays."""
    return (await state_of(request).backend.cancel_pull(pull_id)).to_dict()


async def remove(request: Request, name: str) -> dict[str, Any]:
    """DELETE /api/models/{name}: delete a model corral pulled (409 for anyone else's file)."""
    return {"name": name, "removed": await state_of(request).backend.remove(name)}


async def metrics(request: Request) -> Response:
    state = state_of(request)
    status = None
    if state.ready:
        try:
            status = await state.backend.status()
        except Exception:  # counters still scrape when the status cannot be read
            log.exception("metrics: could not read the backend status")
    return Response(state.metrics.render(status), media_type=CONTENT_TYPE)


async def events(request: Request, after: Annotated[int | None, Query(ge=0)] = None,
                 last_event_id: Annotated[str | None, Header()] = None) -> Response:
    state = state_of(request)
    if last_event_id is not None:
        if not re.fullmatch(r"[0-9]{1,18}", last_event_id.strip()):
            raise BadRequest(f"Last-Event-ID = {last_event_id!r}: must be an event sequence number")
        after = int(last_event_id)
    state.check_accepting()
    # Subscribe before answering: nothing published after the headers arrive is missed.
    subscription = state.backend.events(after_seq=after)
    return ClosingStream(_event_stream(subscription, state.stopping), on_close=lambda: _close_iterator(subscription))


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
