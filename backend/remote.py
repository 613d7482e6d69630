"""RemoteBackend: the Backend protocol spoken over HTTP to a `corral serve` process.

`corral attach URL` runs the console on this class, so it must behave like `LocalBackend` in
every way the console can see: the same snapshots (`ModelInfo`, `Status`), the same `Chunk`
stream with stats on the final chunk, the same typed errors, and an event stream that does
not end when the network blips or the server restarts. The wire format is the one the server
implements: the OpenAI-compatible `/v1/*` routes, whose bodies and chunks `server/openai.py`
converts both ways for server and client alike, plus the `/api/*` admin routes.

Only httpx and corral's plain data modules are imported here, never llama_cpp or textual: the
console imports this module and must stay light and free of llama.cpp's log output.
"""

from __future__ import annotations

import asyncio
import functools
import json
import re
import time
import weakref
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import httpx

from . import errors
from .errors import (BudgetExceeded, CorralError, InsufficientDisk, ModelFileError, ModelNotFound, QueueFull,
                     ServerUnreachable)
from .events import Dropped, Event, Notice, event_from_dict
from .generation import Chunk, Embeddings, Ranked, Reranking
from .inflight import RequestInfo, checked_canceller
from .modellog import LogLine
from .pull.status import PullStatus
from .request import OWN_APIS, GenerationRequest, chat_request, completion_request
from .server.anthropic import count_body
from .server.openai import chunk_from_wire, wire_body
from .versions import ConfigVersion
from .snapshot import LoadPlan, ModelDetails, ModelInfo, Status

if TYPE_CHECKING:
    from .protocol import LoopThread, SyncBackend

# Reconnecting the event stream: start fast (a restart of the server takes a second or two),
# double per failure, and never wait longer than this between tries.
_BACKOFF_START_S = 0.05
_BACKOFF_CAP_S = 2.0
# The server sends a `: ping` comment every 15 s, so this much silence means a dead connection.
_EVENTS_SILENCE_S = 45.0


def _error_classes() -> dict[str, type[CorralError]]:
    """Every CorralError subclass by its wire `code`, found rather than listed so a new error
    type in errors.py maps back without touching this file."""
    found: dict[str, type[CorralError]] = {}
    pending: list[type[CorralError]] = [CorralError]
    while pending:
        cls = pending.pop()
        if cls.__module__ == errors.__name__:
            found.setdefault(cls.code, cls)
        pending.extend(cls.__subclasses__())
    return found


def _unreachable(url: str, reason: object) -> CorralError:
    return ServerUnreachable(f"cannot reach corral server at {url}: {_reason(reason)}")


def _reason(exc: object) -> str:
    """Why a call failed, in words: httpx's timeouts and some resets have an empty str()."""
    text = str(exc).strip()
    if text:
        return text
    if isinstance(exc, httpx.TimeoutException):
        return f"no answer in time ({type(exc).__name__})"
    return type(exc).__name__


class RemoteBackend:
    """A Backend whose models live in a `corral serve` process reached over HTTP.

    One `httpx.AsyncClient` is kept per event loop that uses the backend, because httpx ties
    its pooled connections to the loop that opened them; a notebook calling `asyncio.run`
    twice, or a test per loop, therefore works just as it does with `LocalBackend`.
    """

    kind = "remote"

    def __init__(self, url: str, *, api_key: str | None = None, timeout: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self.label = self.url
        self.timeout = timeout
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, httpx.AsyncClient] = (
            weakref.WeakKeyDictionary())
        self._errors = _error_classes()
        self._closed = False
        self._runner: LoopThread | None = None  # the loop of `sync`, started on its first use

    # -- plumbing --------------------------------------------------------------------------

    def _client(self) -> httpx.AsyncClient:
        if self._closed:
            raise CorralError(f"the connection to corral server at {self.url} was closed (aclose)")
        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is None:
            client = httpx.AsyncClient(base_url=self.url, headers=self._headers,
                                       timeout=httpx.Timeout(self.timeout))
            self._clients[loop] = client
        return client

    def _waiting(self) -> httpx.Timeout:
        """For calls whose length is the server's work (a load, a drain, a queue wait): connect
        and send within `timeout`, then wait for the answer as long as the server works on it
        (the server bounds those waits itself)."""
        return httpx.Timeout(self.timeout, read=None)

    async def _request(self, method: str, path: str, *, json_body: Any = None,
                       params: dict[str, str] | None = None, headers: dict[str, str] | None = None,
                       timeout: httpx.Timeout | None = None, model: str | None = None) -> Any:
        """Send one request and return its JSON body, or raise the CorralError it stands for."""
        kwargs: dict[str, Any] = {"json": json_body, "params": params, "headers": headers}
        if timeout is not None:
            kwargs["timeout"] = timeout
        try:
            response = await self._client().request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise _unreachable(self.url, exc) from exc
        if response.is_error:
            raise self._error(response, model)
        try:
            return response.json()
        except ValueError as exc:
            raise CorralError(f"corral server at {self.url} sent a body that is not JSON for "
                              f"{method} {path}: {response.text[:200]!r}") from exc

    def _error(self, response: httpx.Response, model: str | None = None) -> CorralError:
        """Rebuild the typed error the server sent (its body must already be read).

        The server's message is kept verbatim: it is what a person acts on, and the remote
        console shows it exactly as the embedded one shows the local exception."""
        try:
            detail = _detail(response.json())
        except ValueError:
            detail = {}
        message = str(detail.get("message") or "")
        if not message:
            text = response.text.strip()[:300] or response.reason_phrase
            message = (f"corral server at {self.url} answered {response.request.method} "
                       f"{response.request.url.path} with HTTP {response.status_code}: {text}")
        return self._typed(detail, message, response, model)

    def _typed(self, detail: dict[str, Any], message: str, response: httpx.Response | None,
               model: str | None = None) -> CorralError:
        """The typed error of an error body's `error` object, also of one that came inside a
        stream (then without a response of its own)."""
        code = str(detail.get("code") or "")
        cls = self._errors.get(code)
        if cls is None:  # unauthorized, or a code this client does not know yet
            error = CorralError(message)
            error.code = code or error.code
            if response is not None:
                error.http_status = response.status_code
            return error
        error = cls.__new__(cls)
        CorralError.__init__(error, message)  # the subclasses' own __init__ compose a message
        self._fill_fields(error, detail, response, model)
        return error

    @staticmethod
    def _fill_fields(error: CorralError, detail: dict[str, Any], response: httpx.Response | None,
                     model: str | None) -> None:
        """Give a rebuilt error the attributes its class promises, from the body where the
        server sent them and from the message or the request otherwise."""
        message = error.message
        if isinstance(error, QueueFull):
            header = response.headers.get("Retry-After", "") if response is not None else ""
            depth = re.search(r"\((\d+) waiting\)", message)
            error.model = detail.get("model") or model or ""
            error.depth = int(detail.get("depth") or (depth.group(1) if depth else 0))
            error.retry_after = float(header) if header.replace(".", "", 1).isdigit() else 1.0
        elif isinstance(error, ModelNotFound):
            known = re.search(r"known models: (.*?)\. ", message)
            listed = [] if not known or known.group(1) == "none" else known.group(1).split(", ")
            name = re.search(r"unknown model '([^']*)'", message)
            error.name = detail.get("name") or (name.group(1) if name else model or "")
            error.known = sorted(detail.get("known") or listed)
        elif isinstance(error, ModelFileError):
            error.path = detail.get("path") or ""
            error.reason = detail.get("reason") or message
            error.model = detail.get("model") or model
        elif isinstance(error, (BudgetExceeded, InsufficientDisk)):  # the numbers are in the message for people
            error.needed = int(detail.get("needed") or 0)
            error.free = int(detail.get("free") or 0)
            if isinstance(error, InsufficientDisk):
                error.path = detail.get("path") or ""

    @staticmethod
    def _ids(request_id: str | None, session_id: str | None) -> dict[str, str]:
        headers = {}
        if request_id is not None:
            headers["X-Request-Id"] = request_id
        if session_id is not None:
            headers["X-Session-Id"] = session_id
        return headers

    @staticmethod
    def _model_path(name: str, action: str = "") -> str:
        path = f"/api/models/{quote(name, safe='')}"
        return f"{path}/{action}" if action else path

    # -- queries and actions ---------------------------------------------------------------

    async def ready(self) -> None:
        """Wait while the server says it is starting (up to `timeout`); an unreachable or
        draining server is an error at once, so `corral attach` with a wrong URL fails fast."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        while True:
            try:
                response = await self._client().get("/health")
            except httpx.TransportError as exc:
                raise _unreachable(self.url, exc) from exc
            if response.status_code == 200:
                return
            try:
                body = response.json()
                state, why = str(body.get("status", "")), str(body.get("reason", ""))
            except (ValueError, AttributeError):
                state, why = "", response.text[:200]
            reason = f"health is {response.status_code} {state}".rstrip() + (f" ({why})" if why else "")
            if state != "starting" or loop.time() >= deadline:
                raise _unreachable(self.url, reason)
            await asyncio.sleep(0.1)

    async def warmed(self) -> None:
        """The server's health is 200 only once its warm restart is done: `ready` covers it."""
        await self.ready()

    async def status(self) -> Status:
        return Status.from_dict(await self._request("GET", "/api/ps"))

    # -- configuration ---------------------------------------------------------------------

    async def reload_config(self, source: str = "api") -> ConfigVersion:
        """Ask the server to read its config file again; `source` is api, console or cli."""
        return ConfigVersion.from_dict(await self._request("POST", "/api/config/reload", params={"source": source},
                                                           timeout=self._waiting()))

    async def rollback_config(self, number: int, source: str = "api") -> ConfigVersion:
        return ConfigVersion.from_dict(await self._request("POST", f"/api/config/rollback/{int(number)}",
                                                           params={"source": source}, timeout=self._waiting()))

    async def config_versions(self) -> list[ConfigVersion]:
        data = await self._request("GET", "/api/config/versions")
        return [ConfigVersion.from_dict(v) for v in data["versions"]]

    async def config_text(self, number: int) -> str | None:
        """The TOML text version `number` came from (None: it had no file)."""
        return (await self._request("GET", f"/api/config/versions/{int(number)}")).get("text")

    async def models(self) -> list[ModelInfo]:
        return list((await self.status()).models)

    async def load(self, name: str, keep_alive: float | str | None = None) -> ModelInfo:
        params = None if keep_alive is None else {"keep_alive": str(keep_alive)}
        data = await self._request("POST", self._model_path(name, "load"), params=params,
                                   timeout=self._waiting(), model=name)
        return ModelInfo.from_dict(data)

    async def details(self, name: str) -> ModelDetails:
        """The server's details of `name`'s file; hashing a big file the first time takes a while."""
        data = await self._request("GET", self._model_path(name), timeout=self._waiting(), model=name)
        return ModelDetails.from_dict(data)

    async def plan(self, name: str, **overrides: Any) -> LoadPlan:
        params = {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in overrides.items()}
        return LoadPlan.from_dict(await self._request("GET", self._model_path(name, "plan"), params=params, model=name))

    async def logs(self, name: str) -> list[LogLine]:
        data = await self._request("GET", self._model_path(name, "logs"), model=name)
        return [LogLine.from_dict(line) for line in data["lines"]]

    async def evict(self, name: str, *, force: bool = False) -> ModelInfo:
        data = await self._request("POST", self._model_path(name, "evict"),
                                   params={"force": "true" if force else "false"},
                                   timeout=self._waiting(), model=name)
        return ModelInfo.from_dict(data)

    async def pin(self, name: str, pinned: bool = True) -> ModelInfo:
        data = await self._request("POST", self._model_path(name, "pin" if pinned else "unpin"), model=name)
        return ModelInfo.from_dict(data)

    async def requests(self) -> list[RequestInfo]:
        return [RequestInfo.from_dict(r) for r in (await self._request("GET", "/api/requests"))["requests"]]

    async def cancel_request(self, request_id: str, by: str = "python") -> list[RequestInfo]:
        """Cancel a request on the server by id (DELETE /api/requests/{id}); NotFound when none has it."""
        data = await self._request("DELETE", f"/api/requests/{quote(request_id, safe='')}",
                                   params={"by": checked_canceller(by)})
        return [RequestInfo.from_dict(r) for r in data["cancelled"]]

    async def unload_all(self) -> None:
        await self._request("POST", "/api/unload-all", timeout=self._waiting())

    async def rescan(self) -> list[ModelInfo]:
        data = await self._request("POST", "/api/rescan")
        return [ModelInfo.from_dict(m) for m in data["models"]]

    # -- pulling models --------------------------------------------------------------------

    async def pull(self, source: str, *, name: str | None = None, sha256: str | None = None,
                   directory: str | None = None) -> AsyncIterator[PullStatus]:
        """Pull a model into the server's model folder (POST /api/models/pull), with its
        progress; `directory` is a folder on the server. Leaving the stream closes the
        connection, which cancels the pull unless another client follows it."""
        body = {k: v for k, v in (("source", source), ("name", name), ("sha256", sha256), ("dir", directory))
                if v is not None}
        try:
            async with self._client().stream("POST", "/api/models/pull", json=body,
                                             timeout=self._waiting()) as response:
                if response.is_error:
                    await response.aread()
                    raise self._error(response)
                async for _, event, data in sse_events(response):
                    payload = json.loads(data)
                    if event == "error":
                        detail = _detail(payload)
                        raise self._typed(detail, str(detail.get("message") or f"the pull failed: {data[:300]}"), None)
                    status = PullStatus.from_dict(payload)
                    yield status
                    if status.finished:
                        return
        except httpx.TransportError as exc:
            raise _unreachable(self.url, exc) from exc
        raise CorralError(f"corral server at {self.url} ended the pull of {source} without saying how it ended; "
                          "run the pull again (it resumes)")

    async def cancel_pull(self, pull_id: str) -> PullStatus:
        return PullStatus.from_dict(await self._request("DELETE", f"/api/pulls/{quote(pull_id, safe='')}",
                                                        timeout=self._waiting()))

    async def pulls(self) -> list[PullStatus]:
        return [PullStatus.from_dict(p) for p in (await self._request("GET", "/api/pulls"))["pulls"]]

    async def remove(self, name: str) -> list[str]:
        data = await self._request("DELETE", self._model_path(name), timeout=self._waiting(), model=name)
        return [str(path) for path in data["removed"]]

    # -- generation ------------------------------------------------------------------------

    def complete(self, model: str, prompt: str, **fields: Any) -> AsyncIterator[Chunk]:
        """Stream a plain-text completion of `prompt` (the server loads the model if needed);
        `fields` as for `LocalBackend.complete`."""
        return self.generate(completion_request(model, prompt, **fields))

    def chat(self, model: str, messages: list[dict[str, Any]], **fields: Any) -> AsyncIterator[Chunk]:
        """Stream the assistant's reply to `messages`, formatted by the server's chat template;
        `fields` as for `LocalBackend.chat` (tools, tool_choice, response_format, ...)."""
        return self.generate(chat_request(model, messages, **fields))

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        """Stream `request` from the server (POST with stream=true): answer text, reasoning,
        tool-call deltas and logprobs, then the final chunk with its stats. It is validated
        here, so a typo fails with the same BadRequest as in-process and never costs a round trip.

        Leaving early (break, aclose, cancellation) exits the `async with`, which closes the
        response and its connection: that disconnect is how the server learns to cancel the
        generation and free its slot."""
        request.validate()
        path, body = wire_body(request)
        body.update(stream=True, stream_options={"include_usage": True})
        chat = request.messages is not None
        headers = self._ids(request.request_id, request.session_id)
        if request.api in OWN_APIS:
            headers["X-Corral-Api"] = request.api
        final: Chunk | None = None
        answered = False
        verdict: str | None = None  # the response cache's, for the first chunk we yield
        try:
            async with self._client().stream("POST", path, json=body, timeout=self._waiting(),
                                             headers=headers) as response:
                answered = True
                if response.is_error:
                    await response.aread()
                    raise self._error(response, request.model)
                verdict = response.headers.get("x-corral-cache")
                async for _, _, data in sse_events(response):
                    if final is not None or data.strip() == "[DONE]":
                        continue  # read to the end, so the connection goes back to the pool
                    try:
                        chunk = chunk_from_wire(json.loads(data), chat)
                    except (ValueError, TypeError, AttributeError, IndexError, KeyError) as exc:
                        raise CorralError(f"corral server at {self.url} sent an unreadable stream "
                                          f"chunk ({_reason(exc)}): {data[:200]!r}") from exc
                    if chunk.finish_reason is not None:
                        final = chunk  # yielded after [DONE], so the connection is reusable
                    elif not chunk.empty:
                        yield replace(chunk, cache=verdict) if verdict else chunk
                        verdict = None
        except httpx.TransportError as exc:
            if not answered:
                raise _unreachable(self.url, exc) from exc
            if final is None:
                lost = CorralError(f"lost the connection to corral server at {self.url} during a "
                                   f"generation: {_reason(exc)}")
                lost.http_status, lost.code = 503, "connection_lost"
                raise lost from exc
        if final is None:
            raise CorralError(f"corral server at {self.url} ended a generation stream without "
                              "its final chunk")
        yield replace(final, cache=verdict) if verdict else final

    async def count_tokens(self, request: GenerationRequest) -> int:
        """How many tokens a chat request's prompt takes on the server (its count_tokens route)."""
        request.validate()
        data = await self._request("POST", "/v1/messages/count_tokens", json_body=count_body(request),
                                   headers=self._ids(request.request_id, request.session_id),
                                   timeout=self._waiting(), model=request.model)
        return int(data["input_tokens"])

    async def embed(self, model: str, inputs: str | list[str], *, request_id: str | None = None,
                    session_id: str | None = None, keep_alive: float | str | None = None) -> Embeddings:
        """One pooled vector per input (a single string gives one vector)."""
        body: dict[str, Any] = {"model": model, "input": inputs}
        if keep_alive is not None:
            body["keep_alive"] = keep_alive
        data = await self._request("POST", "/v1/embeddings", json_body=body,
                                   headers=self._ids(request_id, session_id),
                                   timeout=self._waiting(), model=model)
        rows = sorted(data["data"], key=lambda row: row["index"])
        return Embeddings(vectors=[list(map(float, row["embedding"])) for row in rows],
                          prompt_tokens=int(data.get("usage", {}).get("prompt_tokens", 0)))

    async def rerank(self, model: str, query: str, documents: list[str], top_n: int | None = None, *,
                     request_id: str | None = None, session_id: str | None = None,
                     keep_alive: float | str | None = None) -> Reranking:
        """The server's reranker scores, highest first, cut to `top_n` (its /v1/rerank)."""
        body: dict[str, Any] = {"model": model, "query": query, "documents": documents}
        if top_n is not None:
            body["top_n"] = top_n
        if keep_alive is not None:
            body["keep_alive"] = keep_alive
        data = await self._request("POST", "/v1/rerank", json_body=body, headers=self._ids(request_id, session_id),
                                   timeout=self._waiting(), model=model)
        return Reranking(results=[Ranked(int(row["index"]), float(row["relevance_score"])) for row in data["results"]],
                         prompt_tokens=int(data.get("usage", {}).get("prompt_tokens", 0)))

    # -- events ----------------------------------------------------------------------------

    async def events(self, after_seq: int | None = None) -> AsyncIterator[Event]:
        """Typed events from the server, for as long as the caller reads.

        A dropped connection or a restarted server is reconnected with capped exponential
        backoff, announced by a `Notice` (so the console shows the outage). A reconnect asks
        for the whole replay ring (`Last-Event-ID: 0`) and keeps what is new: an event is new
        when its seq is past the last one seen, or when it is later in time than that one.
        The time test catches a restarted server, whose seq counts again from 1; resuming after
        the old seq would hide its events until its counter caught up. When the ring no longer
        holds all that was missed, a `Dropped` says how many events are lost."""
        last_seq, last_ts = after_seq, None
        delay = _BACKOFF_START_S
        outage = False
        loop = asyncio.get_running_loop()
        while not self._closed:
            connected_at: float | None = None
            replay = last_ts is not None
            headers = {"Last-Event-ID": "0" if replay else str(last_seq)} if last_seq is not None else {}
            failure: object = None
            try:
                async with self._client().stream("GET", "/api/events", headers=headers, timeout=httpx.Timeout(
                        self.timeout, read=max(self.timeout, _EVENTS_SILENCE_S))) as response:
                    if response.is_error:
                        await response.aread()
                        error = self._error(response)
                        if response.status_code < 500:
                            raise error  # a wrong key or a missing route: retrying cannot help
                        failure = error.message
                    else:
                        if outage:
                            outage = False
                            yield _notice("info", f"reconnected to corral server at {self.url}")
                        connected_at = loop.time()
                        first = True
                        async for _, _, data in sse_events(response):
                            try:
                                event = event_from_dict(json.loads(data))
                            except (ValueError, TypeError) as exc:
                                yield _notice("warning", f"unreadable event from {self.url}: "
                                                         f"{_reason(exc)}: {data[:200]!r}")
                                continue
                            if replay and last_seq is not None and last_ts is not None:
                                if first and isinstance(event, Dropped):
                                    first = False  # counts the ring's losses from seq 0, not ours
                                    if event.count > last_seq:
                                        yield replace(event, count=event.count - last_seq)
                                    continue
                                if event.seq and event.seq <= last_seq and event.ts <= last_ts:
                                    first = False
                                    continue  # seen before this reconnect
                            first = False
                            if event.seq:
                                last_seq, last_ts = event.seq, event.ts
                            yield event
                        failure = "the server ended the event stream"
            except httpx.TransportError as exc:
                failure = exc
            except Exception:
                if self._closed:  # aclose() pulled the connection from under the read
                    return
                raise
            if self._closed:
                return
            if connected_at is not None and loop.time() - connected_at > _BACKOFF_CAP_S:
                delay = _BACKOFF_START_S  # a connection that held was no failure loop: retry fast
            if not outage:
                outage = True
                yield _notice("warning", f"lost the event stream from corral server at {self.url} "
                                         f"({_reason(failure)}); reconnecting")
            await asyncio.sleep(delay)
            delay = min(delay * 2, _BACKOFF_CAP_S)

    # -- blocking use ----------------------------------------------------------------------

    @functools.cached_property
    def sync(self) -> SyncBackend:
        """Blocking twins of the methods, as `LocalBackend.sync` has (`backend.sync.models()`).

        They run on a private loop thread, started on first use, so plain scripts and cells
        inside Jupyter's running loop can both block on them."""
        from .protocol import LoopThread, SyncBackend  # not at import: the console never blocks

        self._runner = LoopThread("corral-remote-sync")
        return SyncBackend(self, self._runner.submit)

    def close(self) -> None:
        """The blocking twin of `aclose` (scripts, `with`), usable inside a running loop too."""
        if not self._closed:
            self.sync.run(self.aclose())
        if self._runner is not None:
            self._runner.stop()

    def __enter__(self) -> RemoteBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- shutdown --------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Close every connection (open streams end) and stop the loop of `sync`; later calls
        raise. Idempotent."""
        self._closed = True
        current = asyncio.get_running_loop()
        clients, self._clients = list(self._clients.items()), weakref.WeakKeyDictionary()
        runner = self._runner
        for loop, client in clients:
            if loop is current:
                await client.aclose()
            elif loop.is_running():  # another thread's loop: close it there
                closing = asyncio.run_coroutine_threadsafe(client.aclose(), loop)
                if runner is not None and loop is runner.loop:
                    await asyncio.wrap_future(closing)  # that loop stops next
            # a closed loop already took its connections down with it
        if runner is not None and runner.loop is not current:  # on it, `close` stops it after
            await asyncio.to_thread(runner.stop)

    async def __aenter__(self) -> RemoteBackend:
        await self.ready()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"RemoteBackend({self.url!r})"


async def sse_events(response: httpx.Response) -> AsyncIterator[tuple[str | None, str, str]]:
    """Server-sent events as (id, event name, data); comments such as `: ping` are skipped."""
    event_id: str | None = None
    name = "message"
    data: list[str] = []
    async for line in response.aiter_lines():
        if not line:
            if data:
                yield event_id, name, "\n".join(data)
            name, data = "message", []
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if field == "data":
            data.append(value)
        elif field == "event":
            name = value
        elif field == "id":
            event_id = value
    if data:  # a stream cut right after its last data line
        yield event_id, name, "\n".join(data)


def _detail(body: Any) -> dict[str, Any]:
    """The `error` object of an error body (OpenAI's shape, which the admin API answers in)."""
    return body["error"] if isinstance(body, dict) and isinstance(body.get("error"), dict) else {}


def _notice(level: str, message: str) -> Notice:
    """A client-side notice (no seq: the server never published it), stamped now like the
    bus stamps its own `Dropped`, so the console's log shows when the outage happened."""
    return Notice(ts=time.time(), level=level, message=message)
