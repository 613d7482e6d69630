"""An in-memory Backend for console tests: deterministic models, events and host stats.

`FakeBackend` implements the `Backend` protocol of corral.backend.protocol without llama.cpp:
- `load()` walks a model through available → loading (progress events every 5 %) → ready,
  yielding to the event loop between steps, so a UI sees every stage;
- a model named in `failures` ("broken" by default) fails its load half-way: it ends in
  state failed with the reason kept in `ModelInfo.error`, and `load()` raises LoadFailed;
- `logs()` gives each model's lines: a few of llama.cpp's per load (LOAD_LINES) and, for a
  failed load, its reason as an error line;
- `evict()`, `pin()` and `unload_all()` follow the manager's rules (a pinned model needs
  force, evicting a failed model clears it);
- `generate()` (and `complete()` / `chat()`, which build its request) streams a few fixed
  chunks (`token_delay` seconds apart, so a test can stop one half-way) and publishes request
  events; while it streams, `requests()` lists it and `cancel_request()` ends it with finish
  reason "cancelled"; `add_request()` puts a fixed request in that list (for pictures);
- `events()` is an async iterator fed by an asyncio.Queue per subscriber, with a replay
  ring for `after_seq`;
- `status()` returns fixed HostStats (no GPU, gpu_note "no GPU (test)");
- `pull()` walks a source through resolving → downloading (10 % steps, `step_delay` apart, with
  pull_progress events) → done and adds the model (named after the source's last part); a source
  containing "missing" fails as a 404 does; `cancel_pull()` stops one, `remove()` deletes only a
  model it pulled.

Every timestamp it makes is `now` (a fixed instant by default), so nothing depends on the
wall clock. `calls` records what was asked of it.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Iterable
from dataclasses import replace
from typing import Any

from corral.backend.generation import Chunk, Embeddings, Ranked, RequestStats, Reranking
from corral.backend.request import GenerationRequest, chat_request, completion_request
from corral.backend.respcache import BYPASS
from corral.backend.errors import (BadRequest, Cancelled, ConfigError, LoadFailed, ModelNotFound, ModelPinned, NotFound,
                                   NotPulled, PullNotFound)
from corral.backend.events import (
    ConfigApplied,
    ConfigRejected,
    Event,
    LoadProgress,
    ModelLoaded,
    ModelRemoved,
    PinChanged,
    PullFinished,
    PullProgress,
    RequestFinished,
    RequestStarted,
    StateChanged,
)
from corral.backend.config import parse_duration
from corral.backend.inflight import QUEUED, RUNNING, RequestInfo, checked_canceller
from corral.backend.modellog import LogLine
from corral.backend.pull.status import PullStatus
from corral.backend.snapshot import LoadPlan, ModelDetails, ModelInfo, Status
from corral.backend.versions import ConfigVersion
from corral.backend.telemetry import GPUStats, HostStats

FIXED_NOW = 1_750_000_000.0  # 2025-06-15 15:06:40 UTC
MiB = 1024**2
GiB = 1024**3
LOAD_LINES = (  # what llama.cpp logs at the start of every load, shortened
    "llama_model_loader: loaded meta data with 35 key-value pairs and 236 tensors from /models/{name}.gguf",
    "llama_model_loader: - kv   0:                       general.architecture str              = llama",
    "print_info: file format = GGUF V3 (latest)",
    "print_info: file type   = Q4_K - Medium",
    "load_tensors: loading model tensors, this can take a while... (mmap = true)",
)
BROKEN_REASON = "llama_model_load: error loading model: tensor 'blk.0.attn_q.weight' data is out of bounds"


def model_info(name: str, **fields: Any) -> ModelInfo:
    """A ModelInfo with plausible defaults for every field not given."""
    values: dict[str, Any] = dict(
        name=name, state="available", source="dir", path=f"/models/{name}.gguf", usable=True,
        error=None, file_size=100 * MiB, architecture="llama", quantization="Q4_K_M",
        parameters=100_000_000, context_length=4096, n_ctx=4096, n_parallel=4, pinned=False,
        keep_alive_s=300.0, ttl_left_s=None, in_flight=0, active=0, queued=0, tokens_per_s=0.0,
        estimate_bytes=150 * MiB, estimate_detail=None, measured_bytes=None, measured_vram=None,
        load_seconds=None,
        load_percent=None, last_used=None, chat_template=None,
    )
    values.update(fields)
    return ModelInfo(**values)


def default_models(now: float = FIXED_NOW) -> list[ModelInfo]:
    return [
        model_info("gemma-3-270m", state="ready", source="default", file_size=253_000_000,
                   architecture="gemma3", parameters=268_000_000, context_length=32768,
                   n_parallel=8, pinned=True, tokens_per_s=61.3, estimate_bytes=372 * MiB,
                   measured_bytes=390 * MiB, load_seconds=0.84, last_used=now - 42,
                   chat_template="fallback:gemma"),
        model_info("qwen2.5-0.5b-instruct", state="ready", file_size=531_000_000,
                   architecture="qwen2", quantization="Q8_0", parameters=494_000_000,
                   ttl_left_s=187.0, estimate_bytes=702 * MiB, measured_bytes=688 * MiB,
                   load_seconds=1.31, last_used=now - 113, chat_template="gguf"),
        model_info("tiny-llama", file_size=634_000, quantization="F32", parameters=150_000,
                   estimate_bytes=3_300_000),
        model_info("broken", file_size=1_200_000, quantization="F16", estimate_bytes=4 * MiB),
    ]


def fixed_host(now: float = FIXED_NOW, gpus: tuple[GPUStats, ...] = (),
               gpu_note: str = "no GPU (test)") -> HostStats:
    return HostStats(ts=now, cpu_percent=23.0, cpu_count=16, physical_cores=8,
                     ram_used=int(6.2 * GiB), ram_total=int(31.3 * GiB),
                     ram_available=int(25.1 * GiB), process_rss=812 * MiB, gpus=gpus,
                     gpu_note="" if gpus else gpu_note)


class FakeBackend:
    """The Backend protocol in memory; see the module docstring."""

    kind = "fake"

    def __init__(self, models: Iterable[ModelInfo] | None = None, *, label: str = "embedded",
                 now: float = FIXED_NOW, host: HostStats | None = None,
                 failures: dict[str, str] | None = None, ram_budget: int = 8 * GiB,
                 max_loaded: int = 3, step_delay: float = 0.0, token_delay: float = 0.0) -> None:
        self.label = label
        self.now = now
        self.host = host if host is not None else fixed_host(now)
        self.failures = {"broken": BROKEN_REASON} if failures is None else dict(failures)
        self.ram_budget = ram_budget
        self.max_loaded = max_loaded
        self.step_delay = step_delay
        self.token_delay = token_delay
        self.thinking = ""  # reasoning text the first chunk carries, as a reasoning model's would
        self._models: dict[str, ModelInfo] = {
            m.name: m for m in (default_models(now) if models is None else models)}
        self._seq = 0
        self._ring: list[Event] = []
        self._subscribers: list[asyncio.Queue[Event | None]] = []
        self.calls: list[tuple[Any, ...]] = []
        self.closed = False
        self._versions: list[ConfigVersion] = []
        self.reload_error: str | None = None
        self.reload_diff: tuple[str, ...] = ("defaults.keep_alive: 300.0 → 60.0",)
        self._pulls: dict[str, PullStatus] = {}  # running pulls by id
        self.pulled: set[str] = set()  # models its pull() added: the only ones remove() deletes
        self.in_flight: dict[str, RequestInfo] = {}  # what requests() lists, by request id
        self._generating: set[str] = set()  # ids of the requests generate() streams now
        self._cancelled: dict[str, str] = {}  # generate()'s requests cancelled by id: who asked
        self._logs: dict[str, list[LogLine]] = {}  # llama.cpp's lines per model, as logs() gives them

    # -- test helpers -----------------------------------------------------------------------

    def clock(self) -> float:
        return self.now

    def info(self, name: str) -> ModelInfo:
        return self._get(name)

    def publish(self, event: Event) -> Event:
        """Stamp `event` (seq, ts = now) and hand it to every subscriber."""
        self._seq += 1
        stamped = replace(event, seq=self._seq, ts=self.now)
        self._ring.append(stamped)
        for queue in list(self._subscribers):
            queue.put_nowait(stamped)
        return stamped

    def set_in_flight(self, name: str, count: int) -> ModelInfo:
        """Pretend `count` requests are running or queued on `name` (busy when > 0)."""
        m = self._get(name)
        active = min(count, m.n_parallel)
        state = m.state
        if m.loaded:
            state = "busy" if count else "ready"
        changes = dict(in_flight=count, active=active, queued=count - active)
        if state != m.state:  # ready ⇄ busy is announced only when it flips
            return self._transition(name, state, **changes)
        return self._set(name, **changes)

    def add_request(self, request_id: str, model: str, *, state: str = RUNNING, **fields: Any) -> RequestInfo:
        """Pretend a request is in flight on `model` (it counts in the model's in_flight)."""
        position = sum(1 for r in self.in_flight.values() if r.model == model and r.state == QUEUED) + 1
        values: dict[str, Any] = dict(api="openai", session_id=None, age_s=3.0, prompt_tokens=12, tokens=40,
                                      tokens_per_s=21.5, queue_position=position if state == QUEUED else None)
        values.update(fields)
        if state == QUEUED:
            values.update(tokens=0, tokens_per_s=None)
        info = RequestInfo(request_id, model, state=state, **values)
        self.in_flight[request_id] = info
        self.set_in_flight(model, self._get(model).in_flight + 1)
        return info

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    # -- the Backend protocol ----------------------------------------------------------------

    async def models(self) -> list[ModelInfo]:
        return list(self._models.values())

    async def status(self) -> Status:
        models = tuple(self._models.values())
        reserved = sum((m.measured_bytes or m.estimate_bytes or 0) for m in models
                       if m.state in ("loading", "ready", "busy", "unloading"))
        return Status(models, self.host, self.ram_budget, reserved, self.max_loaded)

    async def plan(self, name: str, **overrides: Any) -> LoadPlan:
        """Fits when its estimate fits beside the other loaded models (no evictions, no GPU)."""
        self.calls.append(("plan", name, overrides))
        m = self._get(name)
        others = [x for x in self._models.values() if x.loaded and x.name != name]
        held = sum((x.measured_bytes or x.estimate_bytes or 0) for x in others)
        need = m.estimate_bytes or 0
        fits = need <= self.ram_budget - held and len(others) < self.max_loaded
        return LoadPlan(model=name, state=m.state, settings={"n_ctx": m.n_ctx, "n_parallel": m.n_parallel},
                        estimate=dict(m.estimate_detail or {"total": need}), ram_bytes=need, vram_bytes=0, gpu=None,
                        n_gpu_layers=0, placement="CPU: no GPU (test)", ram_budget=self.ram_budget, ram_reserved=held,
                        max_loaded=self.max_loaded, loaded=len(others), fits=fits,
                        refusal=None if fits else f"needs {need} B but {self.ram_budget - held} B are free",
                        suggestions=() if fits else ("n_ctx = 2048",))

    async def load(self, name: str, keep_alive: float | str | None = None) -> ModelInfo:
        self.calls.append(("load", name))
        if keep_alive is not None:
            self._set(name, keep_alive_s=parse_duration(keep_alive))
        m = self._get(name)
        while m.state in ("loading", "unloading"):
            await asyncio.sleep(0)
            m = self._get(name)
        if m.loaded:
            return m
        self._transition(name, "loading", error=None, load_percent=0, measured_bytes=None)
        reason = self.failures.get(name)
        log = self._logs.setdefault(name, [])
        log.append(LogLine(self.now, "corral", f"loading {m.path} (no GPU (test): CPU)"))
        log += [LogLine(self.now, "info", text.format(name=name)) for text in LOAD_LINES]
        for percent in range(0, 101, 5):
            if reason is not None and percent > 40:
                log.append(LogLine(self.now, "error", reason))
                log.append(LogLine(self.now, "corral", f"load failed: model {name!r}: {reason}"))
                self._transition(name, "failed", reason, error=reason, load_percent=None)
                raise LoadFailed(f"model {name!r}: {reason}")
            self._set(name, load_percent=percent)
            self.publish(LoadProgress(model=name, percent=percent))
            await asyncio.sleep(self.step_delay)
        m = self._get(name)
        estimate = m.estimate_bytes or 0
        measured = estimate + estimate // 16
        self._set(name, measured_bytes=measured, load_seconds=1.25, load_percent=None,
                  last_used=self.now, ttl_left_s=None if m.pinned else m.keep_alive_s)
        self.publish(ModelLoaded(model=name, seconds=1.25, estimate_bytes=estimate,
                                 measured_bytes=measured))
        return self._transition(name, "ready")

    async def logs(self, name: str) -> list[LogLine]:
        """The lines its loads logged: a few of llama.cpp's per load and, for a failure, its
        reason as an error line."""
        self._get(name)
        return list(self._logs.get(name, []))

    async def details(self, name: str) -> ModelDetails:
        """Details from the model's ModelInfo; there is no file, so the digest is of its name."""
        m = self._get(name)
        return ModelDetails(
            name=name, path=m.path, file_size=m.file_size, modified_at=self.now,
            digest=hashlib.sha256(name.encode()).hexdigest(), architecture=m.architecture,
            parameters=m.parameters, quantization=m.quantization, context_length=m.context_length,
            n_ctx=m.n_ctx, chat_template=None, alias_of=m.alias_of,
            metadata={"general.architecture": m.architecture or "llama", "general.name": name})

    async def evict(self, name: str, *, force: bool = False) -> ModelInfo:
        self.calls.append(("evict", name, force))
        m = self._get(name)
        if m.state == "failed":
            return self._transition(name, "available", "cleared", error=None)
        if not m.loaded:
            return m
        if m.pinned and not force:
            raise ModelPinned(f"model {name!r} is pinned; unpin it first or evict with force")
        reason = "evicted by operator" + (" (forced)" if force else "")
        self._transition(name, "unloading", reason)
        await asyncio.sleep(0)
        return self._transition(name, "available", reason, measured_bytes=None,
                                load_seconds=None, ttl_left_s=None, in_flight=0, active=0,
                                queued=0, tokens_per_s=0.0)

    async def pin(self, name: str, pinned: bool = True) -> ModelInfo:
        self.calls.append(("pin", name, pinned))
        m = self._get(name)
        if m.pinned == pinned:
            return m
        ttl = None if pinned or not m.state == "ready" else m.keep_alive_s
        m = self._set(name, pinned=pinned, ttl_left_s=ttl)
        self.publish(PinChanged(model=name, pinned=pinned))
        return m

    async def unload_all(self) -> None:
        self.calls.append(("unload_all",))
        for m in list(self._models.values()):
            if m.loaded:
                await self.evict(m.name, force=True)

    def complete(self, model: str, prompt: str, **fields: Any) -> AsyncIterator[Chunk]:
        return self.generate(completion_request(model, prompt, **fields))

    def chat(self, model: str, messages: list[dict[str, Any]], **fields: Any) -> AsyncIterator[Chunk]:
        return self.generate(chat_request(model, messages, **fields))

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        """The same four pieces whatever is asked, in the backend's chunk contract: the first
        chunk carries the cache verdict (this fake keeps no cache), the last one the finish
        reason and stats."""
        self.calls.append(("generate", request))
        request.validate()
        model = request.model
        await self.load(model)
        request_id = request.request_id or f"req-{self._seq + 1:04d}"
        self.set_in_flight(model, self._get(model).in_flight + 1)
        self.publish(RequestStarted(model=model, request_id=request_id, prompt_tokens=4,
                                    queue_wait_s=0.0))
        pieces = ["Once", " upon", " a", " time"]
        reason, sent = "length", 0
        self.in_flight[request_id] = RequestInfo(request_id, model, request.api, request.session_id, RUNNING, 0.0,
                                                 4, 0, None, None)
        self._generating.add(request_id)
        try:
            for i, piece in enumerate(pieces):
                if i:
                    await asyncio.sleep(self.token_delay)
                if request_id in self._cancelled:
                    reason = "cancelled"
                    break
                sent += 1
                self.in_flight[request_id] = replace(self.in_flight[request_id], tokens=sent)
                if sent < len(pieces):
                    yield Chunk(piece, cache=BYPASS, reasoning=self.thinking) if i == 0 else Chunk(piece)
            stats = RequestStats(prompt_tokens=4, completion_tokens=sent, queue_wait_s=0.0, ttft_s=0.01,
                                 duration_s=0.1)
            yield Chunk(pieces[-1] if reason == "length" else "", finish_reason=reason, stats=stats)
        finally:
            self._generating.discard(request_id)
            self.in_flight.pop(request_id, None)
            self.set_in_flight(model, max(0, self._get(model).in_flight - 1))
            self._set(model, last_used=self.now)
            self.publish(RequestFinished(model=model, request_id=request_id, finish_reason=reason,
                                         prompt_tokens=4, completion_tokens=sent, ttft_s=0.01, duration_s=0.1,
                                         tokens_per_s=33.3, cancelled_by=self._cancelled.pop(request_id, None)))

    async def events(self, after_seq: int | None = None) -> AsyncIterator[Event]:
        queue: asyncio.Queue[Event | None] = asyncio.Queue()
        backlog = [e for e in self._ring if after_seq is not None and e.seq > after_seq]
        self._subscribers.append(queue)
        try:
            last = after_seq or 0
            for event in backlog:
                last = event.seq
                yield event
            while True:
                event = await queue.get()
                if event is None:
                    return
                if event.seq > last:
                    last = event.seq
                    yield event
        finally:
            if queue in self._subscribers:
                self._subscribers.remove(queue)

    async def embed(self, model: str, inputs: list[str], **options: Any) -> Embeddings:
        self._get(model)
        texts = [inputs] if isinstance(inputs, str) else inputs
        return Embeddings([[float(len(t)), 1.0] for t in texts], sum(len(t.split()) for t in texts))

    async def rerank(self, model: str, query: str, documents: list[str], top_n: int | None = None,
                     **options: Any) -> Reranking:
        """The share of the query's words in each document stands in for a reranker's score."""
        self._get(model)
        words = set(query.split())
        scores = [len(words & set(d.split())) / max(len(words), 1) for d in documents]
        ranked = sorted((Ranked(i, s) for i, s in enumerate(scores)), key=lambda r: -r.relevance_score)
        return Reranking(ranked[:top_n], sum(len(query.split()) + len(d.split()) for d in documents))

    async def count_tokens(self, request: GenerationRequest) -> int:
        """A word count of the request's messages stands in for the model's tokenizer."""
        self.calls.append(("count_tokens", request))
        request.validate()
        if request.messages is None:
            raise BadRequest("count_tokens counts a chat request's prompt (messages), not a plain prompt")
        self._get(request.model)
        return sum(len(m.content.split()) for m in request.messages)

    async def rescan(self) -> list[ModelInfo]:
        return await self.models()

    async def requests(self) -> list[RequestInfo]:
        self.calls.append(("requests",))
        return sorted(self.in_flight.values(), key=lambda r: (r.model, r.state == QUEUED, r.queue_position or 0))

    async def cancel_request(self, request_id: str, by: str = "python") -> list[RequestInfo]:
        """A streaming request ends at its next piece; one `add_request` made ends at once."""
        self.calls.append(("cancel_request", request_id, by))
        checked_canceller(by)
        info = self.in_flight.get(request_id)
        if info is None or request_id in self._cancelled:
            raise NotFound(f"no running or queued request has id {request_id!r}")
        if request_id in self._generating:
            self._cancelled[request_id] = by
        else:
            del self.in_flight[request_id]
            self.set_in_flight(info.model, max(0, self._get(info.model).in_flight - 1))
            self.publish(RequestFinished(model=info.model, request_id=request_id, finish_reason="cancelled",
                                         prompt_tokens=info.prompt_tokens, completion_tokens=info.tokens, ttft_s=None,
                                         duration_s=info.age_s, tokens_per_s=None, api=info.api, cancelled_by=by))
        return [info]

    async def pull(self, source: str, *, name: str | None = None, sha256: str | None = None,
                   directory: str | None = None) -> AsyncIterator[PullStatus]:
        self.calls.append(("pull", source))
        model = name or source.rstrip("/").rsplit("/", 1)[-1].split(":")[0].removesuffix(".gguf").lower()
        status = PullStatus(f"pull-{len(self.calls)}", source, "resolving", directory=directory or "/models")
        self._pulls[status.id] = status
        try:
            yield status
            if "missing" in source:
                raise PullNotFound(f"{source}: no such file on the host (HTTP 404)")
            total = 100 * MiB
            for percent in range(0, 101, 10):
                if status.id not in self._pulls:
                    raise Cancelled(f"the pull of {source} was cancelled")
                status = replace(status, status="downloading", model=model, total=total, files=1,
                                 completed=total * percent // 100, rate=10.0 * MiB, eta_s=(100 - percent) / 10)
                self._pulls[status.id] = status
                self.publish(PullProgress(model=model, pull_id=status.id, source=source, percent=percent,
                                          completed=status.completed, total=total))
                yield status
                await asyncio.sleep(self.step_delay)
            self._models[model] = model_info(model, path=f"/models/{model}.gguf", file_size=total)
            self.pulled.add(model)
            status = replace(status, status="done", paths=(f"/models/{model}.gguf",), rate=None, eta_s=None)
            self.publish(PullFinished(model=model, pull_id=status.id, source=source, files=status.paths,
                                      size=total, sha256=(hashlib.sha256(model.encode()).hexdigest(),)))
            yield status
        finally:
            self._pulls.pop(status.id, None)

    async def cancel_pull(self, pull_id: str) -> PullStatus:
        status = self._pulls.pop(pull_id, None)
        if status is None:
            raise NotFound(f"no running pull {pull_id!r}")
        return status

    async def pulls(self) -> list[PullStatus]:
        return list(self._pulls.values())

    async def remove(self, name: str) -> list[str]:
        m = self._get(name)
        if name not in self.pulled:
            raise NotPulled(f"model {name!r} is a file in a model folder, {m.path}, which corral did not download")
        del self._models[name]
        self.pulled.discard(name)
        self.publish(ModelRemoved(model=name, files=(m.path or "",)))
        return [m.path or ""]

    async def ready(self) -> None:
        return None

    async def warmed(self) -> None:
        return None

    # -- configuration: versions without a file; `reload_error` makes the next reload fail ---

    async def config_versions(self) -> list[ConfigVersion]:
        if not self._versions:
            self._versions.append(ConfigVersion(1, 0.0, "start", (), (), None, None))
        return list(self._versions)

    async def reload_config(self, source: str = "api") -> ConfigVersion:
        versions = await self.config_versions()
        if self.reload_error is not None:
            self.publish(ConfigRejected(source=source, error=self.reload_error))
            raise ConfigError(self.reload_error)
        return self._new_version(versions, source, self.reload_diff)

    async def rollback_config(self, number: int, source: str = "api") -> ConfigVersion:
        versions = await self.config_versions()
        if number not in [v.number for v in versions]:
            raise NotFound(f"config version {number} does not exist")
        return self._new_version(versions, f"{source} (rollback to {number})", ())

    def _new_version(self, versions: list[ConfigVersion], source: str, diff: tuple[str, ...]) -> ConfigVersion:
        version = ConfigVersion(versions[-1].number + 1, self.clock(), source, diff, (), None, None)
        self._versions.append(version)
        self.publish(ConfigApplied(version=version.number, source=source, diff=diff, actions=()))
        return version

    async def aclose(self) -> None:
        self.closed = True
        for queue in self._subscribers:
            queue.put_nowait(None)

    # -- internals ---------------------------------------------------------------------------

    def _get(self, name: str) -> ModelInfo:
        try:
            return self._models[name]
        except KeyError:
            raise ModelNotFound(name, list(self._models)) from None

    def _set(self, name: str, **changes: Any) -> ModelInfo:
        m = replace(self._get(name), **changes)
        self._models[name] = m
        return m

    def _transition(self, name: str, new: str, reason: str = "", **changes: Any) -> ModelInfo:
        old = self._get(name).state
        m = self._set(name, state=new, **changes)
        self.publish(StateChanged(model=name, old=old, new=new, reason=reason))
        return m
