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
import json
import math
import os
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit

import httpx

from corral.backend.config import parse_duration

from .bench_measure import Load, Monitor, Row, columns, footer, header, is_local, render, summarize
from .bench_traffic import SCENARIOS, Call, Outcome, Workload, error_message, send

DEFAULT_SCENARIOS = "short_chat=5,long_prompt=1,stream=3,embeddings=1"
DEFAULT_LEVELS = "1,2,4,8,16,32"
WARMUP_TIMEOUT_S = 600.0  # the first request may load the model from disk
PROBE_WORDS = 16  # the long-prompt probe: short enough for any context, long enough to measure



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
        raise BenchError(f"{what}: HTTP {response.status_code}: {error_message(response)}")


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
