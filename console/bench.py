"""`corral bench URL`: a bounded load test of a running OpenAI-compatible server.

The method is the one an operator needs before trusting a box with traffic: closed-loop
clients at progressive concurrency steps (1, 2, 4, ...), a weighted mix of what real clients
send (short chats, long prompts, streams, embeddings), and the host watched while it runs
(queue depth from /api/ps, CPU and RAM). One table row per step; `--duration` turns it into a
soak at one level with a row per interval; `--json` keeps every figure for machines.

Every run ends by itself: a step stops starting requests after `--requests` or
`--step-seconds`, whichever comes first, and each request is bounded by `--timeout`; a soak
stops after `--duration`. Ctrl+C ends the run at once, keeping the rows measured so far.

Only httpx and corral's light data modules are imported (never llama_cpp or textual), so the
command starts fast and can run on a machine without the model stack.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import math
import os
import random
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, TextIO
from urllib.parse import urlsplit

import httpx

from corral.backend.config import parse_duration
from corral.backend.remote import sse_events
from corral.backend.snapshot import percentile

SCENARIOS = ("short_chat", "long_prompt", "stream", "embeddings")
DEFAULT_SCENARIOS = "short_chat=5,long_prompt=1,stream=3,embeddings=1"
DEFAULT_LEVELS = "1,2,4,8,16,32"
SAMPLE_INTERVAL_S = 0.5  # /api/ps at ~2 Hz: enough to catch a queue peak, light on the server
MAX_RETRY_AFTER_S = 1.0  # a refused client backs off, but never long enough to idle a step
WARMUP_TIMEOUT_S = 600.0  # the first request may load the model from disk
PROBE_WORDS = 16  # the long-prompt probe: short enough for any context, long enough to measure

_WORDS = ("the old map showed a long road through green hills to a small town by the sea where "
          "people made bread and boats every day and children ran to the water when the sun came "
          "up over the quiet harbour while birds sang in tall trees near the market square").split()
_QUESTIONS = ("name three colours of the sky", "what is a good name for a small dog",
              "say hello in two languages", "list four kinds of fruit", "what do bees make",
              "give a word that rhymes with tree", "how many days are in a week", "name a large river")

Verdict = Literal["ok", "refused", "error"]


class BenchError(Exception):
    """Bad input or a server the run cannot start against: one line for the operator, exit 2."""


# -- settings --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """What a run was asked to do; everything but the key is written into the JSON report."""

    url: str
    model: str | None
    api_key: str | None
    levels: tuple[int, ...]
    requests: int | None  # per step; None: max(16, 4 x concurrency)
    step_seconds: float
    scenarios: dict[str, float]
    seed: int
    max_tokens: int
    long_prompt_tokens: int
    ignore_eos: bool
    response_cache: bool
    timeout_s: float
    duration_s: float | None  # soak mode when set
    concurrency: int | None  # the soak's level; None: the highest of `levels`
    report_every_s: float
    json_path: str | None

    @property
    def soak_level(self) -> int:
        return self.concurrency or max(self.levels)

    def step_requests(self, concurrency: int) -> int:
        """Enough requests that every worker sends several, so percentiles mean something."""
        return self.requests if self.requests is not None else max(16, 4 * concurrency)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        del data["api_key"], data["json_path"]
        data["api_key_set"] = bool(self.api_key)
        return data


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def _duration(text: str) -> float:
    try:
        seconds = parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if not math.isfinite(seconds) or seconds <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive duration such as '30s', '5m' or '2h'")
    return seconds


def _levels(text: str) -> tuple[int, ...]:
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise argparse.ArgumentTypeError("give at least one concurrency level, e.g. 1,2,4")
    levels = tuple(_positive_int(p) for p in parts)
    if max(levels) > 1024:
        raise argparse.ArgumentTypeError(f"{max(levels)} clients is more than this tool opens (1024 at most)")
    return levels


def _scenarios(text: str) -> dict[str, float]:
    """'short_chat=5,stream=3' → weights; an unnamed scenario gets weight 0 (not sent)."""
    weights = dict.fromkeys(SCENARIOS, 0.0)
    for part in (p.strip() for p in text.split(",") if p.strip()):
        name, sep, value = part.partition("=")
        name = name.strip()
        if name not in weights:
            raise argparse.ArgumentTypeError(f"unknown scenario {name!r}; choose from {', '.join(SCENARIOS)}")
        try:
            weight = float(value) if sep else 1.0
        except ValueError:
            raise argparse.ArgumentTypeError(f"{part!r}: the weight must be a number") from None
        if not math.isfinite(weight) or weight < 0:
            raise argparse.ArgumentTypeError(f"{part!r}: the weight must be 0 or more")
        weights[name] = weight
    if not any(weights.values()):
        raise argparse.ArgumentTypeError("give at least one scenario a weight above 0")
    return weights


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `corral bench`, for the top-level CLI's subparser or a parser of its own."""
    parser.add_argument("url", metavar="URL", help="the server, e.g. http://127.0.0.1:8377")
    parser.add_argument("--model", help="model to load-test (default: the first one /v1/models lists)")
    parser.add_argument("--api-key", help="the server's key (default: $CORRAL_API_KEY)")
    parser.add_argument("--levels", type=_levels, default=_levels(DEFAULT_LEVELS),
                        help=f"concurrency steps, comma-separated (default: {DEFAULT_LEVELS})")
    parser.add_argument("--requests", type=_positive_int,
                        help="requests per step (default: 4 x concurrency, at least 16)")
    parser.add_argument("--step-seconds", type=_duration, default=60.0, metavar="DURATION",
                        help="no new request starts after this long in a step (default: 60s)")
    parser.add_argument("--scenarios", type=_scenarios, default=_scenarios(DEFAULT_SCENARIOS),
                        help=f"weights of the request mix (default: {DEFAULT_SCENARIOS})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the scenario choice (default: 0)")
    parser.add_argument("--max-tokens", type=_positive_int, default=64,
                        help="tokens to generate per request (default: 64)")
    parser.add_argument("--long-prompt-tokens", type=_positive_int, default=1024,
                        help="prompt length of long_prompt requests, capped at half the model's context "
                             "(default: 1024)")
    parser.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                        help="generate all --max-tokens even past end-of-text, so every request costs the "
                             "same (default: on)")
    parser.add_argument("--response-cache", action=argparse.BooleanOptionalAction, default=False,
                        help="let corral answer repeated requests from its response cache (default: off, "
                             "each request sends \"cache\": false so every one is decoded)")
    parser.add_argument("--timeout", type=_duration, default=120.0, metavar="DURATION",
                        help="per request, queue wait included (default: 120s)")
    parser.add_argument("--duration", type=_duration, metavar="DURATION",
                        help="soak mode: one level (--concurrency, else the highest of --levels) for this "
                             "long, e.g. 2h")
    parser.add_argument("--concurrency", type=_positive_int, help="the soak's level")
    parser.add_argument("--report-every", type=_duration, default=60.0, metavar="DURATION",
                        help="soak mode: a table row per interval (default: 1m)")
    parser.add_argument("--json", metavar="FILE", help="write the settings and every row as JSON ('-': stdout)")


def settings_from(args: argparse.Namespace) -> Settings:
    """Validate what argparse cannot: the URL's shape and where the JSON report will go."""
    url = args.url.strip().rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise BenchError(f"URL must look like http://HOST:PORT (got {args.url!r})")
    if args.json and args.json != "-" and not Path(args.json).expanduser().parent.is_dir():
        raise BenchError(f"--json {args.json}: the folder {Path(args.json).expanduser().parent} does not exist")
    return Settings(url=url, model=args.model, api_key=args.api_key or os.environ.get("CORRAL_API_KEY") or None,
                    levels=args.levels, requests=args.requests, step_seconds=args.step_seconds,
                    scenarios=args.scenarios, seed=args.seed, max_tokens=args.max_tokens,
                    long_prompt_tokens=args.long_prompt_tokens, ignore_eos=args.ignore_eos,
                    response_cache=args.response_cache, timeout_s=args.timeout, duration_s=args.duration, concurrency=args.concurrency,
                    report_every_s=args.report_every, json_path=args.json)


# -- the requests ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    """One HTTP request of one scenario."""

    scenario: str
    path: str
    body: dict[str, Any]
    stream: bool = False


@dataclass
class Workload:
    """Builds the requests: which scenario comes k-th is drawn from a seeded RNG, so a rerun
    with the same seed sends the same mix in the same order; every prompt is unique to its
    request so a server's prefix cache cannot turn the load test into a cache test."""

    model: str
    weights: dict[str, float]
    max_tokens: int
    ignore_eos: bool
    response_cache: bool = False  # off: every step repeats the same requests, and hits would not decode
    long_words: int = 256

    def picker(self, seed: str) -> Callable[[int], Call]:
        """The k-th request of one step (or soak); `seed` names the step so steps differ."""
        rng = random.Random(seed)
        names = [n for n in SCENARIOS if self.weights.get(n)]
        weights = [self.weights[n] for n in names]
        return lambda k: self.call(rng.choices(names, weights)[0], k)

    def call(self, scenario: str, k: int) -> Call:
        generation = {"model": self.model, "max_tokens": self.max_tokens, "temperature": 0}
        if self.ignore_eos:
            generation["ignore_eos"] = True
        if not self.response_cache:
            generation["cache"] = False
        if scenario == "short_chat":
            return Call(scenario, "/v1/chat/completions", {**generation, "messages": self._question(k)})
        if scenario == "stream":
            return Call(scenario, "/v1/chat/completions",
                        {**generation, "messages": self._question(k), "stream": True,
                         "stream_options": {"include_usage": True}}, stream=True)
        if scenario == "long_prompt":
            return Call(scenario, "/v1/completions", {**generation, "prompt": self.text(k, self.long_words)})
        if scenario == "embeddings":
            return Call(scenario, "/v1/embeddings", {"model": self.model, "input": self.text(k, 12)})
        raise ValueError(f"unknown scenario {scenario!r}")

    @staticmethod
    def _question(k: int) -> list[dict[str, str]]:
        return [{"role": "user", "content": f"Request {k}: {_QUESTIONS[k % len(_QUESTIONS)]}?"}]

    @staticmethod
    def text(k: int, words: int) -> str:
        """`words` common words in an order of k's own (a different opening for nearly every k)."""
        return " ".join(random.Random(k).choices(_WORDS, k=words))


@dataclass(frozen=True)
class Outcome:
    """What one request came to, as the client saw it."""

    scenario: str
    status: Verdict
    latency_s: float
    ttft_s: float | None = None  # streams only: until the first text arrived
    tokens: int = 0  # generated tokens (embeddings: 0)
    error: str | None = None  # the class: "http 500", "timeout", "connection", "stream error", ...
    detail: str | None = None  # the server's message or the exception, shortened
    retry_after_s: float | None = None
    prompt_tokens: int | None = None


def _message(response: httpx.Response) -> str:
    """The server's error message (OpenAI's error shape), else the start of the body."""
    try:
        error = response.json().get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
    except (ValueError, AttributeError):
        pass
    return response.text[:200] or response.reason_phrase


def _retry_after(response: httpx.Response) -> float | None:
    try:
        return max(0.0, float(response.headers.get("retry-after", "")))
    except ValueError:
        return None


def _refusal_or_error(call: Call, response: httpx.Response, started: float) -> Outcome:
    """A non-2xx answer: 429 is the server protecting itself (refused), the rest are errors."""
    latency = time.perf_counter() - started
    if response.status_code == 429:
        return Outcome(call.scenario, "refused", latency, detail=_message(response),
                       retry_after_s=_retry_after(response))
    return Outcome(call.scenario, "error", latency, error=f"http {response.status_code}",
                   detail=_message(response)[:200])


def _usage(data: dict[str, Any], key: str) -> int | None:
    usage = data.get("usage")
    value = usage.get(key) if isinstance(usage, dict) else None
    return int(value) if isinstance(value, (int, float)) else None


async def _whole(client: httpx.AsyncClient, call: Call, started: float) -> Outcome:
    response = await client.post(call.path, json=call.body)
    if response.status_code >= 300:
        return _refusal_or_error(call, response, started)
    data = response.json()
    latency = time.perf_counter() - started
    return Outcome(call.scenario, "ok", latency, tokens=_usage(data, "completion_tokens") or 0,
                   prompt_tokens=_usage(data, "prompt_tokens"))


async def _streamed(client: httpx.AsyncClient, call: Call, started: float) -> Outcome:
    """Read an SSE stream to its end: TTFT is the first chunk carrying text, tokens come from the
    usage on the last chunk (or the count of text chunks when a server sends no usage)."""
    ttft: float | None = None
    pieces = 0
    tokens: int | None = None
    async with client.stream("POST", call.path, json=call.body) as response:
        if response.status_code >= 300:
            await response.aread()
            return _refusal_or_error(call, response, started)
        async for _, _, data in sse_events(response):
            if data.strip() == "[DONE]":
                break
            chunk = json.loads(data)
            error = chunk.get("error")
            if error:
                detail = error.get("message", error) if isinstance(error, dict) else error
                return Outcome(call.scenario, "error", time.perf_counter() - started, ttft, pieces,
                               error="stream error", detail=str(detail)[:200])
            for choice in chunk.get("choices") or []:
                text = (choice.get("delta") or {}).get("content") or choice.get("text")
                if text:
                    pieces += 1
                    if ttft is None:
                        ttft = time.perf_counter() - started
            tokens = _usage(chunk, "completion_tokens") or tokens
    return Outcome(call.scenario, "ok", time.perf_counter() - started, ttft,
                   tokens if tokens is not None else pieces)


async def send(client: httpx.AsyncClient, call: Call, timeout: float) -> Outcome:
    """Send one request and classify what happened; a load test reports failures, it never
    stops at them, so every exception becomes an error Outcome with its class."""
    started = time.perf_counter()

    def failed(kind: str, exc: BaseException) -> Outcome:
        text = str(exc).strip() or type(exc).__name__
        return Outcome(call.scenario, "error", time.perf_counter() - started, error=kind, detail=text[:200])

    try:
        async with asyncio.timeout(timeout):
            if call.stream:
                return await _streamed(client, call, started)
            return await _whole(client, call, started)
    except (TimeoutError, httpx.TimeoutException) as exc:
        return failed("timeout", exc if str(exc) else TimeoutError(f"no complete answer in {timeout:g} s"))
    except httpx.TransportError as exc:
        return failed("connection", exc)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:  # a body that is not the JSON expected
        return failed("bad response", exc)


# -- watching the host -------------------------------------------------------------------------


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


@dataclass
class Target:
    """What preflight found out about the server before any load is sent."""

    model: str
    ps: dict[str, Any] | None  # /api/ps, or None when the server has none
    long_words: int
    long_prompt_tokens: int | None  # what the server counted for a long prompt, when it says


async def _get_json(client: httpx.AsyncClient, path: str, url: str) -> httpx.Response:
    try:
        return await client.get(path, timeout=10.0)
    except httpx.TransportError as exc:
        reason = str(exc).strip() or type(exc).__name__
        raise BenchError(f"cannot reach {url}: {reason}") from None


def _check_answer(response: httpx.Response, what: str) -> None:
    if response.status_code == 401:
        raise BenchError(f"{what}: the server refused the API key (HTTP 401); pass --api-key or set CORRAL_API_KEY")
    if response.status_code >= 300:
        raise BenchError(f"{what}: HTTP {response.status_code}: {_message(response)}")


async def choose_model(client: httpx.AsyncClient, settings: Settings) -> str:
    """--model if the server lists it, else the first model /v1/models lists."""
    response = await _get_json(client, "/v1/models", settings.url)
    _check_answer(response, "GET /v1/models")
    try:
        names = [m["id"] for m in response.json()["data"]]
    except (ValueError, KeyError, TypeError):
        raise BenchError(f"{settings.url}/v1/models did not answer as an OpenAI-compatible server does") from None
    if settings.model is None:
        if not names:
            raise BenchError(f"{settings.url} lists no usable models")
        return names[0]
    if settings.model not in names:
        raise BenchError(f"unknown model {settings.model!r}; the server lists: {', '.join(names) or 'none'}")
    return settings.model


async def read_ps(client: httpx.AsyncClient, settings: Settings) -> dict[str, Any] | None:
    """corral's /api/ps, or None from a server without it (llama-server, an OpenAI proxy)."""
    response = await _get_json(client, "/api/ps", settings.url)
    if response.status_code in (404, 405):
        return None
    _check_answer(response, "GET /api/ps")
    try:
        data = response.json()
    except ValueError:
        return None
    return data if isinstance(data, dict) and isinstance(data.get("models"), list) else None


def _long_prompt_budget(settings: Settings, model: str, ps: dict[str, Any] | None) -> int:
    """Tokens for a long prompt: as asked, but at most half the model's context less the answer,
    so several long prompts fit the shared KV cache at once."""
    entry = next((m for m in (ps or {}).get("models", []) if m.get("name") == model), {})
    n_ctx = entry.get("n_ctx")
    if isinstance(n_ctx, int) and n_ctx > 0:
        return max(8, min(settings.long_prompt_tokens, n_ctx // 2 - settings.max_tokens))
    return settings.long_prompt_tokens


async def _warm(client: httpx.AsyncClient, settings: Settings, call: Call, what: str) -> Outcome:
    """One warm-up request; a failure stops the run with the server's reason. Its timeout is
    generous because the first request may load the model from disk."""
    outcome = await send(client, call, max(settings.timeout_s, WARMUP_TIMEOUT_S))
    if outcome.status != "ok":
        raise BenchError(f"warm-up {what} failed ({outcome.error or 'refused: HTTP 429'}): {outcome.detail}")
    return outcome


async def warm_up(client: httpx.AsyncClient, settings: Settings, workload: Workload,
                  ps: dict[str, Any] | None) -> int | None:
    """One request of every scenario in the mix, before any step: the first loads the model
    (so step 1 does not time a load), and a scenario the server cannot serve stops the run
    with its reason instead of filling every row with errors.

    Long prompts are sized here: a short probe tells how many tokens this model's tokenizer
    makes of a word, and one full-length request proves the size fits the context. Returns
    the prompt tokens the server counted for it (None without long prompts in the mix)."""
    for scenario in (n for n in SCENARIOS if settings.scenarios.get(n) and n != "long_prompt"):
        await _warm(client, settings, workload.call(scenario, -1), f"{scenario} request")
    if not settings.scenarios.get("long_prompt"):
        return None
    template = workload.call("long_prompt", -1)
    probe = Call("long_prompt", template.path, {**template.body, "prompt": workload.text(-1, PROBE_WORDS)})
    measured = (await _warm(client, settings, probe, "long_prompt probe")).prompt_tokens
    if measured:  # a server that reports no usage keeps the default length
        workload.long_words = max(PROBE_WORDS, int(_long_prompt_budget(settings, workload.model, ps)
                                                   * PROBE_WORDS / measured))
    full = await _warm(client, settings, workload.call("long_prompt", -2),
                       f"long_prompt request of {workload.long_words} words")
    return full.prompt_tokens


class Report:
    """Rows as they come: printed at once (a long soak shows progress), kept for the JSON."""

    def __init__(self, settings: Settings, out: TextIO) -> None:
        self.settings = settings
        self.out = out
        self.rows: list[Row] = []
        self.interrupted = False
        self.target: Target | None = None
        self.monitor: Monitor | None = None
        self.started = time.time()

    def say(self, line: str) -> None:
        print(line, file=self.out, flush=True)

    def add(self, row: Row) -> None:
        if not self.rows:
            self.say(header(self.soak))
        self.rows.append(row)
        self.say(render(row, self.soak))

    @property
    def soak(self) -> bool:
        return self.settings.duration_s is not None

    def finish(self) -> None:
        if not self.rows:
            self.say("no rows: the run was interrupted before the first step ended")
        for line in footer(self.rows, self.monitor):
            self.say(line)

    def to_dict(self) -> dict[str, Any]:
        target = self.target
        return {
            "settings": self.settings.to_dict(),
            "model": target.model if target else None,
            "long_prompt": {"words": target.long_words, "prompt_tokens": target.long_prompt_tokens} if target else None,
            "monitor": {"host": self.monitor.host_source, "queue": self.monitor.queue_source,
                        "samples_missed": self.monitor.misses} if self.monitor else None,
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(self.started)),
            "seconds": round(time.time() - self.started, 1),
            "interrupted": self.interrupted,
            "columns": [title for title, _, _ in columns(self.soak)],
            "rows": [asdict(row) for row in self.rows],
        }


async def run_steps(client: httpx.AsyncClient, workload: Workload, report: Report, monitor: Monitor,
                    interrupt: asyncio.Event) -> None:
    """One step per level, in the order given; a step is one row."""
    s = report.settings
    for level in s.levels:
        load = Load(client, workload.picker(f"{s.seed}:step:{level}"), level, s.step_requests(level),
                    s.step_seconds, s.timeout_s, monitor)
        interrupted = await load.run(interrupt)
        window = await load.cut("step")
        window.interrupted = interrupted
        report.add(summarize(window))
        if interrupted:
            return


async def run_soak(client: httpx.AsyncClient, workload: Workload, report: Report, monitor: Monitor,
                   interrupt: asyncio.Event) -> None:
    """One level for --duration, a row every --report-every, then a row for the whole soak."""
    s = report.settings
    assert s.duration_s is not None
    load = Load(client, workload.picker(f"{s.seed}:soak"), s.soak_level, s.requests, s.duration_s, s.timeout_s,
                monitor)

    async def report_windows() -> None:
        while True:
            await asyncio.sleep(s.report_every_s)
            report.add(summarize(await load.cut("soak", elapsed=True)))

    reporter = asyncio.ensure_future(report_windows())
    try:
        interrupted = await load.run(interrupt)
    finally:
        reporter.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reporter
    last = await load.cut("soak", elapsed=True)
    last.interrupted = interrupted
    if last.outcomes or interrupted:
        report.add(summarize(last))
    total = load.whole("soak total")
    total.interrupted = interrupted
    report.add(summarize(total))


@contextlib.contextmanager
def _ctrl_c_sets(event: asyncio.Event) -> Iterator[None]:
    """Ctrl+C (and SIGTERM) end the run cleanly with the rows so far instead of a traceback."""
    loop = asyncio.get_running_loop()
    installed: dict[int, Any] = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        previous = signal.getsignal(signum)
        if previous == signal.SIG_IGN:  # started as `cmd &` or under nohup: the shell meant it
            continue
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):  # not the main thread
            loop.add_signal_handler(signum, event.set)
            installed[signum] = previous
    try:
        yield
    finally:
        for signum, previous in installed.items():
            loop.remove_signal_handler(signum)
            signal.signal(signum, previous)  # asyncio.run's own Ctrl+C handling, for the rest


async def bench(settings: Settings, report: Report) -> None:
    """Preflight (server, key, model, every scenario once), then the steps or the soak."""
    headers = {"authorization": f"Bearer {settings.api_key}"} if settings.api_key else {}
    top = settings.soak_level if settings.duration_s is not None else max(settings.levels)
    limits = httpx.Limits(max_connections=top + 4, max_keepalive_connections=top + 4)
    interrupt = asyncio.Event()
    async with httpx.AsyncClient(base_url=settings.url, headers=headers, limits=limits,
                                 timeout=httpx.Timeout(settings.timeout_s, connect=10.0)) as client:
        model = await choose_model(client, settings)
        ps = await read_ps(client, settings)
        workload = Workload(model, settings.scenarios, settings.max_tokens, settings.ignore_eos,
                            settings.response_cache)
        report.say(f"corral bench: {model} at {settings.url}; warming up (this loads the model if needed)")
        prompt_tokens = await warm_up(client, settings, workload, ps)
        report.target = Target(model, ps, workload.long_words, prompt_tokens)
        monitor = report.monitor = Monitor(client, model, ps, is_local(settings.url))
        sampler = asyncio.ensure_future(monitor.run())
        try:
            with _ctrl_c_sets(interrupt):
                run = run_soak if settings.duration_s is not None else run_steps
                await run(client, workload, report, monitor, interrupt)
        finally:
            sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampler
        report.interrupted = interrupt.is_set()


def write_json(report: Report, path: str) -> None:
    text = json.dumps(report.to_dict(), indent=2)
    if path == "-":
        print(text, flush=True)
    else:
        Path(path).expanduser().write_text(text + "\n")


def run(args: argparse.Namespace) -> int:
    """Run a parsed `corral bench`: 0 when it ran to the end, 130 when Ctrl+C cut it short,
    2 for bad input or a server it could not start against (one line on stderr, no traceback)."""
    try:
        settings = settings_from(args)
    except BenchError as exc:
        print(f"corral bench: {exc}", file=sys.stderr)
        return 2
    # with --json -, stdout carries only the JSON
    report = Report(settings, sys.stderr if settings.json_path == "-" else sys.stdout)
    try:
        asyncio.run(bench(settings, report))
    except BenchError as exc:
        print(f"corral bench: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before the handlers were installed, or during preflight
        report.interrupted = True
    report.finish()
    if settings.json_path:
        write_json(report, settings.json_path)
    return 130 if report.interrupted else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="corral bench", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
