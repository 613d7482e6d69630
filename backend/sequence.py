"""One request inside the engine: where its chunks go, what it asked for, and, once it holds a
llama.cpp sequence, its progress through the prompt and the answer: tokens to text, stop strings
held back until they can no longer begin, and its figures."""

from __future__ import annotations

import asyncio
import codecs
import time
from dataclasses import dataclass, field

from .generation import Chunk, Decoding, RequestStats
from .inflight import QUEUED, RUNNING, RequestInfo
from .samplers import TokenSampler
from .weights import ModelWeights


class Delivery:
    """Where a request's chunks go: an asyncio queue on the consumer's loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[Chunk] = asyncio.Queue()


@dataclass
class Queued:
    """A request as the engine holds it, from `submit` until it ends."""

    id: str
    session_id: str | None
    tokens: list[int]
    decoding: Decoding
    delivery: Delivery
    sampler: TokenSampler
    api: str | None = None  # which API it came in by, for the events
    submitted: float = field(default_factory=time.perf_counter)
    model: str = ""  # the engine's model name, for RequestInfo
    cancelled: bool = False
    cancelled_by: str | None = None  # who cancelled it by id (inflight.CANCELLERS); None: its client left
    awaits: tuple[Sequence, int] | None = None  # a running sequence still evaluating this prompt's prefix

    def info(self, position: int, now: float) -> RequestInfo:
        """This request waiting at `position` (1: next) in its engine's queue."""
        return RequestInfo(self.id, self.model, self.api, self.session_id, QUEUED, now - self.submitted,
                           len(self.tokens), 0, None, position)


class Sequence:
    """A request occupying one llama.cpp sequence id while it runs."""

    def __init__(self, request: Queued, seq_id: int, weights: ModelWeights, n_ctx: int, cached: int) -> None:
        self.request = request
        self.seq_id = seq_id
        self.cached = cached  # prompt tokens whose KV an earlier request left in this sequence
        self.n_past = cached  # tokens already in the KV cache
        self.prompt_pos = cached  # prompt tokens already in the KV cache or sent to decode
        self.last_token: int | None = None
        self.generated = 0
        self.started = time.perf_counter()
        self.first_token_at: float | None = None
        self.text = ""
        self.emitted = 0  # chars of self.text already sent
        self.delimited = False  # ended by an end-of-generation or stop token, not part of the answer
        self.stop_sequence: str | None = None  # the stop string that ended it
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._weights = weights
        self.max_tokens = min(request.decoding.params.max_tokens, n_ctx - len(request.tokens))
        self.sampler = request.sampler

    @property
    def prefilling(self) -> bool:
        return self.prompt_pos < len(self.request.tokens)

    def add_token(self, token: int) -> tuple[str, str | None]:
        """Append a sampled token; returns (text to emit now, finish reason or None)."""
        decoding = self.request.decoding
        params = decoding.params
        self.generated += 1
        self.last_token = token
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        eog = self._weights.is_eog(token)
        # A grammar allows end-of-generation only where its text is complete: that ends the
        # answer even with ignore_eos, which would otherwise leave nothing allowed but more EOG.
        if (eog and self.sampler.held) or (not params.ignore_eos and (eog or token in decoding.stop_tokens)):
            self.delimited = True
            return self._flush(), "stop"
        self.text += self._decoder.decode(self._weights.piece(token, special=token in decoding.shown_tokens))
        if params.stop:
            hit, self.stop_sequence = _find_stop(self.text, params.stop,
                                                 max(0, self.emitted - max(map(len, params.stop))))
            if hit is not None:  # bytes still in the decoder belong after the stop: drop them
                self.text = self.text[:hit]
                out, self.emitted = self.text[self.emitted:], hit
                return out, "stop"
        if self.generated >= self.max_tokens:
            return self._flush(), "length"
        safe = len(self.text) - _held_back(self.text, params.stop)
        out = self.text[self.emitted:safe]
        self.emitted = safe
        return out, None

    def _flush(self) -> str:
        self.text += self._decoder.decode(b"", final=True)
        out = self.text[self.emitted:]
        self.emitted = len(self.text)
        return out

    def info(self, now: float) -> RequestInfo:
        """This request as it runs; read from another thread, so only plain counters."""
        request, stats = self.request, self.stats(now)
        return RequestInfo(request.id, request.model, request.api, request.session_id, RUNNING, stats.duration_s,
                           stats.prompt_tokens, stats.completion_tokens, stats.tokens_per_s, None)

    def stats(self, now: float | None = None) -> RequestStats:
        now = time.perf_counter() if now is None else now
        return RequestStats(
            prompt_tokens=len(self.request.tokens),
            completion_tokens=self.generated,
            queue_wait_s=self.started - self.request.submitted,
            ttft_s=None if self.first_token_at is None else self.first_token_at - self.request.submitted,
            duration_s=now - self.request.submitted,
            cached_tokens=self.cached,
            stop_sequence=self.stop_sequence,
        )


def _find_stop(text: str, stops: tuple[str, ...], start: int) -> tuple[int | None, str | None]:
    """Where the first stop string in `text` (from `start`) begins, and which one it is."""
    hits = [(i, s) for s in stops if (i := text.find(s, start)) >= 0]
    return min(hits) if hits else (None, None)


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest tail of `text` that could still grow into a stop string."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if stop.startswith(text[-n:]):
                longest = n
                break
    return longest
