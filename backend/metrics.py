"""Prometheus metrics for `corral serve`, on a registry private to one app.

Counters and histograms are fed from backend events (one `RequestFinished` per request, so
nothing is counted per token) by a task the server runs; requests refused before they ran
(queue full, unknown model, bad parameters) never produce an event, so the handler counts
those with their HTTP status. Gauges that describe the present (queue depth, active slots,
memory, state) are not kept up to date at all: each scrape takes the latest `Status` and a
collector turns it into metric families, so a gauge can never go stale or outlive its model.

A private `CollectorRegistry` per app keeps two apps in one process (tests, a notebook)
from colliding in prometheus-client's global registry.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from .events import Dropped, Event, ModelLoaded, Notice, RequestFinished, RequestStarted, StateChanged
from .kinds import EMBEDDING, FINISH_REASONS, RERANK
from .respcache import CacheStats
from .snapshot import Status

log = logging.getLogger("corral.server")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # the text format generate_latest writes
UNKNOWN_MODEL = "(unknown)"  # label for requests naming a model the catalog does not know
EVICTIONS = ("budget", "max_loaded", "ttl", "operator", "config")  # unloads counted as evictions; not
# a shutdown, nor an engine's failure (that is a load's end, not a choice)

# Local decode ranges from a few ms (tiny models, GPU) to minutes (long CPU generations).
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
_TTFT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class Metrics:
    """Every metric of one server; `observe` takes events, `render` produces the exposition."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "corral_requests", "Requests by model and outcome: the finish reason "
            "(stop, length, cancelled, error; embeddings, rerank) of requests that ran, or the HTTP status of those "
            "refused before running (429, 400, 404, ...), and the API it came in by (openai, anthropic, "
            "responses, ollama; console and python for corral's own console and scripts)", ["model", "status", "api"], registry=r)
        self.prompt_tokens = Counter("corral_prompt_tokens", "Prompt tokens processed", ["model"], registry=r)
        self.cached_tokens = Counter("corral_prompt_tokens_cached", "Prompt tokens whose KV was reused "
                                     "from a slot's previous request instead of evaluated", ["model"], registry=r)
        self.generated_tokens = Counter("corral_generated_tokens", "Tokens generated", ["model"], registry=r)
        self.ttft = Histogram("corral_time_to_first_token_seconds", "Time from admission to the first token",
                              ["model"], buckets=_TTFT_BUCKETS, registry=r)
        self.latency = Histogram("corral_request_duration_seconds", "Time from admission to the last token",
                                 ["model"], buckets=_LATENCY_BUCKETS, registry=r)
        self.embedding_latency = Histogram("corral_embedding_duration_seconds", "Time to embed one "
                                           "request's inputs, model acquisition included", ["model"],
                                           buckets=_LATENCY_BUCKETS, registry=r)
        self.rerank_latency = Histogram("corral_rerank_duration_seconds", "Time to score one request's "
                                        "documents with a reranker, model acquisition included", ["model"],
                                        buckets=_LATENCY_BUCKETS, registry=r)
        self._pooled_latency = {FINISH_REASONS[EMBEDDING]: self.embedding_latency,
                                FINISH_REASONS[RERANK]: self.rerank_latency}
        self.queue_wait = Histogram("corral_queue_wait_seconds", "Time a request waited for a free slot",
                                    ["model"], buckets=_LATENCY_BUCKETS, registry=r)
        self.loads = Counter("corral_model_loads", "Completed model loads", ["model"], registry=r)
        self.evictions = Counter("corral_evictions", "Models unloaded by reason: budget (RAM or VRAM room "
                                 "for another load), max_loaded, ttl (idle past keep_alive), operator, config",
                                 ["model", "reason"], registry=r)
        self.load_failures = Counter("corral_load_failures", "Loads that failed or were refused, by reason: "
                                     "budget (no room), file (unusable file), gpu_memory, llama (llama.cpp "
                                     "refused)", ["model", "reason"], registry=r)
        self.load_seconds = Gauge("corral_model_load_seconds", "Duration of the model's latest load",
                                  ["model"], registry=r)
        self.dropped_events = Counter("corral_metrics_dropped_events", "Backend events the metrics "
                                      "reader was too slow to receive (counts may be low by this many)",
                                      registry=r)
        self.http_requests = Counter("corral_http_requests", "HTTP requests by route template and status",
                                     ["method", "route", "status"], registry=r)
        self._status = _StatusCollector()
        r.register(self._status)

    # -- feeding ---------------------------------------------------------------------------

    def observe(self, event: Event) -> None:
        """Account for one backend event (called for every event; most are not about metrics)."""
        model = event.model or UNKNOWN_MODEL
        if isinstance(event, RequestFinished):
            self.requests.labels(model, event.finish_reason, event.api or "python").inc()
            if event.cached:  # replayed from the response cache: no tokens processed, no model timing
                return
            self.prompt_tokens.labels(model).inc(event.prompt_tokens)
            self.cached_tokens.labels(model).inc(event.cached_tokens)
            pooled = self._pooled_latency.get(event.finish_reason)
            if pooled is not None:  # no decode: its time is not a generation's latency
                pooled.labels(model).observe(event.duration_s)
                return
            self.generated_tokens.labels(model).inc(event.completion_tokens)
            if event.ttft_s is not None:
                self.ttft.labels(model).observe(event.ttft_s)
            self.latency.labels(model).observe(event.duration_s)
        elif isinstance(event, RequestStarted):
            self.queue_wait.labels(model).observe(event.queue_wait_s)
        elif isinstance(event, ModelLoaded):
            self.loads.labels(model).inc()
            self.load_seconds.labels(model).set(event.seconds)
        elif isinstance(event, StateChanged) and event.cause and event.new == "unloading" and event.cause in EVICTIONS:
            self.evictions.labels(model, event.cause).inc()
        elif isinstance(event, StateChanged) and event.cause and event.new == "failed":
            self.load_failures.labels(model, event.cause).inc()
        elif isinstance(event, Notice) and event.cause == "budget":
            self.load_failures.labels(model, "budget").inc()
        elif isinstance(event, Dropped):
            self.dropped_events.inc(event.count)

    async def consume(self, events: AsyncIterator[Event]) -> None:
        """Observe events until the stream ends (backend closed) or the task is cancelled."""
        try:
            async for event in events:
                try:
                    self.observe(event)
                except Exception:  # a metrics bug must not stop the accounting of later events
                    log.exception("metrics: could not account for %s event", event.type)
        finally:
            close = getattr(events, "aclose", None)
            if close is not None:  # unsubscribe, so the bus stops delivering to a dead reader
                await close()

    def rejected(self, model: str, status: int, api: str) -> None:
        """A generation request refused before it ran (it produces no backend event)."""
        self.requests.labels(model, str(status), api).inc()

    def unfinished(self, model: str, finish_reason: str, api: str) -> None:
        """A request that ended without running (cancelled while queued): no event says so."""
        self.requests.labels(model, finish_reason, api).inc()

    def track_cache(self, stats: Callable[[], CacheStats]) -> None:
        """Export the response cache's own counts at each scrape (it counts under its lock, so
        nothing here can drift from it)."""
        self.registry.register(_CacheCollector(stats))

    def http(self, method: str, route: str, status: int) -> None:
        # Any token can be a method: label only the known ones, so clients cannot grow /metrics.
        shown = method if method in HTTP_METHODS else "other"
        self.http_requests.labels(shown, route, str(status)).inc()

    # -- scraping --------------------------------------------------------------------------

    def render(self, status: Status | None) -> bytes:
        """The exposition text, with present-state gauges taken from `status` (None: omitted)."""
        self._status.status = status
        return generate_latest(self.registry)


class _CacheCollector(Collector):
    """The response cache's lookups, evictions and size, read from it at scrape time."""

    def __init__(self, stats: Callable[[], CacheStats]) -> None:
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        stats = self.stats()
        lookups = CounterMetricFamily("corral_cache_lookups", "Response cache lookups of deterministic "
                                      "requests by model and result: hit, stale (served once more while it "
                                      "is recomputed) or miss", labels=["model", "result"])
        for (model, result), count in sorted(stats.lookups.items()):
            lookups.add_metric([model, result], count)
        evictions = CounterMetricFamily("corral_cache_evictions", "Answers dropped from the response cache, "
                                        "by reason: capacity, expired, invalidated (model changed), cleared",
                                        labels=["reason"])
        for reason, count in sorted(stats.evictions.items()):
            evictions.add_metric([reason], count)
        yield lookups
        yield evictions
        yield from _gauges([
            ("corral_cache_entries", "Answers held by the response cache", stats.entries),
            ("corral_cache_bytes", "UTF-8 bytes of answer text held by the response cache", stats.bytes),
            ("corral_cache_max_entries", "The response cache's entry limit (cache.max_entries)", stats.max_entries),
            ("corral_cache_max_bytes", "The response cache's size limit (cache.max_bytes)", stats.max_bytes),
        ])


def _gauges(rows: list[tuple[str, str, float]]) -> Iterator[Metric]:
    """One label-free gauge per (name, help, value) row."""
    for name, doc, value in rows:
        yield GaugeMetricFamily(name, doc, value=value)


class _StatusCollector(Collector):
    """Gauges computed from the latest `Status` at scrape time, so none outlives its model."""

    def __init__(self) -> None:
        self.status: Status | None = None

    def collect(self) -> Iterator[Metric]:
        status = self.status
        if status is None:
            return
        loaded = GaugeMetricFamily("corral_loaded_models", "Models loaded (ready or busy)")
        loaded.add_metric([], sum(1 for m in status.models if m.loaded))
        yield loaded
        families = {
            "state": GaugeMetricFamily("corral_model_state", "1 for the model's current lifecycle state",
                                       labels=["model", "state"]),
            "queued": GaugeMetricFamily("corral_queue_depth", "Requests waiting for a slot", labels=["model"]),
            "active": GaugeMetricFamily("corral_active_slots", "Slots generating now", labels=["model"]),
            "slots": GaugeMetricFamily("corral_slots", "Parallel slots (n_parallel)", labels=["model"]),
            "in_flight": GaugeMetricFamily("corral_in_flight_requests", "Requests holding the model "
                                           "(running, queued or being set up)", labels=["model"]),
            "tps": GaugeMetricFamily("corral_tokens_per_second", "Recent decode rate", labels=["model"]),
            "pinned": GaugeMetricFamily("corral_model_pinned", "1 when the model is pinned", labels=["model"]),
            "estimate": GaugeMetricFamily("corral_model_memory_estimate_bytes", "Estimated RAM the model "
                                          "needs (weights, KV cache, compute buffers)", labels=["model"]),
            "measured": GaugeMetricFamily("corral_model_memory_measured_bytes", "Resident memory the "
                                          "model's load added, measured", labels=["model"]),
            "vram": GaugeMetricFamily("corral_model_vram_measured_bytes", "VRAM the model's load took, "
                                      "per GPU", labels=["model", "gpu"]),
        }
        for m in status.models:
            families["state"].add_metric([m.name, m.state], 1)
            families["queued"].add_metric([m.name], m.queued)
            families["active"].add_metric([m.name], m.active)
            families["slots"].add_metric([m.name], m.n_parallel)
            families["in_flight"].add_metric([m.name], m.in_flight)
            families["tps"].add_metric([m.name], m.tokens_per_s)
            families["pinned"].add_metric([m.name], 1 if m.pinned else 0)
            if m.estimate_bytes is not None:
                families["estimate"].add_metric([m.name], m.estimate_bytes)
            if m.measured_bytes is not None and m.loaded:
                families["measured"].add_metric([m.name], m.measured_bytes)
            for gpu, used in (m.measured_vram or {}).items():
                if m.loaded:
                    families["vram"].add_metric([m.name, str(gpu)], used)
        yield from families.values()
        host = status.host
        yield from _gauges([
            ("corral_ram_budget_bytes", "RAM budget for loaded models", status.ram_budget),
            ("corral_ram_reserved_bytes", "RAM counted against the budget (measured, else estimated)",
             status.ram_reserved),
            ("corral_max_loaded_models", "Most models loaded at once (budgets.max_loaded)", status.max_loaded),
            ("corral_host_cpu_percent", "Host CPU use", host.cpu_percent),
            ("corral_host_ram_used_bytes", "Host RAM in use", host.ram_used),
            ("corral_host_ram_total_bytes", "Host RAM", host.ram_total),
            ("corral_process_rss_bytes", "Resident memory of this process", host.process_rss),
        ])
        if host.gpus:
            used = GaugeMetricFamily("corral_gpu_memory_used_bytes", "GPU memory in use", labels=["gpu"])
            total = GaugeMetricFamily("corral_gpu_memory_total_bytes", "GPU memory", labels=["gpu"])
            for gpu in host.gpus:
                if gpu.mem_used is not None:
                    used.add_metric([str(gpu.index)], gpu.mem_used)
                if gpu.mem_total is not None:
                    total.add_metric([str(gpu.index)], gpu.mem_total)
            yield used
            yield total
