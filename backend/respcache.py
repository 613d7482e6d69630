"""The response cache: exact-match answers to deterministic requests, replayed without decoding.

A request is deterministic when it is greedy (temperature 0) or samples from a fixed seed;
only those are looked up or stored, because replaying anything else would hand every caller
the same "random" answer. The key hashes everything that decides the text: the model's name
and fingerprint (its config entry, its effective settings, and its file's path, size and
mtime), the kind of request (chat or completion), the prompt or the messages, and the
sampling parameters that matter. A config change or a replaced file therefore changes the
key, so an old answer can never be served for a changed model; the first request that sees
the new fingerprint also drops the model's old entries, so they do not linger until evicted.

Entries live at most `ttl` (hard expiry: a miss), are least-recently-used beyond
`max_entries` or `max_bytes`, and after `soft_ttl` are stale: a stale answer is served once
more while the caller recomputes it in the background, and the fresh answer replaces it.
Requests that arrive while that refresh runs decode for themselves rather than wait on it.

Thread-safe: callers look up from their own event loops and refreshes store from the
backend's, so every access takes one lock, and nothing slow happens under it.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import AsyncGenerator, Callable, Mapping
from contextlib import aclosing
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from .config import CacheSettings, Settings
from .events import EventBus, Notice
from .generation import Chunk, RequestStats, SamplingParams, ToolCallDelta, whole_calls
from .toolparse import fresh_call_id

HIT, STALE, MISS, BYPASS = "hit", "stale", "miss", "bypass"
STORABLE = frozenset({"stop", "length", "tool_calls"})  # a cancelled or failed request's text is not an answer
# What a greedy request's text depends on: the engine's greedy sampler ignores temperature,
# top_p, top_k, min_p and seed, so requests differing only in those share one entry.
GREEDY_FIELDS = ("max_tokens", "repeat_penalty", "dry_multiplier", "dry_base", "dry_allowed_length",
                 "dry_penalty_last_n", "stop", "ignore_eos")


@dataclass(frozen=True)
class CacheKey:
    """Where an answer is filed: the digest, plus the model and fingerprint it was made under."""

    model: str
    fingerprint: str
    digest: str


def model_fingerprint(settings: Settings, name: str, path: Path, store: Mapping[str, Any] | None = None) -> str:
    """What makes `name`'s answers what they are: its `[[models]]` entry, its effective settings
    (`store`: its store's defaults among them) and its file. Computed per request from the
    settings of the moment, so a reloaded config takes effect at once. Blocking: it stats the
    file."""
    entry = settings.model_config_for(name)
    try:
        st = path.stat()
        file: list[Any] = [str(path), st.st_size, st.st_mtime_ns]
    except OSError:  # the load will report it; the key just must not match an older file
        file = [str(path), None, None]
    return _digest({"entry": entry.model_dump(mode="json") if entry is not None else None,
                    "effective": settings.effective(name, store).model_dump(mode="json"), "file": file})


def request_key(model: str, fingerprint: str, kind: str, payload: str | list[dict[str, Any]],
                params: SamplingParams) -> CacheKey:
    """The key of one request; `payload` is the prompt or the validated messages. Blocking for
    a long prompt: it hashes all of it."""
    sampling = asdict(params)
    if params.greedy:
        sampling = {name: sampling[name] for name in GREEDY_FIELDS}
    return CacheKey(model, fingerprint, _digest([kind, model, fingerprint, payload, sampling]))


def _digest(value: Any) -> str:
    # repr for values JSON has no form for (a message field a template might read): at worst a miss
    text = json.dumps(value, ensure_ascii=False, sort_keys=True, separators=(",", ":"), default=repr)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True)
class Answer:
    """A finished request's whole output, as the cache keeps it."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    reasoning: str = ""
    tool_calls: tuple[ToolCallDelta, ...] = ()  # one whole call each: id, name and all its arguments
    stop_sequence: str | None = None

    def chunk(self, verdict: str, elapsed_s: float) -> Chunk:
        """The answer replayed as one final chunk; its timings are the replay's own."""
        stats = RequestStats(self.prompt_tokens, self.completion_tokens, queue_wait_s=0.0, ttft_s=elapsed_s,
                             duration_s=elapsed_s, cached_tokens=self.prompt_tokens, cached=True,
                             stop_sequence=self.stop_sequence)
        calls = tuple(replace(call, id=fresh_call_id(call.id or "")) for call in self.tool_calls)
        return Chunk(self.text, self.finish_reason, stats, cache=verdict, reasoning=self.reasoning,
                     tool_calls=calls)


@dataclass(frozen=True)
class Lookup:
    """The cache's verdict on one request, and the answer to replay (hit or stale)."""

    verdict: str
    answer: Answer | None = None


@dataclass
class _Entry:
    key: CacheKey
    answer: Answer
    stored_at: float
    size: int
    stale_served: bool = False


@dataclass(frozen=True)
class CacheStats:
    """A snapshot for /metrics: lookups by (model, verdict) and evictions by reason are counts
    since start; entries past ttl stay counted in `entries` until looked up or evicted."""

    entries: int
    bytes: int
    max_entries: int
    max_bytes: int
    lookups: dict[tuple[str, str], int]
    evictions: dict[str, int]


class ResponseCache:
    """An LRU of answers with hard and soft expiry; see the module docstring."""

    def __init__(self, settings: CacheSettings, *, clock: Callable[[], float] = time.monotonic,
                 bus: EventBus | None = None) -> None:
        self._settings = settings
        self._clock = clock
        self._bus = bus
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._bytes = 0
        self._fingerprints: dict[str, str] = {}  # model → the fingerprint its entries were made under
        self._lookups: Counter[tuple[str, str]] = Counter()
        self._evictions: Counter[str] = Counter()

    @property
    def enabled(self) -> bool:
        return self._settings.enabled

    def configure(self, settings: CacheSettings) -> None:
        """Apply `[cache]` settings of a reloaded config: new limits trim at once, and a
        disabled cache lets go of its answers. Cheap when nothing changed (called per request)."""
        if settings is self._settings:
            return
        with self._lock:
            self._settings = settings
            if not settings.enabled:
                self._drop(lambda entry: True, "cleared")
            self._trim()

    def lookup(self, key: CacheKey) -> Lookup:
        """Hit, stale (serve it, and recompute it in the background) or miss."""
        with self._lock:
            dropped = self._follow(key)
            verdict, answer = self._find(key.digest)
            self._lookups[(key.model, verdict)] += 1
        self._announce(key.model, dropped)
        return Lookup(verdict, answer)

    def store(self, key: CacheKey, answer: Answer) -> bool:
        """Keep `answer` under `key`, replacing what was there; False when it is not kept (the
        cache is off, the answer alone exceeds max_bytes, or its model changed meanwhile)."""
        size = sum(len(part.encode("utf-8", "surrogatepass")) for part in
                   (answer.text, answer.reasoning, *(call.arguments for call in answer.tool_calls)))
        with self._lock:
            settings = self._settings
            if not settings.enabled or size > settings.max_bytes or self._fingerprints.get(key.model) != key.fingerprint:
                return False
            if key.digest in self._entries:
                self._remove(key.digest)
            self._entries[key.digest] = _Entry(key, answer, self._clock(), size)
            self._bytes += size
            self._trim()
        return True

    def invalidate(self, model: str) -> int:
        """Drop every answer of `model` (its config changed); returns how many."""
        with self._lock:
            dropped = self._drop(lambda entry: entry.key.model == model, "invalidated")
        self._announce(model, dropped)
        return dropped

    def clear(self) -> int:
        """Drop every answer; returns how many."""
        with self._lock:
            return self._drop(lambda entry: True, "cleared")

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(len(self._entries), self._bytes, self._settings.max_entries,
                              self._settings.max_bytes, dict(self._lookups), dict(self._evictions))

    # -- under the lock ----------------------------------------------------------------------

    def _follow(self, key: CacheKey) -> int:
        """Record the model's fingerprint; when it changed, its old answers go (returns how many)."""
        known = self._fingerprints.get(key.model)
        self._fingerprints[key.model] = key.fingerprint
        if known is None or known == key.fingerprint:
            return 0
        return self._drop(lambda entry: entry.key.model == key.model, "invalidated")

    def _find(self, digest: str) -> tuple[str, Answer | None]:
        entry = self._entries.get(digest)
        if entry is None:
            return MISS, None
        age = self._clock() - entry.stored_at
        hard, soft = self._settings.hard_seconds, self._settings.soft_seconds
        if hard is not None and age >= hard:
            self._remove(digest, "expired")
            return MISS, None
        if soft is not None and age >= soft:
            if entry.stale_served:  # its one stale serve is spent; a refresh is on its way
                return MISS, None
            entry.stale_served = True
            verdict = STALE
        else:
            verdict = HIT
        self._entries.move_to_end(digest)
        return verdict, entry.answer

    def _trim(self) -> None:
        """Evict least-recently-used answers until both limits hold."""
        settings = self._settings
        while self._entries and (len(self._entries) > settings.max_entries or self._bytes > settings.max_bytes):
            self._remove(next(iter(self._entries)), "capacity")

    def _drop(self, which: Callable[[_Entry], bool], reason: str) -> int:
        doomed = [digest for digest, entry in self._entries.items() if which(entry)]
        for digest in doomed:
            self._remove(digest, reason)
        return len(doomed)

    def _remove(self, digest: str, reason: str | None = None) -> None:
        """Remove one entry; `reason` counts it as an eviction (None: it is being replaced)."""
        entry = self._entries.pop(digest)
        self._bytes -= entry.size
        if reason is not None:
            self._evictions[reason] += 1

    def _announce(self, model: str, dropped: int) -> None:
        """One notice per invalidation (never per request): the operator sees why answers went."""
        if dropped and self._bus is not None:
            self._bus.publish(Notice(model=model, level="info", message=f"response cache: dropped {dropped} "
                                     f"answer(s) of {model}: its configuration or file changed"))


async def relay(stream: AsyncGenerator[Chunk, None], verdict: str,
                keep: Callable[[Answer], object] | None = None) -> AsyncGenerator[Chunk, None]:
    """Pass a decoded stream through: its first chunk says `verdict`, and with `keep` the whole
    answer is handed over before the final chunk goes out, when the request finished normally
    (so a consumer that stops at the final chunk cannot lose it)."""
    texts: list[str] = []
    thoughts: list[str] = []
    calls: list[ToolCallDelta] = []  # the pieces; whole_calls joins them
    first = True
    async with aclosing(stream) as chunks:
        async for chunk in chunks:
            if first:
                chunk, first = replace(chunk, cache=verdict), False
            if keep is not None:
                texts.append(chunk.text)
                thoughts.append(chunk.reasoning)
                calls.extend(chunk.tool_calls)
                if chunk.finish_reason in STORABLE and chunk.stats is not None:
                    keep(Answer("".join(texts), chunk.finish_reason, chunk.stats.prompt_tokens,
                                chunk.stats.completion_tokens, "".join(thoughts), whole_calls(calls),
                                chunk.stats.stop_sequence))
            yield chunk
