"""What `corral bench` measures and prints: the server's queue and the host sampled while a
step runs, the closed-loop clients of one step, and a table row per step or soak interval."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx

from corral.backend.snapshot import percentile

from .bench_traffic import Call, Outcome, send


SAMPLE_INTERVAL_S = 0.5  # /api/ps at ~2 Hz: enough to catch a queue peak, light on the server
MAX_RETRY_AFTER_S = 1.0  # a refused client backs off, but never long enough to idle a step


@dataclass(frozen=True)
class HostSample:
    """One look at the server: its queue for the model, and the host's CPU and memory."""

    queued: int | None = None
    active: int | None = None
    cpu_percent: float | None = None
    ram_used: int | None = None
    ram_total: int | None = None
    server_rss: int | None = None


def is_local(url: str) -> bool:
    """A loopback URL: the server shares this machine, so local psutil figures describe it."""
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Monitor:
    """Samples /api/ps (queue depth, active slots, the server host's CPU and RAM) at ~2 Hz.

    Corral's /api/ps carries host stats, so those are used wherever they are: they describe the
    server's machine even when it is remote. Another server (no /api/ps) is watched through
    local psutil when its URL is loopback, and not at all otherwise; `host_source` and
    `queue_source` say which, and the report prints them."""

    def __init__(self, client: httpx.AsyncClient, model: str, ps: dict[str, Any] | None, local: bool) -> None:
        self.client = client
        self.model = model
        self.queue_source = "server /api/ps" if ps is not None else None
        server_host = ps is not None and isinstance(ps.get("host"), dict) and "cpu_percent" in ps["host"]
        self.host_source = "server /api/ps" if server_host else ("local psutil" if local else None)
        self.samples: list[HostSample] = []
        self.misses = 0  # samples that failed (a server too busy to answer /api/ps in time)
        if self.host_source == "local psutil":
            import psutil

            psutil.cpu_percent(interval=None)  # the first call only starts psutil's interval

    async def run(self) -> None:
        """Sample until cancelled."""
        while True:
            next_at = time.perf_counter() + SAMPLE_INTERVAL_S
            await self.record()
            await asyncio.sleep(max(0.0, next_at - time.perf_counter()))

    async def record(self) -> None:
        """Take one sample; one that fails is counted, never fatal."""
        try:
            self.samples.append(await self.sample())
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            self.misses += 1

    async def sample(self) -> HostSample:
        values: dict[str, Any] = {}
        if self.queue_source is not None:
            response = await self.client.get("/api/ps", timeout=2.0)
            response.raise_for_status()
            data = response.json()
            model = next((m for m in data.get("models", []) if m.get("name") == self.model), {})
            values.update(queued=model.get("queued"), active=model.get("active"))
            if self.host_source == "server /api/ps":
                host = data["host"]
                values.update(cpu_percent=host.get("cpu_percent"), ram_used=host.get("ram_used"),
                              ram_total=host.get("ram_total"), server_rss=host.get("process_rss"))
        if self.host_source == "local psutil":
            import psutil

            memory = psutil.virtual_memory()
            values.update(cpu_percent=psutil.cpu_percent(interval=None), ram_used=memory.used,
                          ram_total=memory.total)
        return HostSample(**values)


# -- running load ------------------------------------------------------------------------------


@dataclass
class Window:
    """The outcomes that finished, and the host samples taken, between two cuts of a run."""

    concurrency: int
    wall_s: float
    outcomes: list[Outcome]
    samples: list[HostSample]
    elapsed_s: float | None = None  # soak rows: time since the soak began
    label: str = "step"  # step | soak | soak total
    interrupted: bool = False


class Load:
    """`concurrency` closed-loop clients: each sends a request, waits for its answer, then sends
    the next, until `max_requests` have started or `seconds` have passed (in-flight requests
    then finish, each bounded by `timeout`). A 429 pauses its client for the server's
    Retry-After, capped at a second, so refusals slow the load without stalling the step."""

    def __init__(self, client: httpx.AsyncClient, next_call: Callable[[int], Call], concurrency: int,
                 max_requests: int | None, seconds: float, timeout: float, monitor: Monitor) -> None:
        self.client = client
        self.next_call = next_call
        self.concurrency = concurrency
        self.max_requests = max_requests
        self.timeout = timeout
        self.monitor = monitor
        self.started = time.perf_counter()
        self.deadline = self.started + seconds
        self.outcomes: list[Outcome] = []
        self._issued = 0
        self._cut_at = self.started
        self._cut_outcomes = 0
        self._first_sample = self._cut_samples = len(monitor.samples)

    def _claim(self) -> int | None:
        """The index of the next request, or None when the step's budget or time is spent."""
        if time.perf_counter() >= self.deadline:
            return None
        if self.max_requests is not None and self._issued >= self.max_requests:
            return None
        self._issued += 1
        return self._issued - 1

    async def _client(self) -> None:
        while (k := self._claim()) is not None:
            outcome = await send(self.client, self.next_call(k), self.timeout)
            self.outcomes.append(outcome)
            if outcome.status == "refused":
                pause = min(outcome.retry_after_s or MAX_RETRY_AFTER_S, MAX_RETRY_AFTER_S)
                await asyncio.sleep(max(0.0, min(pause, self.deadline - time.perf_counter())))

    async def run(self, interrupt: asyncio.Event) -> bool:
        """Run the clients to the end; True when `interrupt` (Ctrl+C) cut them short."""
        clients = asyncio.gather(*(self._client() for _ in range(self.concurrency)))
        stopper = asyncio.ensure_future(interrupt.wait())
        try:
            done, _ = await asyncio.wait({clients, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()
            if not clients.done():  # interrupted: requests in flight are abandoned, not counted
                clients.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await clients
        if clients in done:
            clients.result()  # a bug in this module shows here rather than as a quiet zero
            return False
        return True

    async def cut(self, label: str, elapsed: bool = False) -> Window:
        """The window since the previous cut; the next one starts now. A host sample closes
        every window (after its clock stops), so a step shorter than the sampling interval
        still has CPU and RAM: the server's CPU% covers the time since its previous sample."""
        now = time.perf_counter()
        await self.monitor.record()
        window = Window(self.concurrency, now - self._cut_at, self.outcomes[self._cut_outcomes:],
                        self.monitor.samples[self._cut_samples:],
                        elapsed_s=now - self.started if elapsed else None, label=label)
        self._cut_at, self._cut_outcomes, self._cut_samples = now, len(self.outcomes), len(self.monitor.samples)
        return window

    def whole(self, label: str) -> Window:
        """Everything since the start (a soak's total row)."""
        now = time.perf_counter()
        return Window(self.concurrency, now - self.started, list(self.outcomes),
                      self.monitor.samples[self._first_sample:], elapsed_s=now - self.started, label=label)


# -- figures -----------------------------------------------------------------------------------


@dataclass
class Row:
    """One line of the table (and of the JSON report)."""

    label: str
    concurrency: int
    elapsed_s: float | None
    wall_s: float
    requests: int  # finished in this window: ok + errors + refused
    ok: int
    errors: int
    refused: int
    error_rate: float  # errors / requests (refusals are counted apart)
    qps: float  # successful requests per second
    tokens: int
    tok_s: float  # generated tokens per second
    latency_p50_ms: float | None  # every successful request, whatever its scenario
    latency_p99_ms: float | None
    ttft_p50_ms: float | None  # streams only
    ttft_p99_ms: float | None
    peak_queue: int | None
    peak_active: int | None
    cpu_percent: float | None  # mean over the window
    cpu_percent_peak: float | None
    ram_used_peak: int | None
    ram_total: int | None
    server_rss_peak: int | None
    error_kinds: dict[str, int] = field(default_factory=dict)
    error_samples: list[str] = field(default_factory=list)
    scenarios: dict[str, dict[str, Any]] = field(default_factory=dict)
    interrupted: bool = False


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def _peak(values: Iterable[Any]) -> Any:
    present = [v for v in values if v is not None]
    return max(present) if present else None


def _by_scenario(outcomes: list[Outcome]) -> dict[str, dict[str, Any]]:
    figures = {}
    for name in sorted({o.scenario for o in outcomes}):
        mine = [o for o in outcomes if o.scenario == name]
        ok = [o.latency_s for o in mine if o.status == "ok"]
        figures[name] = {"requests": len(mine), "ok": len(ok),
                         "errors": sum(o.status == "error" for o in mine),
                         "refused": sum(o.status == "refused" for o in mine),
                         "latency_p50_ms": _ms(percentile(ok, 50)), "latency_p99_ms": _ms(percentile(ok, 99))}
    return figures


def summarize(window: Window) -> Row:
    """The window's figures. Percentiles are nearest-rank (each one a latency that happened)."""
    outcomes, samples = window.outcomes, window.samples
    ok = [o for o in outcomes if o.status == "ok"]
    errors = [o for o in outcomes if o.status == "error"]
    refused = sum(o.status == "refused" for o in outcomes)
    latencies = [o.latency_s for o in ok]
    ttfts = [o.ttft_s for o in ok if o.ttft_s is not None]
    tokens = sum(o.tokens for o in ok)
    wall = max(window.wall_s, 1e-9)
    cpu = [s.cpu_percent for s in samples if s.cpu_percent is not None]
    return Row(
        label=window.label, concurrency=window.concurrency,
        elapsed_s=None if window.elapsed_s is None else round(window.elapsed_s, 1),
        wall_s=round(window.wall_s, 3), requests=len(outcomes), ok=len(ok), errors=len(errors), refused=refused,
        error_rate=round(len(errors) / len(outcomes), 4) if outcomes else 0.0,
        qps=round(len(ok) / wall, 3), tokens=tokens, tok_s=round(tokens / wall, 2),
        latency_p50_ms=_ms(percentile(latencies, 50)), latency_p99_ms=_ms(percentile(latencies, 99)),
        ttft_p50_ms=_ms(percentile(ttfts, 50)), ttft_p99_ms=_ms(percentile(ttfts, 99)),
        peak_queue=_peak(s.queued for s in samples), peak_active=_peak(s.active for s in samples),
        cpu_percent=round(sum(cpu) / len(cpu), 1) if cpu else None, cpu_percent_peak=_peak(cpu),
        ram_used_peak=_peak(s.ram_used for s in samples), ram_total=_peak(s.ram_total for s in samples),
        server_rss_peak=_peak(s.server_rss for s in samples),
        error_kinds=dict(Counter(o.error or "?" for o in errors).most_common()),
        error_samples=sorted({f"{o.error}: {o.detail}" for o in errors})[:5],
        scenarios=_by_scenario(outcomes), interrupted=window.interrupted)


# -- the table ---------------------------------------------------------------------------------


def _num(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _gib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**30:.1f}G"


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    whole = int(round(seconds))
    return f"{whole // 3600}:{whole // 60 % 60:02d}:{whole % 60:02d}"


# (header, width, cell): every cell is one word, so `awk` can read the table too
COLUMNS: tuple[tuple[str, int, Callable[[Row], str]], ...] = (
    ("conc", 4, lambda r: str(r.concurrency)),
    ("reqs", 5, lambda r: str(r.requests)),
    ("QPS", 7, lambda r: _num(r.qps, ".2f")),
    ("tok/s", 7, lambda r: _num(r.tok_s, ".1f")),
    ("lat_p50", 8, lambda r: _num(r.latency_p50_ms, ".0f")),
    ("lat_p99", 8, lambda r: _num(r.latency_p99_ms, ".0f")),
    ("TTFT_p50", 8, lambda r: _num(r.ttft_p50_ms, ".0f")),
    ("TTFT_p99", 8, lambda r: _num(r.ttft_p99_ms, ".0f")),
    ("err%", 5, lambda r: _num(100 * r.error_rate, ".1f")),
    ("refused", 7, lambda r: str(r.refused)),
    ("peak_q", 6, lambda r: _num(r.peak_queue, "d")),
    ("CPU%", 5, lambda r: _num(r.cpu_percent, ".0f")),
    ("RAM", 6, lambda r: _gib(r.ram_used_peak)),
)
SOAK_COLUMN: tuple[str, int, Callable[[Row], str]] = (
    "elapsed", 8, lambda r: "total" if r.label == "soak total" else _clock(r.elapsed_s))


def columns(soak: bool) -> tuple[tuple[str, int, Callable[[Row], str]], ...]:
    return (SOAK_COLUMN, *COLUMNS) if soak else COLUMNS


def header(soak: bool) -> str:
    return "  ".join(title.rjust(width) for title, width, _ in columns(soak))


def render(row: Row, soak: bool) -> str:
    line = "  ".join(cell(row).rjust(width) for _, width, cell in columns(soak))
    return line + ("  (interrupted)" if row.interrupted else "")


def footer(rows: list[Row], monitor: Monitor | None) -> list[str]:
    """What the figures mean and where they came from, then any errors, one line per row."""
    lines = ["times in ms; QPS: successful requests/s; tok/s: generated tokens/s over the step's wall time; "
             "lat: all successful requests; TTFT: streaming requests; err%: errors/requests (429s are "
             "counted as refused, apart)"]
    if monitor is not None:
        host = monitor.host_source or "not measured (no /api/ps and the server is not on this machine)"
        queue = monitor.queue_source or "not measured (the server has no /api/ps)"
        lines.append(f"CPU% (mean) and RAM (peak used): {host}; peak_q: {queue}"
                     + (f"; {monitor.misses} samples missed" if monitor.misses else ""))
    for row in rows:
        if row.errors:
            kinds = ", ".join(f"{n} x {kind}" for kind, n in row.error_kinds.items())
            where = _clock(row.elapsed_s) if row.label != "step" else f"c{row.concurrency}"
            lines.append(f"errors at {where}: {kinds}; e.g. {row.error_samples[0]}")
    return lines


# -- a run -------------------------------------------------------------------------------------
