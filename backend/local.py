"""The in-process backend: the model manager behind the Backend protocol (protocol.py).

`LocalBackend` runs the model manager in-process on a loop of its own, in a background
thread. Callers on any loop (Textual's, uvicorn's, Jupyter's) await its methods; scripts use
`backend.sync`. Manager work therefore never competes with a UI loop, and a notebook can block
on a call without deadlocking its own loop. Streamed chunks travel from the engine thread
straight to the caller's loop; only acquire/release cross to the backend loop.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import functools
import logging
import time
import weakref
from pathlib import Path
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Coroutine
from concurrent.futures import Future
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, TypeVar

from .config import ConfigSource, Settings, config_source
from .digests import Digests, describe
from .liveconfig import LiveConfig
from .errors import BadRequest
from .events import Event, EventBus, RequestFinished
from .generation import (LOOP_GUARD, Chunk, Embeddings, Grammar, Ranked, Reranking, SamplingFields,
                         SamplingParams, sampling_params)
from .inflight import RequestInfo, checked_canceller
from .kinds import CHAT, EMBEDDING, FINISH_REASONS, RERANK, check_serves, model_kind
from .modellog import LogLine
from .protocol import LoopThread, SyncBackend
from .pull.record import PullRecord
from .pull.registry import Pulls
from .pull.status import PullStatus
from .rendering import cache_payload, check_request, prepare
from .request import GenerationRequest, Message, chat_request, completion_request
from .respcache import BYPASS, MISS, STALE, CacheKey, Lookup, ResponseCache, model_fingerprint, relay, request_key
from .snapshot import LoadPlan, ModelDetails, ModelInfo, Status, StoreInfo
from .telemetry import Telemetry
from .versions import ConfigHistory

if TYPE_CHECKING:
    from .catalog import CatalogEntry
    from .engine import Engine
    from .manager import Manager
    from .records import Lease

log = logging.getLogger("corral.local")

T = TypeVar("T")
MAX_EMBED_INPUTS = 2048  # texts to embed, or documents to rerank, in one request


class LocalBackend(LiveConfig):
    """The in-process backend: a `Manager` on a private event loop thread."""

    kind = "local"
    label = "embedded"

    def __init__(self, settings: Settings | None = None, *, config: ConfigSource | str | None = None,
                 watch_config: bool = False, state_file: Path | None = None,
                 pulled_file: Path | None = None) -> None:
        """`settings` as given, or read from `config` (a ConfigSource or a TOML path; None: the
        default file). Only a backend with a config source can reload it; `watch_config`
        reloads on every change of the file. `state_file` enables warm restarts. `pulled_file`
        records what `pull` downloaded, which is what `remove` may delete (default: pulled.json
        beside the state file; with neither, the record lasts as long as the backend)."""
        if settings is not None and config is None:
            self._source: ConfigSource | None = None
            text = None
        else:
            self._source = config if isinstance(config, ConfigSource) else config_source(config)
            read, text = self._source.read()
            settings = settings or read
        self.settings = settings
        self.history = ConfigHistory()
        self.history.record(settings, text, "start", [], [])
        self._config_lock: asyncio.Lock | None = None  # made on the backend loop
        self._state_file = state_file
        self.digests = Digests(state_file.with_name("digests.json") if state_file else None)
        self._pull_record = PullRecord(pulled_file or (state_file.with_name("pulled.json") if state_file else None))
        self.bus = EventBus()
        self.response_cache = ResponseCache(self.settings.cache, bus=self.bus)
        self._refreshes: set[Future[None]] = set()  # background recomputes of stale answers
        self.telemetry = Telemetry()
        self._runner = LoopThread("corral-backend")
        self._loop, self._thread = self._runner.loop, self._runner.thread
        self.manager: Manager = self._submit(self._create_manager()).result()
        self._started: Future[None] = self._submit(self.manager.start())
        self._watcher: Future[None] | None = None
        if watch_config and self._source is not None:
            self._watcher = self._submit(self._watch_config(self._source.file))
        self._closed = False
        self.sync = SyncBackend(self, self._submit)
        _live.add(self)

    async def _create_manager(self) -> Manager:
        from .manager import Manager  # llama.cpp is loaded only by a backend that runs models

        self._config_lock = asyncio.Lock()
        self._stop_watching = asyncio.Event()
        manager = Manager(self.settings, self.bus, telemetry=self.telemetry, state_file=self._state_file)
        self._pulls = Pulls(manager, self.bus, self._pull_record)
        manager.source_names = self._pull_record.source_names
        await manager.refresh_source_names()
        return manager

    def _submit(self, coro: Coroutine[Any, Any, T]) -> Future[T]:
        return self._runner.submit(coro)

    async def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run `coro` on the backend loop and await it from whichever loop we are on."""
        if asyncio.get_running_loop() is self._loop:
            return await coro
        return await asyncio.wrap_future(self._submit(coro))

    async def ready(self) -> None:
        """Wait until the catalog is scanned (preloads go on in the background)."""
        await asyncio.wrap_future(self._started)

    async def warmed(self) -> None:
        """Wait until the models of the last run are loaded again (warm restart) as well."""
        await self.ready()
        if self.manager.restored is not None:
            await self._call(_wait_quietly(self.manager.restored))

    # -- configuration ---------------------------------------------------------------------

    # -- queries and actions ---------------------------------------------------------------

    async def models(self) -> list[ModelInfo]:
        await self.ready()
        return await self._call(_sync_value(self.manager.models))

    async def status(self) -> Status:
        models = await self.models()
        host = await asyncio.to_thread(self.telemetry.sample)
        reserved = await self._call(_sync_value(self.manager.ram_reserved))
        return Status(tuple(models), host, self.manager.ram_budget, reserved,
                      self.settings.budgets.max_loaded)

    async def load(self, name: str, keep_alive: float | str | None = None) -> ModelInfo:
        """Load `name`; a `keep_alive` (seconds or "5m"; negative: forever) sets its idle keep-alive."""
        await self.ready()
        return await self._call(self.manager.load(name, keep_alive))

    async def details(self, name: str) -> ModelDetails:
        """The facts of `name`'s file (header, size, sha256), read and hashed off the loops; an
        alias describes its base model's file. ModelNotFound for a name the catalog lacks."""
        await self.ready()
        entry, n_ctx, template, alias_of = await self._call(_sync_value(lambda: self._file_of(name)))
        return await asyncio.to_thread(describe, name, entry.path, self.digests, n_ctx=n_ctx,
                                       chat_template=template, alias_of=alias_of, source=entry.source,
                                       known_digest=entry.digest, store=entry.store)

    async def plan(self, name: str, **overrides: Any) -> LoadPlan:
        """A dry run of loading `name` now, with other values of its settings (n_ctx, n_parallel,
        n_batch, n_ubatch, type_k, type_v, flash_attn, n_gpu_layers) if given: the estimate, the
        budget, what would be evicted, or why it cannot fit and what would; nothing changes."""
        await self.ready()
        return await self._call(self.manager.plan(name, overrides))

    async def logs(self, name: str) -> list[LogLine]:
        """llama.cpp's lines of `name`'s loads and runs, oldest first (the last LOG_LINES of
        them), kept across a failed load; ModelNotFound for a name the catalog lacks."""
        await self.ready()
        return await self._call(_sync_value(lambda: self.manager.logs(name)))

    def _file_of(self, name: str) -> tuple[CatalogEntry, int, str | None, str | None]:
        """On the backend loop: the model's catalog entry, its n_ctx, the template its chats take
        from config or GGUF, and the base model of an alias."""
        record, alias = self.manager.record(name), self.manager.alias(name)
        info = record.entry.info
        template = record.own_template(info.chat_template if info else None)
        return record.entry, record.settings.n_ctx, template, alias.model if alias else None

    async def evict(self, name: str, *, force: bool = False) -> ModelInfo:
        await self.ready()
        return await self._call(self.manager.evict(name, force=force))

    async def pin(self, name: str, pinned: bool = True) -> ModelInfo:
        await self.ready()
        return await self._call(self.manager.pin(name, pinned))

    async def requests(self) -> list[RequestInfo]:
        """Every request running or queued on a loaded model now (a request still waiting for
        its model to load is in no engine yet, so not among them)."""
        await self.ready()
        return await self._call(_sync_value(self.manager.requests))

    async def cancel_request(self, request_id: str, by: str = "python") -> list[RequestInfo]:
        """Cancel the running or queued request with this id: its stream ends with finish reason
        "cancelled" and its slot is free at the engine's next step; the request_finished event
        names `by` (api, console or python). NotFound when no request has the id."""
        checked_canceller(by)
        await self.ready()
        return await self._call(_sync_value(lambda: self.manager.cancel_request(request_id, by)))

    async def unload_all(self) -> None:
        await self.ready()
        await self._call(self.manager.unload_all())

    async def rescan(self) -> list[ModelInfo]:
        await self.ready()
        return await self._call(self.manager.rescan())

    # -- pulling models --------------------------------------------------------------------

    async def pull(self, source: str, *, name: str | None = None, sha256: str | None = None,
                   directory: str | Path | None = None) -> AsyncGenerator[PullStatus, None]:
        """Download a model into a model folder and add it to the catalog, reporting progress;
        the last status is `done` (a failure raises, naming what to do). `source`: an https URL
        of a .gguf, hf://owner/repo/file.gguf or hf://owner/repo:QUANT. The same pull already
        running is joined; leaving the stream cancels it unless someone else follows it, and
        the partial file stays for the next run to resume."""
        await self.ready()
        job = await self._call(self._pulls.start(source, name=name, sha256=sha256, directory=directory))
        statuses = job.follow()
        try:
            while (status := await self._call(_next_or_none(statuses))) is not None:
                yield status
        finally:
            with contextlib.suppress(RuntimeError):  # a closed loop: the backend took its pulls down
                self._loop.call_soon_threadsafe(self._pulls.leave, job)

    async def cancel_pull(self, pull_id: str) -> PullStatus:
        """Stop a running pull for everyone following it (its partial file stays)."""
        await self.ready()
        return await self._call(self._pulls.cancel(pull_id))

    async def pulls(self) -> list[PullStatus]:
        """The pulls running now."""
        await self.ready()
        return await self._call(_sync_value(self._pulls.running))

    async def remove(self, name: str) -> list[str]:
        """Delete a model that `pull` downloaded (all its files) and drop it from the catalog;
        NotPulled for anything else. Returns the files deleted."""
        await self.ready()
        return await self._call(self._pulls.remove(name))

    # -- generation ------------------------------------------------------------------------

    def complete(self, model: str, prompt: str, **fields: Any) -> AsyncIterator[Chunk]:
        """Stream a plain-text completion of `prompt`. `fields` are `GenerationRequest` fields
        (grammar, response_format, logprobs, top_logprobs, keep_alive, cache, request_id,
        session_id) and sampling options (max_tokens, temperature, ...)."""
        return self.generate(completion_request(model, prompt, **fields))

    def chat(self, model: str, messages: list[dict[str, Any]], **fields: Any) -> AsyncIterator[Chunk]:
        """Stream the assistant's reply to `messages` (OpenAI's shapes: text parts, tool_calls,
        tool messages), formatted with the model's chat template. Besides `complete`'s fields:
        tools, tool_choice, parallel_tool_calls, reasoning, reasoning_effort, template_kwargs."""
        return self.generate(chat_request(model, messages, **fields))

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[Chunk, None]:
        """The one way text is generated: chunks with answer text, reasoning, tool-call deltas
        and logprobs. A deterministic request may be answered from the response cache unless
        `request.cache` is false (or it asks for logprobs, which the cache does not keep)."""
        plan = await self._plan(request)
        bypass = not plan.request.cache or plan.request.logprobs
        answer = relay(self._decode(plan), BYPASS) if bypass else self._answer(plan)
        async with contextlib.aclosing(answer) as chunks:
            async for chunk in chunks:
                yield chunk

    async def _plan(self, request: GenerationRequest) -> _Plan:
        """Check `request` before a possible auto-load, not after (its schemas and grammar off
        the loop), and resolve it against the config of the moment."""
        request.validate()
        grammar = await asyncio.to_thread(check_request, request)
        await self.ready()  # the catalog is scanned: names resolve and stores' defaults are known
        request = replace(request, model=self._canonical(request.model))
        check_serves(request.model, self._kind_of(request.model), CHAT)
        params = sampling_params(self._with_defaults(request.model, request.options))
        if request.messages is not None:
            request = replace(request, messages=self._with_system(request.model, request.messages))
        return _Plan(request, params, grammar)

    def _canonical(self, model: str) -> str:
        """The catalog's name for `model` (Manager.canonical: a short name or the name it was
        pulled by becomes its full name), so config, defaults and the response cache see one
        name. An alias keeps its own."""
        return model if self.settings.alias_for(model) else self.manager.canonical(model)

    def _store_of(self, model: str) -> StoreInfo | None:
        """What `model`'s store keeps beside its file (an ollama manifest's defaults and system)."""
        entry = next((e for e in self.manager.catalog.entries() if e.name == model), None)
        return entry.store if entry is not None else None

    # -- the response cache ----------------------------------------------------------------

    async def _answer(self, plan: _Plan) -> AsyncGenerator[Chunk, None]:
        """Replay a cached answer without touching the model (no lease, no load, no decode), or
        decode and keep the answer for next time. A stale answer is replayed while a background
        request recomputes it."""
        started = time.perf_counter()
        request = plan.request
        key = await self._cache_key(plan)
        lookup = self.response_cache.lookup(key) if key is not None else Lookup(BYPASS)
        if key is not None and lookup.answer is not None:
            if lookup.verdict == STALE:
                self._refresh(plan, key)
            yield self._replay(request, lookup, time.perf_counter() - started)
            return
        keep = functools.partial(self.response_cache.store, key) if key is not None else None
        async with contextlib.aclosing(relay(self._decode(plan), lookup.verdict, keep)) as chunks:
            async for chunk in chunks:
                yield chunk

    async def _cache_key(self, plan: _Plan) -> CacheKey | None:
        """The request's cache key; None when it must not touch the cache (the cache is off, the
        request is not deterministic, or the catalog has no usable model of that name)."""
        settings = self.settings  # one snapshot: a config reload may replace it meanwhile
        self.response_cache.configure(settings.cache)
        if not (settings.cache.enabled and plan.params.deterministic):
            return None
        await self.ready()
        return await asyncio.to_thread(self._key_of, settings, plan)

    def _key_of(self, settings: Settings, plan: _Plan) -> CacheKey | None:
        """Blocking: stats the model's file and hashes the whole prompt."""
        request = plan.request
        alias = settings.alias_for(request.model)  # its prompt and params are in the request already
        base = alias.model if alias else request.model
        entry = next((e for e in self.manager.catalog.entries() if e.name == base), None)
        if entry is None or not entry.usable or entry.path is None:
            return None  # the lease reports an unknown or broken model with its proper error
        fingerprint = model_fingerprint(settings, base, entry.path, entry.store.defaults if entry.store else None)
        return request_key(request.model, fingerprint, request.kind, cache_payload(request), plan.params)

    async def _decode(self, plan: _Plan, request_id: str | None = None) -> AsyncGenerator[Chunk, None]:
        """Run `plan` on its model: acquire it (loading if needed), render and tokenize off the
        loop, stream, and split the raw text by the model's formats (reasoning, tool calls)."""
        request = plan.request
        async with self._lease(request.model, request.keep_alive) as lease:
            prepared = await asyncio.to_thread(prepare, lease.engine, request, plan.params, plan.grammar)
            stream = lease.engine.stream(prepared.tokens, prepared.decoding,
                                         request_id=request_id or request.request_id,
                                         session_id=request.session_id, api=request.api)
            parser = prepared.parser
            async with contextlib.aclosing(stream) as chunks:
                if parser is None:
                    async for chunk in chunks:
                        yield chunk
                else:
                    async for chunk in chunks:
                        yield parser.chunk(chunk)

    def _replay(self, request: GenerationRequest, lookup: Lookup, elapsed_s: float) -> Chunk:
        """A cached answer as the request's one chunk, announced like any finished request."""
        assert lookup.answer is not None
        chunk = lookup.answer.chunk(lookup.verdict, elapsed_s)
        assert chunk.stats is not None and chunk.finish_reason is not None
        stats = chunk.stats
        self.bus.publish(RequestFinished(model=request.model, request_id=request.request_id,
                                         session_id=request.session_id, finish_reason=chunk.finish_reason,
                                         prompt_tokens=stats.prompt_tokens,
                                         completion_tokens=stats.completion_tokens, ttft_s=stats.ttft_s,
                                         duration_s=stats.duration_s, tokens_per_s=None,
                                         cached_tokens=stats.cached_tokens, cached=True, api=request.api))
        return chunk

    def _refresh(self, plan: _Plan, key: CacheKey) -> None:
        """Recompute a stale answer on the backend loop, so it outlives the caller's stream. Only
        the request that was served the stale answer starts one, so there is one per key."""
        request_id = plan.request.request_id
        refresh_id = f"{request_id}.refresh" if request_id else None
        quiet = replace(plan, request=replace(plan.request, keep_alive=None, session_id=None))
        future = self._submit(self._recompute(quiet, key, refresh_id))
        self._refreshes.add(future)
        future.add_done_callback(self._refreshes.discard)

    async def _recompute(self, plan: _Plan, key: CacheKey, request_id: str | None) -> None:
        try:
            async with contextlib.aclosing(relay(self._decode(plan, request_id), MISS,
                                                 functools.partial(self.response_cache.store, key))) as chunks:
                async for _ in chunks:
                    pass
        except Exception as exc:  # the caller already has its answer; the entry just stays stale
            log.warning("could not refresh a cached answer of %s: %s", plan.request.model, exc)

    async def count_tokens(self, request: GenerationRequest) -> int:
        """How many tokens a chat request's prompt takes, rendered with the model's template
        as `generate` would render it (loading the model if needed); nothing is generated."""
        if request.messages is None:
            raise BadRequest("count_tokens counts a chat request's prompt (messages), not a plain prompt")
        plan = await self._plan(request)
        async with self._lease(request.model, request.keep_alive) as lease:
            prepared = await asyncio.to_thread(prepare, lease.engine, plan.request, plan.params, plan.grammar)
        return len(prepared.tokens)

    async def embed(self, model: str, inputs: list[str] | str, *, request_id: str | None = None,
                    session_id: str | None = None, keep_alive: float | str | None = None,
                    api: str = "python") -> Embeddings:
        """One pooled, normalised vector per input, from a second context on the model's weights."""
        texts = [inputs] if isinstance(inputs, str) else inputs
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            raise BadRequest("input must be a string or a non-empty list of strings")
        if len(texts) > MAX_EMBED_INPUTS:
            raise BadRequest(f"input has {len(texts)} items; at most {MAX_EMBED_INPUTS} per request")
        vectors, tokens = await self._pooled(model, EMBEDDING, lambda engine: engine.embed_async(texts),
                                             keep_alive=keep_alive, request_id=request_id,
                                             session_id=session_id, api=api)
        return Embeddings(vectors, tokens)

    async def rerank(self, model: str, query: str, documents: list[str], top_n: int | None = None, *,
                     request_id: str | None = None, session_id: str | None = None,
                     keep_alive: float | str | None = None, api: str = "python") -> Reranking:
        """`documents` ordered by a reranker's relevance score for `query`, highest first, cut to
        `top_n` (all when None); each result keeps the document's index in `documents`."""
        if not isinstance(query, str):
            raise BadRequest("query must be a string")
        if not isinstance(documents, list) or not documents or not all(isinstance(d, str) for d in documents):
            raise BadRequest("documents must be a non-empty list of strings")
        if len(documents) > MAX_EMBED_INPUTS:
            raise BadRequest(f"documents has {len(documents)} items; at most {MAX_EMBED_INPUTS} per request")
        if top_n is not None and (isinstance(top_n, bool) or not isinstance(top_n, int) or top_n < 1):
            raise BadRequest(f"top_n = {top_n!r}: must be a positive integer")
        scores, tokens = await self._pooled(model, RERANK, lambda engine: engine.rerank_async(query, documents),
                                            keep_alive=keep_alive, request_id=request_id,
                                            session_id=session_id, api=api)
        ranked = sorted((Ranked(i, score) for i, score in enumerate(scores)), key=lambda r: -r.relevance_score)
        return Reranking(ranked[:top_n], tokens)

    async def _pooled(self, model: str, kind: str, call: Callable[[Engine], Awaitable[tuple[T, int]]], *,
                      keep_alive: float | str | None, request_id: str | None, session_id: str | None,
                      api: str) -> tuple[T, int]:
        """Run an embeddings context's `call` (embeddings or reranking) on `model`, which must
        serve `kind`, and announce it as a finished request with that kind's finish reason."""
        started = time.perf_counter()
        await self.ready()
        check_serves(model, self._kind_of(model), kind)
        lease = await self._acquire(model, keep_alive)
        # The model stays leased until the thread is done, even if our caller gives up first.
        work = asyncio.ensure_future(call(lease.engine))
        work.add_done_callback(lambda _: self._release(lease))
        result, tokens = await asyncio.shield(work)
        self.bus.publish(RequestFinished(model=model, request_id=request_id, session_id=session_id,
                                         finish_reason=FINISH_REASONS[kind], prompt_tokens=tokens,
                                         completion_tokens=0, ttft_s=None,
                                         duration_s=time.perf_counter() - started, tokens_per_s=None, api=api))
        return result, tokens

    def _kind_of(self, model: str) -> str | None:
        """What `model` (or an alias's base model) serves, from its GGUF header; None where the
        catalog does not know it or could not read it (the lease then says why)."""
        alias = self.settings.alias_for(model)
        base = self.manager.canonical(alias.model if alias else model)
        entry = next((e for e in self.manager.catalog.entries() if e.name == base), None)
        return model_kind(entry.info) if entry is not None else None

    def _with_defaults(self, model: str, options: dict[str, Any]) -> dict[str, Any]:
        """The request's options over the alias's defaults over the model's (config `params`)
        over its store's (an ollama manifest's params) over the loop guard where the config turns
        it on (`[sampling] loop_guard`), read from the settings current as the request starts."""
        settings = self.settings
        alias = settings.alias_for(model)
        base = alias.model if alias else model
        entry, store = settings.model_config_for(base), self._store_of(base)
        defaults = {**(LOOP_GUARD if settings.sampling.loop_guard else {}),
                    **{k: v for k, v in (store.defaults if store else {}).items() if k in SamplingFields.model_fields},
                    **(entry.params.options() if entry else {}), **(alias.params.options() if alias else {})}
        return {**defaults, **{k: v for k, v in options.items() if v is not None}}

    def _with_system(self, model: str, messages: tuple[Message, ...]) -> tuple[Message, ...]:
        """An alias's system prompt, else the model's store's (an ollama manifest's system
        layer), leads a chat that brings none of its own."""
        alias = self.settings.alias_for(model)
        store = self._store_of(alias.model if alias else model)
        system = alias.system if alias is not None and alias.system is not None else store.system if store else None
        if system is None or any(m.role == "system" for m in messages):
            return messages
        return (Message("system", system), *messages)

    def _lease(self, model: str, keep_alive: float | str | None) -> _LeaseScope:
        return _LeaseScope(self, model, keep_alive)

    async def _acquire(self, model: str, keep_alive: float | str | None) -> Lease:
        """Acquire on the backend loop. If our caller is cancelled after the manager granted the
        lease, it is given back at once instead of being lost (the model would stay busy)."""
        await self.ready()
        coro = self.manager.acquire(model, keep_alive)
        if asyncio.get_running_loop() is self._loop:
            return await coro
        future = self._submit(coro)
        try:
            return await asyncio.shield(asyncio.wrap_future(future))
        except asyncio.CancelledError:
            future.add_done_callback(lambda f: f.cancelled() or f.exception() or self._release(f.result()))
            raise

    def _release(self, lease: Lease) -> None:
        """Give a lease back without awaiting: works from a cancelled or abandoned stream."""
        if self._loop.is_closed():  # the backend is gone, and its models with it
            return
        coro = self.manager.release(lease)
        try:
            self._submit(coro).add_done_callback(_log_failure)
        except RuntimeError:  # closed between the check and the call
            coro.close()

    def events(self, after_seq: int | None = None) -> AsyncIterator[Event]:
        return self.bus.subscribe(after_seq)

    # -- shutdown --------------------------------------------------------------------------

    async def aclose(self) -> None:
        await asyncio.to_thread(self.close)

    def close(self) -> None:
        """Unload every model, end event streams and stop the backend thread (idempotent)."""
        if self._closed:
            return
        self._closed = True
        _live.discard(self)
        try:
            with contextlib.suppress(Exception):
                self._started.result(timeout=120)  # never close under a start still running
            if self._watcher is not None:
                self._loop.call_soon_threadsafe(self._stop_watching.set)
                with contextlib.suppress(Exception):
                    self._watcher.result(timeout=10)
            self._submit(self._pulls.close()).result(timeout=120)
            self._submit(self.manager.close()).result(timeout=120)
        finally:
            self.bus.close()
            self._runner.stop()
            self.telemetry.close()

    def __enter__(self) -> LocalBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> LocalBackend:
        await self.ready()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class _LeaseScope:
    """`async with`: a lease for the block, returned however the block ends."""

    def __init__(self, backend: LocalBackend, model: str, keep_alive: float | str | None) -> None:
        self.backend, self.model, self.keep_alive = backend, model, keep_alive
        self.lease: Lease | None = None

    async def __aenter__(self) -> Lease:
        self.lease = await self.backend._acquire(self.model, self.keep_alive)
        return self.lease

    async def __aexit__(self, *exc: object) -> None:
        if self.lease is not None:
            self.backend._release(self.lease)


@dataclass(frozen=True)
class _Plan:
    """A request with its sampling resolved against the config of the moment: what runs, and
    what a stale answer's refresh runs again."""

    request: GenerationRequest
    params: SamplingParams
    grammar: Grammar | None  # of its response format or GBNF, converted once (check_request)


def _log_failure(future: Future[Any]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.error("releasing a lease failed", exc_info=future.exception())


async def _sync_value(fn: Any) -> Any:
    """Read manager state on its own loop (it is not thread-safe)."""
    return fn()


async def _next_or_none(iterator: AsyncIterator[T]) -> T | None:
    """The next item, None at the end (a StopAsyncIteration must not cross loops in a future)."""
    return await anext(iterator, None)


async def _wait_quietly(task: asyncio.Task[None]) -> None:
    """Wait for a background task whose failures are reported as events, not raised."""
    with contextlib.suppress(Exception, asyncio.CancelledError):
        await asyncio.shield(task)


_live: weakref.WeakSet[LocalBackend] = weakref.WeakSet()


@atexit.register
def _close_live_backends() -> None:
    """Free llama.cpp contexts before the interpreter tears down the modules they use."""
    for backend in list(_live):
        try:
            backend.close()
        except Exception:
            pass
