"""One loaded model's generation: a llama.cpp context and the scheduler thread that owns it.

The weights (weights.py) are apart and reference-counted; embeddings run on a context of their
own (embedder.py); how each sequence's token is chosen (sampler chains, grammars,
log-probabilities) is in samplers.py, and how its tokens become text and figures in
sequence.py; which sequence holds which cached prompt prefix is in slots.py and prefixes.py.

The scheduler thread drives llama-cpp-python's low-level API: every step it puts the next
token of every running sequence, plus prompt chunks of newly admitted ones, into one batch,
decodes once, samples every sequence in one pass and hands the results to the consumers' event
loops in one hop per loop. Grammar-held sequences share that batch and that pass. Requests
join between steps and a cancelled request frees its sequence at the next step. Nothing here
touches an asyncio loop except through `call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import llama_cpp

from . import llamalog
from .chat import ChatTemplate
from .embedder import Embedder, in_own_thread
from .errors import BadRequest, Cancelled, LoadFailed, QueueFull
from .events import EventBus, RequestFinished, RequestStarted
from .generation import Chunk, Decoding, RequestStats, TokenLogprob
from .inflight import RequestInfo
from .request import MAX_TOP_LOGPROBS
from .samplers import GrammarDeadEnd, GrammarStats, Scratch, TokenSampler, prepare_loop_guard
from .kvstore import PrefixStore, prefix_key
from .modellog import ModelLog
from .prefixes import Prefixes
from .sequence import Delivery, Queued, Sequence
from .slots import SlotCache, awaited_prefix
from .stepcost import StepCosts
from .weights import ModelWeights, batch_add, new_context

T = TypeVar("T")

log = logging.getLogger("corral.engine")

# After each decode the scheduler thread needs the GIL back, often from an event loop that is
# busy writing the previous step's chunks. With CPython's default 5 ms switch interval it can
# wait that long while the cores idle; 0.5 ms measured +5-9 % tok/s at 1 and 8 streams here.
GIL_SWITCH_INTERVAL_S = 0.0005
IDLE_EXIT_S = 1.0  # a scheduler thread with no work for this long ends (Engine._spawn)


@dataclass(frozen=True)
class ContextSettings:
    n_ctx: int = 4096
    n_parallel: int = 4
    n_batch: int = 512
    n_threads: int = 1
    flash_attn: bool = True  # as config's default
    n_ubatch: int | None = None  # tokens computed at once; None: n_batch
    type_k: str = "f16"  # KV cache element types (config.KVType)
    type_v: str = "f16"
    max_queue: int = 64


@dataclass(frozen=True)
class EngineLoad:
    """What the engine is doing now: for /api/ps, the console's queue panel and admission."""

    active: int
    queued: int
    slots: int
    oldest_wait_s: float
    tokens_per_s: float


class Engine:
    """A generation context over `weights` and the one thread allowed to touch it."""

    _ids = itertools.count()

    def __init__(self, weights: ModelWeights, settings: ContextSettings, *, model_name: str,
                 bus: EventBus | None = None, template: ChatTemplate | None = None,
                 prefixes: PrefixStore | None = None, model_log: ModelLog | None = None) -> None:
        self.weights = weights.retain()
        self.model_log = model_log  # the model's ring of llama.cpp lines: this engine's threads add theirs
        self.settings = settings
        self.model_name = model_name
        self.bus = bus
        self.template = template
        self.restored = 0  # prompt tokens of saved KV the start made ready
        try:
            self._ctx = new_context(weights, n_ctx=settings.n_ctx, n_batch=settings.n_batch,
                                    n_seq_max=settings.n_parallel, n_threads=settings.n_threads,
                                    flash_attn=settings.flash_attn, n_ubatch=settings.n_ubatch, type_k=settings.type_k,
                                    type_v=settings.type_v)
        except Exception:
            self.weights.release()
            raise
        # llama.cpp may round n_ctx up and clamp n_batch to it: plan with what it chose.
        self.n_ctx = llama_cpp.llama_n_ctx(self._ctx)
        self.n_batch = llama_cpp.llama_n_batch(self._ctx)
        self._memory = llama_cpp.llama_get_memory(self._ctx)
        self._batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        self._pending: deque[Queued] = deque()
        self._running: dict[int, Sequence] = {}
        self._slots = SlotCache(settings.n_parallel, share=not weights.recurrent)
        self._costs = StepCosts()
        self._prefixes = Prefixes(self._ctx, self._slots, prefixes, model_name=model_name, park_for=self.n_batch // 2,
                                  key=prefix_key(weights.path, n_ctx=self.n_ctx, flash_attn=settings.flash_attn,
                                                 kv_types=(settings.type_k, settings.type_v)))
        self._cv = threading.Condition()
        self._closing = False
        self._recent_tokens: deque[tuple[float, int]] = deque(maxlen=256)
        self._thread: threading.Thread | None = None
        self._scheduling = False  # a scheduler thread is running (or starting); under self._cv
        self._started = threading.Event()
        self._start_error: BaseException | None = None
        self._embedder: Embedder | None = None
        self._embedder_lock = threading.Lock()
        self._embed_waiting = 0
        self._scratch = Scratch(weights.n_vocab)
        prepare_loop_guard(weights)
        self.failure: str | None = None
        self.on_failure: Callable[[str], None] | None = None  # set by the manager; any thread

    # -- lifecycle -------------------------------------------------------------------------

    def start(self, warmup: bool = True) -> None:
        """Start the scheduler thread and wait for its warm-up (one tiny decode, so the first
        request does not pay for page faults and graph allocation). Blocking: call off the
        event loop.

        The warm-up runs on the scheduler thread itself, like every later decode. llama.cpp's
        CPU backend parallelises with OpenMP, which keeps a team of threads per calling thread
        for as long as that thread lives; a second team (a warm-up on a pool thread that stays
        alive) makes OpenMP count more threads than cores and sleep between parallel regions,
        which cost 25-30 % of decode speed here (tests/benchmarks/ceiling.py)."""
        if sys.getswitchinterval() > GIL_SWITCH_INTERVAL_S:  # process-wide; only ever lowered
            sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
        with self._cv:
            self._spawn(warmup)
        self._started.wait()
        if self._start_error is not None:
            raise self._start_error

    def _spawn(self, warmup: bool = False) -> None:
        """Start a scheduler thread (caller holds the lock). One runs while there is work; it
        ends after IDLE_EXIT_S without any, taking its OpenMP team with it, so an idle model
        does not slow the decodes of a busy one (see `start`); the next request starts one."""
        self._scheduling = True
        self._thread = threading.Thread(target=self._run, args=(warmup,), daemon=True,
                                        name=f"engine-{self.model_name}-{next(self._ids)}")
        self._thread.start()

    def _warmup(self) -> None:
        token = self.weights.bos if self.weights.bos >= 0 else 0
        self._batch.n_tokens = 0
        self._add(token, 0, 0, True)
        rc = llama_cpp.llama_decode(self._ctx, self._batch)
        llama_cpp.llama_memory_clear(self._memory, True)
        if rc != 0:
            raise LoadFailed(f"{self.weights.path}: warmup decode failed (llama_decode returned {rc})")

    def close(self) -> None:
        """Cancel everything, stop the thread, free the context and release the weights."""
        with llamalog.attributed(self.model_log):
            self._close()

    def _close(self) -> None:
        with self._cv:
            if self._closing:
                return
            self._closing = True
            self._cv.notify_all()
            thread = self._thread if self._scheduling else None
        if thread is not None:
            thread.join()  # it ends every request it has
        else:
            self._finish_all("cancelled", "model unloaded")
        with self._embedder_lock:
            if self._embedder is not None:
                self._embedder.close()
        if self.failure is None:
            self._prefixes.save()
        llama_cpp.llama_batch_free(self._batch)
        llama_cpp.llama_free(self._ctx)
        self._ctx = None
        self.weights.release()

    # -- requests --------------------------------------------------------------------------

    async def embed_async(self, texts: list[str]) -> tuple[list[list[float]], int]:
        """`embed` on a thread of its own (see `_pooled_async`)."""
        return await self._pooled_async(self.embed, texts)

    async def rerank_async(self, query: str, documents: list[str]) -> tuple[list[float], int]:
        """`rerank` on a thread of its own (see `_pooled_async`)."""
        return await self._pooled_async(self.rerank, query, documents)

    async def _pooled_async(self, call: Callable[..., T], *args: Any) -> T:
        """`call(*args)` (an embedder's call) on a thread of its own; beyond `max_queue` waiting,
        QueueFull.

        A fresh thread per call, not a pool: a thread that decodes keeps an OpenMP team while it
        lives, and an idle team slows every generation decode (see `start`). Calls still run one
        at a time (the embedder's lock), and a backlog never occupies the shared worker pool."""
        with self._embedder_lock:
            if self._embed_waiting > self.settings.max_queue:
                raise QueueFull(self.model_name, self._embed_waiting)
            self._embed_waiting += 1
        try:
            return await asyncio.wrap_future(in_own_thread(call, *args, name=f"embed-{self.model_name}"))
        finally:
            with self._embedder_lock:
                self._embed_waiting -= 1

    def embed(self, texts: list[str]) -> tuple[list[list[float]], int]:
        """Blocking: pooled vectors from a second context on the same weights."""
        with llamalog.attributed(self.model_log):
            return self._the_embedder().embed(texts)

    def rerank(self, query: str, documents: list[str]) -> tuple[list[float], int]:
        """Blocking: a reranker's score per document, from a second context on the same weights."""
        with llamalog.attributed(self.model_log):
            return self._the_embedder().rerank(query, documents)

    def _the_embedder(self) -> Embedder:
        """The embeddings (or reranking) context, made on first use (its lines go to the model's log)."""
        with self._embedder_lock:
            if self._closing:
                raise Cancelled(f"model {self.model_name!r} is unloading")
            if self._embedder is None:
                self._embedder = Embedder(self.weights, n_ctx=self.settings.n_ctx,
                                          n_threads=self.settings.n_threads)
            return self._embedder

    def submit(self, tokens: list[int], decoding: Decoding, *, request_id: str | None = None,
               session_id: str | None = None, api: str | None = None) -> Queued:
        """Queue a request; chunks arrive on the calling loop's queue. Raises QueueFull/BadRequest,
        also for a grammar llama.cpp cannot parse: that is known before anything is queued."""
        decoding.params.validate()
        if not 0 <= decoding.top_logprobs <= MAX_TOP_LOGPROBS:
            raise BadRequest(f"top_logprobs = {decoding.top_logprobs}: must be between 0 and {MAX_TOP_LOGPROBS}")
        if not tokens:
            raise BadRequest("the prompt is empty after tokenization")
        if len(tokens) >= self.n_ctx:
            raise BadRequest(
                f"model {self.model_name!r}: prompt is {len(tokens)} tokens but the context holds "
                f"{self.n_ctx}; shorten the prompt or raise n_ctx"
            )
        request = Queued(request_id or uuid.uuid4().hex, session_id, tokens, decoding,
                           Delivery(asyncio.get_running_loop()), TokenSampler(self.weights, decoding, self._scratch),
                           api=api, model=self.model_name)
        with self._cv:
            refusal: Exception | None = None
            if self._closing:
                refusal = Cancelled(f"model {self.model_name!r} is unloading")
            elif len(self._pending) >= self.settings.max_queue + len(self._slots.free):
                refusal = QueueFull(self.model_name, len(self._pending))
            else:
                self._pending.append(request)
                self._cv.notify()
                if not self._scheduling and self._started.is_set():  # an unstarted engine only queues
                    self._spawn()
        if refusal is not None:
            request.sampler.free()
            raise refusal
        return request

    def parked_bytes(self) -> int:
        """KV of idle sequences moved out of the cache beside it (prefixes.py): memory the model
        holds beyond its estimate, up to [budgets] saved_kv_ram."""
        return self._prefixes.parked_bytes()

    def cancel(self, request: Queued) -> None:
        """Ask the scheduler to drop `request`; it frees its sequence at the next step."""
        request.cancelled = True
        with self._cv:
            self._cv.notify()

    def cancel_id(self, request_id: str, by: str) -> list[RequestInfo]:
        """Cancel every running or queued request with this id (ids are unique unless a client
        reuses its own X-Request-Id), as `by` asked; each ends with finish reason "cancelled" at
        the next step. Returns them as they were; an empty list when none has the id."""
        now = time.perf_counter()
        with self._cv:
            found = [seq.info(now) for seq in self._running.values() if self._mark(seq.request, request_id, by)]
            found += [request.info(i, now) for i, request in enumerate(self._pending, 1)
                      if self._mark(request, request_id, by)]
            if found:
                self._cv.notify()
        return found

    @staticmethod
    def _mark(request: Queued, request_id: str, by: str) -> bool:
        if request.id != request_id or request.cancelled:
            return False
        request.cancelled_by, request.cancelled = by, True
        return True

    def requests(self) -> list[RequestInfo]:
        """The requests running and queued now, copied under the lock the scheduler takes only
        between decodes, so a reader never waits for a step. Cancelled ones are left out: they
        end at the next step."""
        now = time.perf_counter()
        with self._cv:
            running = [seq for seq in self._running.values() if not seq.request.cancelled]
            queued = [request for request in self._pending if not request.cancelled]
        return ([seq.info(now) for seq in running]
                + [request.info(i, now) for i, request in enumerate(queued, 1)])

    async def stream(self, tokens: list[int], decoding: Decoding, *, request_id: str | None = None,
                     session_id: str | None = None, api: str | None = None) -> AsyncIterator[Chunk]:
        """Submit and yield chunks; leaving the iterator early cancels the request."""
        request = self.submit(tokens, decoding, request_id=request_id, session_id=session_id, api=api)
        try:
            while True:
                chunk = await request.delivery.queue.get()
                yield chunk
                if chunk.finish_reason is not None:
                    return
        finally:
            self.cancel(request)

    @property
    def grammar_stats(self) -> GrammarStats:
        """How grammar-held tokens were chosen so far (samplers.py): checked alone, or found
        among the top candidates or the whole vocabulary after a rejection."""
        return self._scratch.stats

    def load(self) -> EngineLoad:
        now = time.perf_counter()
        with self._cv:
            oldest = min((r.submitted for r in self._pending), default=now)
            active, queued = len(self._running), len(self._pending)
        window = [n for t, n in list(self._recent_tokens) if now - t <= 5.0]
        return EngineLoad(active, queued, self.settings.n_parallel, now - oldest, sum(window) / 5.0)

    def kv_cells(self) -> dict[int, tuple[int, int]]:
        """Per sequence id: (tokens we believe it holds, tokens llama.cpp says it holds).

        For leak checks while the engine is idle; refuses while requests run, because llama.cpp
        must not be asked about its memory during a decode on the scheduler thread.
        """
        with self._cv:
            if self._running or self._pending:
                raise RuntimeError("kv_cells() is only meaningful while the engine is idle")
            return {seq: (len(tokens), llama_cpp.llama_memory_seq_pos_max(self._memory, seq) + 1)
                    for seq, tokens in enumerate(self._slots.tokens)}

    # -- scheduler thread ------------------------------------------------------------------

    def _run(self, warmup: bool) -> None:
        with llamalog.attributed(self.model_log):
            self._schedule(warmup)

    def _schedule(self, warmup: bool) -> None:
        try:
            if warmup:
                self._warmup()
            self.restored = self._prefixes.restore()
        except BaseException as exc:  # start() raises it in the loading thread
            self._start_error = exc
            with self._cv:
                self._scheduling = False
            return
        finally:
            self._started.set()
        try:
            while True:
                with self._cv:
                    while not self._closing and not self._pending and not self._running:
                        if not self._cv.wait(IDLE_EXIT_S) and not (self._pending or self._running or self._closing):
                            self._scheduling = False  # idle: end; the next submit starts a thread
                            return
                    if self._closing:
                        break
                    self._admit()
                self._step()
        except Exception as exc:  # a bug or a llama.cpp failure: fail requests, keep the process
            log.exception("engine %s stopped", self.model_name)
            with self._cv:
                self._closing = True  # refuse new requests: nobody would serve them
                self.failure = f"engine failure: {exc}"
            self._finish_all("error", self.failure)
            if self.on_failure is not None:
                self.on_failure(self.failure)
            return
        self._finish_all("cancelled", "model unloaded")

    def _admit(self) -> None:
        """Move queued requests into free sequences (caller holds the lock). A request whose
        prompt begins with what a running sequence is still evaluating waits for those tokens
        and then shares them (slots.awaited_prefix). Whatever fails, every request not placed
        stays queued, so that the failure ends it rather than leaving its client waiting."""
        held: list[Queued] = []
        if any(request.cancelled for request in self._pending):  # ends now, not once it reaches a slot
            out: list[tuple[Delivery, Chunk]] = []
            for request in [r for r in self._pending if r.cancelled]:
                self._pending.remove(request)
                self._drop(request, "cancelled", None, out)
            self._deliver(out)
        try:
            while self._pending and self._slots.free:
                request = self._pending[0]
                if self._awaits_prefix(request):
                    held.append(self._pending.popleft())
                else:
                    seq_id, cached = self._prefixes.place(request.tokens)
                    seq = Sequence(self._pending.popleft(), seq_id, self.weights, self.n_ctx, cached)
                    self._running[seq.seq_id] = seq
                    self._publish(RequestStarted(model=self.model_name, request_id=request.id,
                                                 session_id=request.session_id, prompt_tokens=len(request.tokens),
                                                 queue_wait_s=seq.started - request.submitted,
                                                 cached_tokens=cached, api=request.api))
        finally:
            self._pending.extendleft(reversed(held))

    def _awaits_prefix(self, request: Queued) -> bool:
        if request.awaits is None:
            prefilling = {s.seq_id: (s.request.tokens, s.prompt_pos) for s in self._running.values() if s.prefilling}
            found = awaited_prefix(request.tokens, prefilling) if self._slots.share else None
            if found is None:
                return False
            request.awaits = (self._running[found[0]], found[1])
        seq, until = request.awaits
        return self._running.get(seq.seq_id) is seq and seq.prompt_pos < until

    def _step(self) -> None:
        out: list[tuple[Delivery, Chunk]] = []
        for seq in [s for s in self._running.values() if s.request.cancelled]:
            self._end(seq, "cancelled", out)
        saved = {seq: (seq.n_past, seq.prompt_pos) for seq in self._running.values()}
        logits_at, prompt_tokens = self._fill_batch()
        if self._batch.n_tokens:
            began = time.perf_counter()
            rc = llama_cpp.llama_decode(self._ctx, self._batch)
            if rc == 1:  # the unified KV cache is full and nothing was decoded: undo the batch
                for seq, (n_past, prompt_pos) in saved.items():
                    seq.n_past, seq.prompt_pos = n_past, prompt_pos
                    self._prefixes.trim(seq.seq_id, n_past)
                self._make_kv_room(saved, out)
                self._deliver(out)
                return
            if rc != 0:
                raise RuntimeError(f"llama_decode returned {rc}")
            self._costs.record(time.perf_counter() - began, prompt_tokens)
            self._sample(logits_at, out)
        self._deliver(out)

    def _fill_batch(self) -> tuple[list[tuple[Sequence, int]], int]:
        """One token per generating sequence, then prompt chunks up to n_batch tokens; returns
        where logits are wanted and how many prompt tokens the batch holds.

        Once a prompt finishes in this step, further prompts wait for the next one if the batch
        already holds prompt tokens worth a step's fixed cost (stepcost.py): their first tokens
        come in turn rather than all at the end of one long step.

        A step with a long prompt chunk makes the generating sequences wait for it. Capping the
        chunk at half a batch while others generate was measured (long_prompts.py): their
        inter-token p99 fell from 0.86x to 0.69x of llama-server's, but the newcomer's first
        token came 1.28x later and a shared-prefix load's TTFT p50 went from 0.91x to 1.53x; at
        full batches corral is already no worse than llama-server there, so they stay full."""
        self._batch.n_tokens = 0
        logits_at: list[tuple[Sequence, int]] = []
        budget = self.n_batch
        for seq in self._running.values():
            if budget <= 0:  # n_batch >= n_parallel is enforced by config; this is a guard
                break
            if not seq.prefilling and seq.last_token is not None:
                logits_at.append((seq, self._batch.n_tokens))
                self._add(seq.last_token, seq.n_past, seq.seq_id, True)
                self._slots.tokens[seq.seq_id].append(seq.last_token)
                seq.n_past += 1
                budget -= 1
        group, prompt_tokens, finished = self._costs.prompt_group(self.n_batch), 0, False
        for seq in self._running.values():
            if budget <= 0 or (finished and prompt_tokens >= group):
                break
            if seq.prefilling:
                take = seq.request.tokens[seq.prompt_pos:seq.prompt_pos + budget]
                for i, token in enumerate(take):
                    last = seq.prompt_pos + i == len(seq.request.tokens) - 1
                    if last:
                        logits_at.append((seq, self._batch.n_tokens))
                    self._add(token, seq.n_past, seq.seq_id, last)
                    seq.n_past += 1
                self._slots.tokens[seq.seq_id].extend(take)
                seq.prompt_pos += len(take)
                budget -= len(take)
                prompt_tokens += len(take)
                finished = finished or not seq.prefilling
        return logits_at, prompt_tokens

    def _make_kv_room(self, running: dict[Sequence, tuple[int, int]],
                      out: list[tuple[Delivery, Chunk]]) -> None:
        """The KV cache is full: drop idle cached prefixes first, else end the longest request."""
        idle = self._slots.idle_cached()
        if idle:
            for seq_id in idle:
                self._prefixes.trim(seq_id, 0)
            return
        longest = max(running, key=lambda s: s.n_past)
        self._end(longest, "length", out)
        self._prefixes.trim(longest.seq_id, 0)

    def _add(self, token: int, pos: int, seq_id: int, logits: bool) -> None:
        batch_add(self._batch, token, pos, seq_id, logits)

    def _sample(self, logits_at: list[tuple[Sequence, int]], out: list[tuple[Delivery, Chunk]]) -> None:
        now = time.perf_counter()
        for seq, index in logits_at:
            sampler = seq.sampler
            try:
                token = sampler.pick(self._ctx, index)
            except GrammarDeadEnd as exc:
                self._end(seq, "error", out, error=str(exc))
                continue
            text, finish = seq.add_token(token)
            logprobs = (sampler.logprob(self._ctx, index, token),) if sampler.logprobs and not seq.delimited else ()
            if finish is not None:
                self._end(seq, finish, out, text, logprobs=logprobs)
            elif text or logprobs:  # a token whose text is held back still has its logprob
                out.append((seq.request.delivery, Chunk(text, logprobs=logprobs)))
        self._recent_tokens.append((now, len(logits_at)))

    def _end(self, seq: Sequence, reason: str, out: list[tuple[Delivery, Chunk]], text: str = "",
             error: str | None = None, logprobs: tuple[TokenLogprob, ...] = ()) -> None:
        seq.sampler.free()  # its KV stays: the sequence's next request may extend this prompt
        with self._cv:
            del self._running[seq.seq_id]
            self._slots.give_back(seq.seq_id)
        stats = seq.stats()
        out.append((seq.request.delivery, Chunk(text, reason, stats, error, logprobs=logprobs)))
        self._publish(RequestFinished(
            model=self.model_name, request_id=seq.request.id, session_id=seq.request.session_id,
            api=seq.request.api, finish_reason=reason, prompt_tokens=stats.prompt_tokens,
            completion_tokens=stats.completion_tokens, ttft_s=stats.ttft_s,
            duration_s=stats.duration_s, tokens_per_s=stats.tokens_per_s, error=error,
            cached_tokens=stats.cached_tokens, cancelled_by=seq.request.cancelled_by if reason == "cancelled" else None,
        ))

    def _drop(self, request: Queued, reason: str, error: str | None,
              out: list[tuple[Delivery, Chunk]]) -> None:
        """End a request that never ran (cancelled while queued, or the model went away)."""
        request.sampler.free()
        waited = time.perf_counter() - request.submitted
        stats = RequestStats(len(request.tokens), 0, waited, None, waited)
        out.append((request.delivery, Chunk("", reason, stats, error)))
        self._publish(RequestFinished(
            model=self.model_name, request_id=request.id, session_id=request.session_id, api=request.api,
            finish_reason=reason, prompt_tokens=stats.prompt_tokens, completion_tokens=0, ttft_s=None,
            duration_s=waited, tokens_per_s=None, error=error,
            cancelled_by=request.cancelled_by if reason == "cancelled" else None,
        ))

    def _finish_all(self, reason: str, error: str) -> None:
        out: list[tuple[Delivery, Chunk]] = []
        with self._cv:
            for seq in list(self._running.values()):
                self._end(seq, reason, out, error=error)
            while self._pending:
                self._drop(self._pending.popleft(), reason, error, out)
        self._deliver(out)

    @staticmethod
    def _deliver(out: list[tuple[Delivery, Chunk]]) -> None:
        """One hop per consumer loop per step, however many streams it reads."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Delivery, Chunk]]] = {}
        for delivery, chunk in out:
            by_loop.setdefault(delivery.loop, []).append((delivery, chunk))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # the consumer's loop is closed: nobody is listening
                pass

    def _publish(self, event: RequestStarted | RequestFinished) -> None:
        if self.bus is not None:
            self.bus.publish(event)


def _put_all(items: list[tuple[Delivery, Chunk]]) -> None:
    for delivery, chunk in items:
        delivery.queue.put_nowait(chunk)
