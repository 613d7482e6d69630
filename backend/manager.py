"""The model manager: lifecycle state machine, admission under budgets, LRU eviction, TTLs.
Where a load goes and what makes room for it are in admission.py, applying a new config in
reconfig.py: mixins of `Manager`, each its own concern.

Everything here runs on one asyncio loop (the backend's); blocking llama.cpp work (loading,
unloading) runs in a thread pool. Every state change goes through `_transition`, which
enforces the lifecycle and publishes exactly one event.

Lifecycle (DESIGN.md, Decisions):
    available → loading → ready | failed;  ready ⇄ busy;  ready|busy → unloading → available;
    failed → loading | available
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from .catalog import Catalog, CatalogEntry
from .config import AliasConfig, ConfigError, ModelDefaults, Settings, default_pull_dir, parse_duration
from .engine import Engine
from .errors import (BadRequest, CorralError, FileRejected, IllegalTransition, LoadFailed, ModelBusy,
                     ModelNotFound, ModelPinned, ModelUnusable, NotFound)
from .events import (EventBus, ModelLoaded, Notice, PinChanged, RequestFinished, StateChanged,
                     Subscription, wait_event)
from .ggufmeta import GGUFInfo
from .inflight import RequestInfo
from .kinds import model_kind
from .kvstore import PrefixStore
from .loadplan import Planning
from .memory import MemoryEstimate, default_ram_budget, estimate, process_rss
from .modellog import LogLine
from .admission import Admission, close_and_trim
from .reconfig import Reconfiguration, catalog_for
from .warmstate import WarmState
from .records import ALLOWED, COMPLETED, Lease, PriorityGate, Record, RequestSample, State
from .snapshot import ModelInfo, NameClash
from .telemetry import Telemetry

log = logging.getLogger("corral.manager")




def _make_pull_dir() -> None:
    """The catalog scans the pull folder always; made here so that scans never warn that it is missing."""
    try:
        default_pull_dir().mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        log.info("cannot make the pull folder %s: %s", default_pull_dir(), exc)


class Manager(Admission, Planning, Reconfiguration):
    def __init__(self, settings: Settings, bus: EventBus, catalog: Catalog | None = None,
                 telemetry: Telemetry | None = None, state_file: Path | None = None) -> None:
        self.settings = settings
        self.bus = bus
        self.telemetry = telemetry or Telemetry()
        self.catalog = catalog or catalog_for(settings)
        self.ram_budget = settings.budgets.ram_bytes or default_ram_budget(settings.budgets.ram_fraction)
        self._records: dict[str, Record] = {}
        self._aliases: dict[str, AliasConfig] = {}
        self.source_names: Callable[[], dict[str, str]] | None = None  # blocking: names models were pulled by
        self._pulled_as: dict[str, str] = {}
        self._admission = PriorityGate()
        self.warm = WarmState(state_file, bus)  # the loaded and pinned set, for a warm restart
        budgets = settings.budgets  # the KV of recent conversations, across evictions and restarts
        self.prefixes = PrefixStore(budgets.saved_kv_ram, budgets.saved_kv_disk,
                                    state_file.with_name("kv") if state_file else None)
        self.restored: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()
        self._reaper: asyncio.Task[None] | None = None
        self._collector: asyncio.Task[None] | None = None
        self._closed = False

    # -- setup -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Scan the catalog, start the idle reaper and the preload list (failures become events)."""
        await asyncio.to_thread(_make_pull_dir)
        await self.rescan()
        names = self.catalog.names()
        for alias in self.settings.aliases:
            try:
                self._check_alias(alias, names)
            except ConfigError as exc:  # at start a bad alias must not keep everything else down
                self.bus.publish(Notice(model=alias.name, level="error", message=f"{exc}; alias left out"))
            else:
                self._aliases[alias.name] = alias
        self._reaper = asyncio.create_task(self._reap_idle(), name="corral-ttl-reaper")
        self._collector = asyncio.create_task(self._collect_requests(self.bus.subscribe()),
                                              name="corral-request-stats")
        saved = await asyncio.to_thread(self.warm.read)
        for name in saved.get("pinned", []):
            if name in self._records:
                self._records[name].pinned = True
        restore = [n for n in saved.get("loaded", []) if n in self._records]
        self.restored = asyncio.create_task(self._restore(restore), name="corral-warm-restart")
        for name in self._preload_names(self.settings):
            asyncio.create_task(self._preload(name))

    @staticmethod
    def _preload_names(settings: Settings) -> list[str]:
        return list(dict.fromkeys([*settings.preload, *(m.name for m in settings.models if m.preload)]))

    async def _restore(self, names: list[str]) -> None:
        """Load what was loaded when the last process stopped, highest priority first."""
        for name in sorted(names, key=lambda n: -self._records[n].priority):
            await self._preload(name, "warm restart")

    # -- warm-restart state ----------------------------------------------------------------

    def _save_state(self) -> None:
        self.warm.save([r.name for r in self._records.values() if r.state in (State.READY, State.BUSY)],
                       [r.name for r in self._records.values() if r.pinned])

    async def rescan(self) -> list[ModelInfo]:
        self._adopt(await asyncio.to_thread(self.catalog.refresh))
        await self.refresh_source_names()
        return self.models()

    async def refresh_source_names(self) -> None:
        """Read again the names models were pulled by (`source_names`, off the loop)."""
        if self.source_names is not None:
            self._pulled_as = await asyncio.to_thread(self.source_names)

    def canonical(self, name: str) -> str:
        """The catalog's name for `name`: a store model's short name gives its full name, and
        the name a client pulled a model by (`hf.co/owner/repo:QUANT`) gives the pulled file's
        model; any other name is itself."""
        found = self.catalog.canonical(name)
        if found == name and name not in self._records:
            return self._pulled_as.get(name.lower(), name)
        return found

    def forget(self, name: str) -> None:
        """Drop a model the catalog no longer lists (`corral rm` deleted its files); a loaded one
        goes once its requests finish."""
        record = self._records.get(name)
        if record is None or name in self.catalog.names():
            return
        if record.state in (State.AVAILABLE, State.FAILED):
            del self._records[name]
        else:
            self._retire(record)
        self._notify()

    def _adopt(self, entries: list[CatalogEntry]) -> None:
        """Records for new names; fresh entries and estimates for models not loaded."""
        winners: dict[str, CatalogEntry] = {}
        for entry in entries:  # the catalog lists a name's winner first; the rest lost a clash
            winners.setdefault(entry.name, entry)
        for entry in winners.values():
            record = self._records.get(entry.name)
            if record is None:
                self._records[entry.name] = self._new_record(entry)
            elif record.state in (State.AVAILABLE, State.FAILED):
                record.entry = entry
                record.settings = self._settings_for(entry)  # a store's defaults may have changed
                record.estimate = self._estimate(entry, record.settings)

    def _settings_for(self, entry: CatalogEntry) -> ModelDefaults:
        return self.settings.effective(entry.name, entry.store.defaults if entry.store else None)

    def _new_record(self, entry: CatalogEntry) -> Record:
        settings = self._settings_for(entry)
        explicit = self.settings.model_config_for(entry.name)
        record = Record(entry=entry, settings=settings, pinned=bool(explicit and explicit.pinned),
                        estimate=self._estimate(entry, settings), priority=explicit.priority if explicit else 0)
        if explicit is not None:
            record.chat_format, record.chat_template = explicit.chat_format, explicit.chat_template
        if record.chat_format is None:
            record.chat_format = settings.chat_format
        if not entry.usable:
            record.error = entry.error
        return record

    @staticmethod
    def _estimate(entry: CatalogEntry, s: ModelDefaults) -> MemoryEstimate | None:
        if entry.info is None:
            return None
        return estimate(entry.info, n_ctx=s.n_ctx, n_parallel=s.n_parallel, n_ubatch=s.n_ubatch or s.n_batch,
                        flash_attn=s.flash_attn, type_k=s.type_k, type_v=s.type_v)

    async def _preload(self, name: str, why: str = "preload") -> None:
        try:
            await self.load(name)
        except CorralError as exc:
            self.bus.publish(Notice(model=name, level="error", message=f"{why} failed: {exc}"))

    async def close(self) -> None:
        """Unload every model (cancelling its requests) and stop background tasks."""
        self._closed = True
        self.warm.close()
        for task in (self._reaper, self._collector, self.restored):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        for record in list(self._records.values()):
            if record.load_task and not record.load_task.done():
                with contextlib.suppress(Exception):
                    await record.load_task
            if record.state in (State.READY, State.BUSY):
                await self._unload(record, "shutdown", "shutdown")

    async def _collect_requests(self, events: Subscription) -> None:
        """Keep each model's recent request timings. Engines announce a finished request on
        the bus (from their own threads), so the manager reads them there like any consumer
        rather than reaching into the engine."""
        async for event in events:
            # a cached answer says nothing about the model's speed
            if isinstance(event, RequestFinished) and event.finish_reason in COMPLETED and not event.cached:
                record = self._records.get(event.model or "")
                if record is not None:
                    record.recent.append(RequestSample(event.ttft_s, event.duration_s, event.tokens_per_s))

    # -- queries ---------------------------------------------------------------------------

    def record(self, name: str) -> Record:
        """The model called `name` (or its short name); for an alias, its base model (they
        share one load)."""
        alias = self._aliases.get(name)
        record = self._records.get(alias.model if alias else self.canonical(name))
        if record is None:
            raise ModelNotFound(name, [*self._records, *self._aliases])
        return record

    def logs(self, name: str) -> list[LogLine]:
        """llama.cpp's lines of `name`'s loads and runs (its base model's, for an alias), oldest
        first, with corral's line where each load starts and where one failed."""
        return self.record(name).log.lines()

    def alias(self, name: str) -> AliasConfig | None:
        return self._aliases.get(name)

    def models(self) -> list[ModelInfo]:
        infos = [self.info(r) for r in self._records.values()]
        infos += [dataclasses.replace(self.info(self._records[a.model]), name=a.name, source="alias", alias_of=a.model,
                                      short_name=None, clashes=())
                  for a in self._aliases.values() if a.model in self._records]
        return sorted(infos, key=lambda info: info.name)

    def ram_reserved(self) -> int:
        return sum(r.reserved for r in self._records.values())

    def info(self, r: Record) -> ModelInfo:
        meta = r.entry.info
        load = r.engine.load() if r.engine is not None else None
        ttl_left = None
        if r.expires_at is not None and r.state == State.READY and not r.pinned:
            ttl_left = max(0.0, r.expires_at - time.monotonic())
        return ModelInfo(
            name=r.name, state=r.state.value, source=r.entry.source,
            path=str(r.entry.path) if r.entry.path else None, usable=r.entry.usable, error=r.error,
            file_size=meta.file_size if meta else None,
            architecture=meta.architecture if meta else None, kind=model_kind(meta),
            quantization=meta.file_type if meta else None,
            parameters=meta.parameter_count if meta else None,
            context_length=meta.context_length if meta else None,
            n_ctx=r.settings.n_ctx, n_parallel=r.settings.n_parallel, pinned=r.pinned,
            kv_types="f16" if (r.settings.type_k, r.settings.type_v) == ("f16", "f16")
            else f"{r.settings.type_k}/{r.settings.type_v}",
            keep_alive_s=r.keep_alive, ttl_left_s=ttl_left, in_flight=r.in_flight,
            active=load.active if load else 0, queued=load.queued if load else 0,
            tokens_per_s=load.tokens_per_s if load else 0.0,
            estimate_bytes=r.estimate.total if r.estimate else None,
            estimate_detail=r.estimate.to_dict() if r.estimate else None,
            measured_bytes=r.measured, measured_vram=r.measured_vram, parked_bytes=r.parked_bytes, load_seconds=r.load_seconds, load_percent=r.load_percent,
            last_used=r.last_used, chat_template=r.template_source,
            has_chat_template=(r.own_template(meta.chat_template if meta else None) is not None) or (
                None if meta is None else False),  # None: no header read yet, so unknown
            oldest_wait_s=load.oldest_wait_s if load and load.queued else 0.0,
            requests=r.percentiles(), priority=r.priority, load_position=self._load_position(r.name),
            short_name=self.catalog.short_name(r.name), store=r.entry.store,
            clashes=tuple(NameClash(e.source, str(e.path) if e.path else None, e.error or "")
                          for e in self.catalog.losers(r.name)),
            **_placement_fields(r),
        )

    def _load_position(self, name: str) -> int | None:
        waiting = self._admission.waiting()
        return waiting.index(name) + 1 if name in waiting else None

    # -- state machine ---------------------------------------------------------------------

    def _transition(self, r: Record, new: State, reason: str = "", cause: str = "") -> None:
        old = r.state
        if new not in ALLOWED[old]:
            raise IllegalTransition(f"model {r.name!r}: illegal transition {old.value} → {new.value}")
        r.state = new
        log.info("model %s: %s → %s %s", r.name, old.value, new.value, reason)
        self.bus.publish(StateChanged(model=r.name, old=old.value, new=new.value, reason=reason, cause=cause))
        self._notify()
        if State.READY in (old, new) and State.BUSY not in (old, new):
            self._save_state()  # loaded or unloaded: the warm-restart set changed

    def _notify(self) -> None:
        """Wake everything waiting for a change (drains, the reaper, waiting loads)."""
        self._changed.set()
        self._changed = asyncio.Event()

    async def _wait_change(self, timeout: float | None = None) -> None:
        await wait_event(self._changed, timeout)

    # -- loading ---------------------------------------------------------------------------

    async def load(self, name: str, keep_alive: float | str | None = None) -> ModelInfo:
        """Load `name` if it is not loaded (single-flight: concurrent callers share one load).
        A `keep_alive` sets its idle keep-alive as a request's does (0: unload once idle)."""
        record = self.record(name)
        seconds = None if keep_alive is None else _keep_alive_seconds(keep_alive)
        await self._ensure_loaded(record)
        if seconds is not None:  # before any await: an unload in between would keep a stale override
            record.keep_alive_override = seconds
            self._set_expiry(record)
            self._notify()  # the reaper may be asleep until the old expiry
        await self.warm.flushed()
        return self.info(record)

    async def _ensure_loaded(self, r: Record) -> None:
        while True:
            if self._closed:
                raise CorralError("the backend is shutting down")
            if r.state in (State.READY, State.BUSY) and not r.draining:
                return
            if r.state == State.UNLOADING or r.draining:
                await self._wait_change(0.5)
                continue
            if r.load_task is None or r.load_task.done():
                r.load_task = asyncio.get_running_loop().create_task(self._load(r), name=f"load-{r.name}")
            await asyncio.shield(r.load_task)

    async def _load(self, r: Record) -> None:
        async with self._admission.hold(r.name, r.priority):
            info = await asyncio.to_thread(self._check_file, r)
            r.estimate = self._estimate(r.entry, r.settings) if info is not None else r.estimate
            r.placement = None
            if info is not None:
                await self._make_room(r)
            self._transition(r, State.LOADING, r.placement.reason if r.placement else "")
            r.error, r.load_percent, r.measured, r.measured_vram = None, 0, None, None
            started, rss_before = time.perf_counter(), process_rss()
            try:
                if info is None:
                    where = f" ({r.entry.path})" if r.entry.path else ""
                    raise ModelUnusable(f"model {r.name!r}{where}: {r.entry.error}; fix or "
                                        "replace the file (or its [[models]] entry), then load it again")
                engine = await self._open_placed(r)
            except CorralError as exc:
                named = exc.about(f"model {r.name!r}")  # a file's path alone does not say which model
                self._fail(r, named.message, "file" if isinstance(exc, (ModelUnusable, FileRejected)) else
                           "gpu_memory" if "out of GPU memory" in exc.message else "llama")
                if named is exc:
                    raise
                raise named from exc
            except Exception as exc:  # a llama.cpp or Python failure: keep the process serving
                log.exception("load of %s failed", r.name)
                self._fail(r, f"model {r.name!r}: load failed: {exc}", "llama")
                raise LoadFailed(r.error or str(exc)) from exc
            r.engine = engine
            loop = asyncio.get_running_loop()
            engine.on_failure = lambda message: loop.call_soon_threadsafe(self._engine_failed, r, engine, message)
            r.load_seconds = time.perf_counter() - started
            r.measured = max(process_rss() - rss_before, 0)
            r.load_percent = 100
            r.last_used = time.time()
            self._transition(r, State.READY, f"loaded in {r.load_seconds:.2f} s")
            self._set_expiry(r)
            self.bus.publish(ModelLoaded(model=r.name, seconds=r.load_seconds,
                                         estimate_bytes=r.estimate.total if r.estimate else 0,
                                         measured_bytes=r.measured))

    def _check_file(self, r: Record) -> GGUFInfo | None:
        """Re-read the header (cached by mtime): the file may have been fixed, replaced or
        removed since the scan. Returns the header when the model is usable."""
        if r.entry.info is None or r.entry.error is None:
            r.entry = r.entry.reread()
        return r.entry.info if r.entry.usable else None

    def _fail(self, r: Record, message: str, cause: str) -> None:
        r.log.add("corral", f"load failed: {message}")
        r.error = message
        r.load_percent = None
        self._transition(r, State.FAILED, message, cause)
        self.bus.publish(Notice(model=r.name, level="error", message=message))

    # -- unloading -------------------------------------------------------------------------

    async def evict(self, name: str, *, force: bool = False, why: str = "", cause: str = "operator") -> ModelInfo:
        """Operator's evict: a pinned model needs `force`; a busy model drains first. `why` and
        `cause` say who asked, when it is not the operator (the config)."""
        r = self.record(name)
        if r.load_task and not r.load_task.done():
            with contextlib.suppress(CorralError):
                await asyncio.shield(r.load_task)
        if r.state == State.FAILED:
            r.error = None
            self._transition(r, State.AVAILABLE, "cleared")
            return self.info(r)
        if r.state not in (State.READY, State.BUSY):
            return self.info(r)
        if r.pinned and not force:
            raise ModelPinned(f"model {name!r} is pinned; unpin it first or evict with force")
        await self._drain(r)
        if r.state in (State.READY, State.BUSY) or r.unload_task is not None:
            await self._unload(r, why or "evicted by operator" + (" (forced)" if force else ""), cause)
            await self.warm.flushed()
        return self.info(r)

    async def _drain(self, r: Record) -> None:
        """Wait for in-flight requests to finish; new ones wait until the unload is done."""
        r.draining = True
        deadline = time.monotonic() + self.settings.budgets.drain_timeout
        try:
            while r.in_flight > 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ModelBusy(f"model {r.name!r}: {r.in_flight} request(s) still running after "
                                    f"{self.settings.budgets.drain_timeout:g} s; try again or cancel them")
                await self._wait_change(min(left, 0.5))
        except BaseException:
            r.draining = False
            self._notify()
            raise

    async def _unload(self, r: Record, reason: str, cause: str) -> None:
        """Single-flight: a second unload of the same model (reaper, evict, make-room) waits for
        the first. The unload itself is shielded so a cancelled caller cannot leave a context
        alive behind an `available` state."""
        if r.unload_task is None:
            self._transition(r, State.UNLOADING, reason, cause)
            r.unload_task = asyncio.get_running_loop().create_task(self._close_engine(r, reason))
        await asyncio.shield(r.unload_task)

    async def _close_engine(self, r: Record, reason: str) -> None:
        engine, r.engine = r.engine, None
        try:
            if engine is not None:
                await asyncio.to_thread(close_and_trim, engine)
        finally:
            r.draining = False
            r.expires_at = None
            r.keep_alive_override = None
            r.load_percent = None
            r.unload_task = None
            self._transition(r, State.AVAILABLE, reason)

    async def unload_all(self) -> None:
        """Unload every loaded model (pinned too); one that does not drain in time stays, and
        the error names every model left behind."""
        stuck: list[str] = []
        for r in list(self._records.values()):
            if r.state in (State.READY, State.BUSY):
                try:
                    await self.evict(r.name, force=True)
                except ModelBusy:
                    stuck.append(r.name)
        if stuck:
            raise ModelBusy(f"still busy after {self.settings.budgets.drain_timeout:g} s, left loaded: "
                            f"{', '.join(stuck)}; try again or cancel their requests")

    def _engine_failed(self, r: Record, engine: Engine, message: str) -> None:
        """On the manager's loop: an engine thread died; unload it so the next request reloads."""
        if r.engine is not engine or r.state not in (State.READY, State.BUSY):
            return
        r.error = f"model {r.name!r}: {message}"
        self.bus.publish(Notice(model=r.name, level="error", message=r.error))
        asyncio.get_running_loop().create_task(self._unload(r, message, "failure"))

    # -- pinning and TTL -------------------------------------------------------------------

    async def pin(self, name: str, pinned: bool = True) -> ModelInfo:
        r = self.record(name)
        if r.pinned != pinned:
            r.pinned = pinned
            self._set_expiry(r)
            self.bus.publish(PinChanged(model=name, pinned=pinned))
            self._notify()
            self._save_state()
            await self.warm.flushed()
        return self.info(r)

    def _set_expiry(self, r: Record) -> None:
        """Only an idle, loaded, unpinned model has an expiry; the reaper sleeps until the next."""
        keep = r.keep_alive
        idle = r.state in (State.READY, State.BUSY) and r.in_flight == 0
        r.expires_at = time.monotonic() + keep if idle and keep >= 0 and not r.pinned else None

    async def _reap_idle(self) -> None:
        """Unload idle models whose keep-alive ran out; pinned and busy models never expire."""
        while True:
            now = time.monotonic()
            for r in list(self._records.values()):
                expired = r.expires_at is not None and r.expires_at <= now
                if expired and r.state == State.READY and r.in_flight == 0 and not r.pinned and not r.draining:
                    try:
                        await self._unload(r, f"idle for {r.keep_alive:.0f} s (keep_alive)", "ttl")
                    except Exception:
                        log.exception("idle unload of %s failed", r.name)
            pending = [r.expires_at for r in self._records.values() if r.expires_at is not None]
            delay = min([max(0.05, t - time.monotonic()) for t in pending] + [1.0])
            await self._wait_change(delay)

    # -- requests --------------------------------------------------------------------------

    async def acquire(self, name: str, keep_alive: float | None = None) -> Lease:
        """Hold `name` for one request, loading it first if needed (auto-load)."""
        r = self.record(name)
        if keep_alive is not None:
            keep_alive = _keep_alive_seconds(keep_alive)
        await self._ensure_loaded(r)
        if keep_alive is not None:
            r.keep_alive_override = keep_alive
        r.in_flight += 1
        r.expires_at = None
        if r.state == State.READY:
            self._transition(r, State.BUSY)
        return Lease(r, r.engine)

    async def release(self, lease: Lease) -> None:
        if lease.released:
            return
        lease.released = True
        lease.engine.weights.release()
        r = lease.record
        r.in_flight -= 1
        r.last_used = time.time()
        if r.in_flight == 0 and r.state == State.BUSY:
            self._set_expiry(r)
            self._transition(r, State.READY)
        else:
            self._notify()

    def requests(self) -> list[RequestInfo]:
        """Every request running or queued in a loaded model's engine, by model name."""
        return [info for name in sorted(self._records) if (engine := self._records[name].engine) is not None
                for info in engine.requests()]

    def cancel_request(self, request_id: str, by: str) -> list[RequestInfo]:
        """Cancel the request(s) with this id wherever they run or wait; NotFound if none does."""
        found = [info for r in self._records.values() if r.engine is not None
                 for info in r.engine.cancel_id(request_id, by)]
        if not found:
            raise NotFound(f"no running or queued request has id {request_id!r}; it may have finished "
                           "already. List those in flight with GET /api/requests (backend.requests() in Python)")
        return found

    @contextlib.asynccontextmanager
    async def lease(self, name: str, keep_alive: float | None = None) -> AsyncIterator[Lease]:
        held = await self.acquire(name, keep_alive)
        try:
            yield held
        finally:
            await self.release(held)


def _placement_fields(r: Record) -> dict[str, object]:
    """ModelInfo's placement fields: where a resident (or failed) model's load went."""
    p = r.placement
    if p is None or r.state == State.AVAILABLE:
        return {}
    return {"placement": p.reason, "gpu": p.gpu, "gpu_layers": p.n_gpu_layers,
            "gpu_layers_total": p.layers_total, "vram_estimate_bytes": p.vram}


def _keep_alive_seconds(value: object) -> float:
    """A request's keep_alive: seconds or a duration string ("5m"); negative means forever."""
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise BadRequest(f"keep_alive = {value!r}: {exc}") from None
