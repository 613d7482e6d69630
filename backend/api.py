"""The Backend protocol: the one interface the console, the server and notebooks use.

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
import threading
import time
import weakref
from pathlib import Path
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Coroutine, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, runtime_checkable

from .chat import validate_messages
from .config import ConfigSource, Settings, config_source
from .errors import BadRequest, ConfigError
from .files import write_atomic
from .events import ConfigApplied, ConfigRejected, Event, EventBus, Notice, RequestFinished
from .generation import Chunk, Embeddings, SamplingParams, sampling_params
from .respcache import BYPASS, MISS, STALE, CacheKey, Lookup, ResponseCache, model_fingerprint, relay, request_key
from .snapshot import ModelInfo, Status
from .telemetry import Telemetry
from .versions import ConfigHistory, ConfigVersion, diff_settings

if TYPE_CHECKING:
    from .engine import Engine
    from .manager import Lease, Manager

log = logging.getLogger("corral.api")

T = TypeVar("T")
MAX_EMBED_INPUTS = 2048


@runtime_checkable
class Backend(Protocol):
    """What every face of corral may do with a backend, local or remote."""

    kind: str  # "local" or "remote"
    label: str  # shown in the console header: "embedded" or the server URL

    async def models(self) -> list[ModelInfo]: ...
    async def status(self) -> Status: ...
    async def load(self, name: str) -> ModelInfo: ...
    async def evict(self, name: str, *, force: bool = False) -> ModelInfo: ...
    async def pin(self, name: str, pinned: bool = True) -> ModelInfo: ...
    def complete(self, model: str, prompt: str, **options: Any) -> AsyncIterator[Chunk]: ...
    def chat(self, model: str, messages: list[dict[str, Any]], **options: Any) -> AsyncIterator[Chunk]: ...
    async def embed(self, model: str, inputs: list[str], **options: Any) -> Embeddings: ...
    async def unload_all(self) -> None: ...
    async def rescan(self) -> list[ModelInfo]: ...
    def events(self, after_seq: int | None = None) -> AsyncIterator[Event]: ...
    async def ready(self) -> None: ...
    async def warmed(self) -> None: ...
    async def reload_config(self, source: str = "api") -> ConfigVersion: ...
    async def rollback_config(self, number: int, source: str = "api") -> ConfigVersion: ...
    async def config_versions(self) -> list[ConfigVersion]: ...
    async def aclose(self) -> None: ...


class LocalBackend:
    """The in-process backend: a `Manager` on a private event loop thread."""

    kind = "local"
    label = "embedded"

    def __init__(self, settings: Settings | None = None, *, config: ConfigSource | str | None = None,
                 watch_config: bool = False, state_file: Path | None = None) -> None:
        """`settings` as given, or read from `config` (a ConfigSource or a TOML path; None: the
        default file). Only a backend with a config source can reload it; `watch_config`
        reloads on every change of the file. `state_file` enables warm restarts."""
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
        return Manager(self.settings, self.bus, telemetry=self.telemetry, state_file=self._state_file)

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

    async def reload_config(self, source: str = "api") -> ConfigVersion:
        """Read the config file again and apply what changed; an invalid file changes nothing
        (ConfigError, and a `config_rejected` event says why)."""
        await self.ready()
        return await self._call(self._apply_text(None, source))

    async def rollback_config(self, number: int, source: str = "api") -> ConfigVersion:
        """Apply version `number` again, as a new version, and write its text back to the
        file so that the file stays the truth (a later reload keeps the rollback)."""
        await self.ready()
        version = self.history.get(number)
        return await self._call(self._apply_text(version.text, source, rollback_of=version))

    async def config_versions(self) -> list[ConfigVersion]:
        return self.history.all()

    async def _apply_text(self, text: str | None, source: str, rollback_of: ConfigVersion | None = None) -> ConfigVersion:
        """On the backend loop, one change at a time: parse, validate, diff, apply, record."""
        assert self._config_lock is not None
        async with self._config_lock:
            try:
                if self._source is None:
                    raise ConfigError("this backend was started with settings, not a config file: "
                                      "there is nothing to reload")
                if rollback_of is None:
                    text = await asyncio.to_thread(self._source.read_text)
                new = self._source.parse(text)
                current = self.history.current
                diff = diff_settings(current.settings, new)
                if not diff and rollback_of is None:
                    return current
                actions = await self.manager.apply_settings(new)
            except ConfigError as exc:
                self.bus.publish(ConfigRejected(source=source, error=exc.message))
                raise
            if rollback_of is not None and text is not None:
                await asyncio.to_thread(write_atomic, self._source.file, text)
            self.settings = new
            source = f"{source} (rollback to {rollback_of.number})" if rollback_of else source
            version = self.history.record(new, text, source, diff, actions)
            self.bus.publish(ConfigApplied(version=version.number, source=source, diff=tuple(diff),
                                           actions=tuple(actions)))
            return version

    async def _watch_config(self, file: Path) -> None:
        """Reload whenever the file changes (editors write, rename or replace it)."""
        import watchfiles

        folder = file.parent
        if not folder.is_dir():
            self.bus.publish(Notice(level="info", message=f"{folder}: no such folder, so no config file to "
                                    "watch; after creating one, reload with `corral reload` or restart"))
            return
        await self.ready()
        async for changes in watchfiles.awatch(folder, watch_filter=lambda _, path: Path(path) == file,
                                               stop_event=self._stop_watching):
            if changes:
                with contextlib.suppress(ConfigError):  # already published as config_rejected
                    await self._apply_text(None, "file change")

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

    async def load(self, name: str) -> ModelInfo:
        await self.ready()
        return await self._call(self.manager.load(name))

    async def evict(self, name: str, *, force: bool = False) -> ModelInfo:
        await self.ready()
        return await self._call(self.manager.evict(name, force=force))

    async def pin(self, name: str, pinned: bool = True) -> ModelInfo:
        await self.ready()
        return await self._call(self.manager.pin(name, pinned))

    async def unload_all(self) -> None:
        await self.ready()
        await self._call(self.manager.unload_all())

    async def rescan(self) -> list[ModelInfo]:
        await self.ready()
        return await self._call(self.manager.rescan())

    # -- generation ------------------------------------------------------------------------

    async def complete(self, model: str, prompt: str, *, request_id: str | None = None,
                       session_id: str | None = None, keep_alive: float | str | None = None,
                       cache: bool = True, **options: Any) -> AsyncIterator[Chunk]:
        """Stream a plain-text completion of `prompt` (the model is loaded if needed); a
        deterministic request may be answered from the response cache unless `cache=False`."""
        params = sampling_params(self._with_defaults(model, options))
        if not isinstance(prompt, str):
            raise BadRequest("prompt must be a string")
        request = _Generation(model, "completion", prompt, params, keep_alive,
                              functools.partial(_prompt_tokens, prompt=prompt))
        async with contextlib.aclosing(self._answer(request, cache, request_id, session_id)) as chunks:
            async for chunk in chunks:
                yield chunk

    async def chat(self, model: str, messages: list[dict[str, Any]], *, request_id: str | None = None,
                   session_id: str | None = None, keep_alive: float | str | None = None,
                   cache: bool = True, **options: Any) -> AsyncIterator[Chunk]:
        """Stream the assistant's reply to `messages`, formatted with the model's chat template;
        a deterministic request may be answered from the response cache unless `cache=False`."""
        params = sampling_params(self._with_defaults(model, options))
        validate_messages(messages)  # before a possible auto-load, not after
        messages = self._with_system(model, messages)
        request = _Generation(model, "chat", messages, params, keep_alive,
                              functools.partial(_chat_tokens, messages=messages))
        async with contextlib.aclosing(self._answer(request, cache, request_id, session_id)) as chunks:
            async for chunk in chunks:
                yield chunk

    # -- the response cache ----------------------------------------------------------------

    async def _answer(self, request: _Generation, use_cache: bool, request_id: str | None,
                      session_id: str | None) -> AsyncGenerator[Chunk, None]:
        """Replay a cached answer without touching the model (no lease, no load, no decode), or
        decode and keep the answer for next time. A stale answer is replayed while a background
        request recomputes it."""
        started = time.perf_counter()
        if not isinstance(use_cache, bool):
            raise BadRequest(f"cache = {use_cache!r}: must be true or false")
        key = await self._cache_key(request) if use_cache else None
        lookup = self.response_cache.lookup(key) if key is not None else Lookup(BYPASS)
        if key is not None and lookup.answer is not None:
            if lookup.verdict == STALE:
                self._refresh(request, key, request_id)
            yield self._replay(request.model, lookup, time.perf_counter() - started, request_id, session_id)
            return
        keep = functools.partial(self.response_cache.store, key) if key is not None else None
        async with contextlib.aclosing(relay(self._decode(request, request_id, session_id), lookup.verdict,
                                             keep)) as chunks:
            async for chunk in chunks:
                yield chunk

    async def _cache_key(self, request: _Generation) -> CacheKey | None:
        """The request's cache key; None when it must not touch the cache (the cache is off, the
        request is not deterministic, or the catalog has no usable model of that name)."""
        settings = self.settings  # one snapshot: a config reload may replace it meanwhile
        self.response_cache.configure(settings.cache)
        if not (settings.cache.enabled and request.params.deterministic):
            return None
        await self.ready()
        return await asyncio.to_thread(self._key_of, settings, request)

    def _key_of(self, settings: Settings, request: _Generation) -> CacheKey | None:
        """Blocking: stats the model's file and hashes the whole prompt."""
        alias = settings.alias_for(request.model)  # its prompt and params are in the request already
        base = alias.model if alias else request.model
        entry = next((e for e in self.manager.catalog.entries() if e.name == base), None)
        if entry is None or not entry.usable or entry.path is None:
            return None  # the lease reports an unknown or broken model with its proper error
        fingerprint = model_fingerprint(settings, base, entry.path)
        return request_key(request.model, fingerprint, request.kind, request.payload, request.params)

    async def _decode(self, request: _Generation, request_id: str | None,
                      session_id: str | None) -> AsyncGenerator[Chunk, None]:
        """Run `request` on its model: acquire it (loading if needed), tokenize off the loop, stream."""
        async with self._lease(request.model, request.keep_alive) as lease:
            tokens = await asyncio.to_thread(request.tokens, lease.engine)
            stop_tokens = lease.engine.weights.turn_tokens if request.kind == "chat" else frozenset()
            async with contextlib.aclosing(lease.engine.stream(tokens, request.params, request_id=request_id,
                                                               session_id=session_id,
                                                               stop_tokens=stop_tokens)) as chunks:
                async for chunk in chunks:
                    yield chunk

    def _replay(self, model: str, lookup: Lookup, elapsed_s: float, request_id: str | None,
                session_id: str | None) -> Chunk:
        """A cached answer as the request's one chunk, announced like any finished request."""
        assert lookup.answer is not None
        chunk = lookup.answer.chunk(lookup.verdict, elapsed_s)
        assert chunk.stats is not None and chunk.finish_reason is not None
        stats = chunk.stats
        self.bus.publish(RequestFinished(model=model, request_id=request_id, session_id=session_id,
                                         finish_reason=chunk.finish_reason, prompt_tokens=stats.prompt_tokens,
                                         completion_tokens=stats.completion_tokens, ttft_s=stats.ttft_s,
                                         duration_s=stats.duration_s, tokens_per_s=None,
                                         cached_tokens=stats.cached_tokens, cached=True))
        return chunk

    def _refresh(self, request: _Generation, key: CacheKey, request_id: str | None) -> None:
        """Recompute a stale answer on the backend loop, so it outlives the caller's stream. Only
        the request that was served the stale answer starts one, so there is one per key."""
        refresh_id = f"{request_id}.refresh" if request_id else None
        future = self._submit(self._recompute(replace(request, keep_alive=None), key, refresh_id))
        self._refreshes.add(future)
        future.add_done_callback(self._refreshes.discard)

    async def _recompute(self, request: _Generation, key: CacheKey, request_id: str | None) -> None:
        try:
            async with contextlib.aclosing(relay(self._decode(request, request_id, None), MISS,
                                                 functools.partial(self.response_cache.store, key))) as chunks:
                async for _ in chunks:
                    pass
        except Exception as exc:  # the caller already has its answer; the entry just stays stale
            log.warning("could not refresh a cached answer of %s: %s", request.model, exc)

    async def embed(self, model: str, inputs: list[str] | str, *, request_id: str | None = None,
                    session_id: str | None = None, keep_alive: float | str | None = None) -> Embeddings:
        """One pooled, normalised vector per input, from a second context on the model's weights."""
        texts = [inputs] if isinstance(inputs, str) else inputs
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            raise BadRequest("input must be a string or a non-empty list of strings")
        if len(texts) > MAX_EMBED_INPUTS:
            raise BadRequest(f"input has {len(texts)} items; at most {MAX_EMBED_INPUTS} per request")
        started = time.perf_counter()
        lease = await self._acquire(model, keep_alive)
        # The model stays leased until the thread is done, even if our caller gives up first.
        work = asyncio.ensure_future(lease.engine.embed_async(texts))
        work.add_done_callback(lambda _: self._release(lease))
        vectors, tokens = await asyncio.shield(work)
        self.bus.publish(RequestFinished(model=model, request_id=request_id, session_id=session_id,
                                         finish_reason="embeddings", prompt_tokens=tokens, completion_tokens=0,
                                         ttft_s=None, duration_s=time.perf_counter() - started,
                                         tokens_per_s=None))
        return Embeddings(vectors, tokens)

    def _with_defaults(self, model: str, options: dict[str, Any]) -> dict[str, Any]:
        """The request's options over the alias's defaults over the model's (config `params`),
        read from the settings current as the request starts."""
        settings = self.settings
        alias = settings.alias_for(model)
        entry = settings.model_config_for(alias.model if alias else model)
        defaults = {**(entry.params.options() if entry else {}), **(alias.params.options() if alias else {})}
        return {**defaults, **{k: v for k, v in options.items() if v is not None}}

    def _with_system(self, model: str, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """An alias's system prompt leads a chat that brings none of its own."""
        alias = self.settings.alias_for(model)
        if alias is None or alias.system is None or any(m.get("role") == "system" for m in messages):
            return messages
        return [{"role": "system", "content": alias.system}, *messages]

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
class _Generation:
    """One generation request in a form that can run again: a stale answer's refresh repeats it."""

    model: str
    kind: str  # "completion" | "chat": part of the cache key
    payload: str | list[dict[str, Any]]  # the prompt or the messages, as the cache key hashes them
    params: SamplingParams
    keep_alive: float | str | None
    tokens: Callable[[Engine], list[int]]  # blocking: runs in a worker thread


def _prompt_tokens(engine: Engine, prompt: str) -> list[int]:
    """Tokenize a plain prompt (blocking: llama.cpp's tokenizer)."""
    return engine.weights.tokenize(prompt, add_special=True)


def _chat_tokens(engine: Engine, messages: list[dict[str, Any]]) -> list[int]:
    """Render and tokenize a chat (blocking: Jinja and llama.cpp's tokenizer)."""
    assert engine.template is not None
    return engine.weights.tokenize(engine.template.render(messages), add_special=False)


def _log_failure(future: Future[Any]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.error("releasing a lease failed", exc_info=future.exception())


async def _sync_value(fn: Any) -> Any:
    """Read manager state on its own loop (it is not thread-safe)."""
    return fn()


class LoopThread:
    """An event loop running in a daemon thread of its own.

    A caller blocks on a future of this loop, never on its own loop, so blocking calls work
    from plain code and from inside a running loop alike (a Jupyter cell runs on the kernel's)."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self.thread.start()

    def submit(self, coro: Coroutine[Any, Any, T]) -> Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def stop(self) -> None:
        """Stop the loop and its thread (idempotent); the loop is closed once the thread ended."""
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        if not self.thread.is_alive():
            self.loop.close()


class SyncBackend:
    """Blocking twins of a backend's methods for scripts (and notebooks that prefer them).

    Each call runs through `submit` on a loop other than the caller's: LocalBackend's own
    loop, or a private one that RemoteBackend starts for its `sync`."""

    def __init__(self, backend: Backend, submit: Callable[[Coroutine[Any, Any, Any]], Future[Any]]) -> None:
        self._backend = backend
        self._submit = submit

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self._submit(coro).result()

    def models(self) -> list[ModelInfo]:
        return self._run(self._backend.models())

    def status(self) -> Status:
        return self._run(self._backend.status())

    def load(self, name: str) -> ModelInfo:
        return self._run(self._backend.load(name))

    def evict(self, name: str, *, force: bool = False) -> ModelInfo:
        return self._run(self._backend.evict(name, force=force))

    def pin(self, name: str, pinned: bool = True) -> ModelInfo:
        return self._run(self._backend.pin(name, pinned))

    def complete(self, model: str, prompt: str, **options: Any) -> Iterator[Chunk]:
        return self._iterate(self._backend.complete(model, prompt, **options))

    def chat(self, model: str, messages: list[dict[str, Any]], **options: Any) -> Iterator[Chunk]:
        return self._iterate(self._backend.chat(model, messages, **options))

    def embed(self, model: str, inputs: list[str] | str, **options: Any) -> Embeddings:
        return self._run(self._backend.embed(model, inputs, **options))

    def reload_config(self, source: str = "api") -> ConfigVersion:
        return self._run(self._backend.reload_config(source))

    def rollback_config(self, number: int, source: str = "api") -> ConfigVersion:
        return self._run(self._backend.rollback_config(number, source))

    def config_versions(self) -> list[ConfigVersion]:
        return self._run(self._backend.config_versions())

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run any coroutine on the loop the twins use and wait for it (scripts, tests)."""
        return self._run(coro)

    def text(self, model: str, prompt: str, **options: Any) -> str:
        """The whole completion as one string."""
        return "".join(chunk.text for chunk in self.complete(model, prompt, **options))

    def _iterate(self, stream: AsyncIterator[Chunk]) -> Iterator[Chunk]:
        try:
            while True:
                try:
                    yield self._run(stream.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            self._run(stream.aclose())


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
