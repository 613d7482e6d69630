"""Serving benchmark: `corral serve` against llama-server and llama_cpp.server, in one run.

    .venv/bin/python -m tests.benchmarks.serving [--json results.json]

What it does (issue 5, DESIGN.md "Peers for benchmarks"):

1. Builds llama.cpp's `llama-server` once from the llama.cpp source vendored in the sdist of
   the *installed* llama-cpp-python version, and caches it (default ~/.cache/corral-bench,
   or $CORRAL_BENCH_CACHE). Installs llama_cpp.server's extra dependencies (the `server`
   extra minus llama-cpp-python itself, so nothing is rebuilt) when they are missing.
2. Starts the three servers on free 127.0.0.1 ports with the same model (the default gemma
   GGUF), context, threads, batch size and slot count, warms each up, then for every
   concurrency level measures each server in turn (the order rotates per level so slow drift
   does not favour one server): closed-loop streaming /v1/completions, temperature 0,
   ignore-eos, fixed max_tokens. Idle servers stay up between their steps; their CPU use
   while idle is measured and reported.
3. Prints one table (per server and concurrency: aggregate tok/s, TTFT p50/p99, latency
   p50/p99, errors, tokens received vs expected, streams cut short; for the peers, the ratio
   corral/peer of tok/s and of TTFT p50) and the issue's targets, and writes all of it as
   JSON with --json.

Servers are always terminated (their own process groups, SIGTERM then SIGKILL).
Not part of the default test run (pyproject: norecursedirs = tests/benchmarks).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from ..support import free_port, write_config
from .report import (SERVERS, Record, Step, build_ratios, check_targets, fmt, machine_busy_seconds,
                     machine_info, merge_steps, render_table, summarize, text_agreement, write_json)
from .peers import (corral_command, default_model_path, ensure_llama_server, ensure_server_extra,
                    llama_cpp_version, log, version_line)

CORRAL_MODEL = "gemma-3-270m"  # the catalog name of the default model
# A level is a number of streams, and "SxN" is S streams whose prompts are about N tokens long
# (an agent's system prompt with tool schemas, a document): prefill then weighs as much as decode.
DEFAULT_LEVELS = ("1", "2", "4", "8", "16", "4x2000")
# requests per step, closed loop with `concurrency` workers (each step also has a deadline)
DEFAULT_REQUESTS = {"1": 12, "2": 12, "4": 16, "8": 32, "16": 48, "4x2000": 12}
QUICK_REQUESTS = {"1": 2, "2": 2, "4": 4, "8": 8, "16": 16, "4x2000": 4}

# Every request gets its own prompt, the same sequence on every server. No two prompts share a
# prefix beyond BOS and, for 1 in 64 pairs, one opening word: llama-server (and
# llama_cpp.server) reuse the longest cached prefix of *any* earlier request, corral only within
# a session, so prompts such as "Note 17. ..." would hand the peers a third of every prompt
# from cache and the TTFT comparison would measure that cache instead of the engine.
OPENERS = """Yesterday Honestly Apparently Meanwhile Suddenly Frankly Unfortunately Luckily Originally
Eventually Curiously Basically Admittedly Surprisingly Obviously Clearly Interestingly Naturally
Historically Technically Generally Certainly Usually Finally Recently Today Tomorrow Tonight Often
Sometimes Perhaps Indeed Moreover However Besides Therefore Initially Later Previously Lately
Occasionally Typically Ideally Hopefully Sadly Happily Strangely Notably Overall Briefly Seriously
Quietly Slowly Quickly Carefully Gradually Rarely Twice Once Somewhere Everywhere Upstairs Outside
Inside""".split()[:64]
PROMPTS = [
    "The history of the printing press begins",
    "Here is a short story about a lighthouse keeper who",
    "The three most important ideas in thermodynamics are",
    "A recipe for a simple tomato soup: first,",
    "When the train left the station that morning, Maria",
    "The main differences between rivers and canals are",
    "In the year 2050, cities will",
    "To explain photosynthesis to a child, you could say that",
    "The old map showed a path through the mountains and",
    "A good way to learn a new language is",
    "The committee met on Tuesday to discuss",
    "Bees communicate with each other by",
    "The museum's newest exhibit features",
    "After the storm passed, the villagers",
    "The rules of chess say that a knight",
    "Writing clear documentation matters because",
]


# -- servers -----------------------------------------------------------------------------------

@dataclass
class Server:
    name: str
    argv: list[str]
    port: int
    health_path: str
    log_path: Path
    env: dict[str, str] | None = None
    proc: subprocess.Popen[bytes] | None = None
    _log_file: Any = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self._log_file = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=self._log_file,
                                     stderr=subprocess.STDOUT, env=self.env, start_new_session=True)

    def log_tail(self, lines: int = 25) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def wait_ready(self, timeout: float) -> float:
        started = time.perf_counter()
        deadline = started + timeout
        while time.perf_counter() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited (code {self.proc and self.proc.returncode}) "
                                   f"before it was ready:\n{self.log_tail()}")
            try:
                if httpx.get(self.base + self.health_path, timeout=2.0).status_code == 200:
                    return time.perf_counter() - started
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise RuntimeError(f"{self.name} was not ready after {timeout:.0f} s:\n{self.log_tail()}")

    def cpu_seconds(self) -> float:
        """CPU time of the server and its children so far (0 when psutil cannot tell)."""
        try:
            import psutil

            proc = psutil.Process(self.proc.pid)
            total = sum(proc.cpu_times()[:2])
            for child in proc.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    total += sum(child.cpu_times()[:2])
            return total
        except Exception:
            return 0.0

    def rss_bytes(self) -> int:
        try:
            import psutil

            return psutil.Process(self.proc.pid).memory_info().rss
        except Exception:
            return 0

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        try:
            if self.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGTERM)
                try:
                    self.proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    log(f"{self.name} ignored SIGTERM for 20 s; killing it")
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(self.proc.pid, signal.SIGKILL)
                    self.proc.wait(timeout=10)
            else:  # the leader is gone; make sure nothing of its group stays behind
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
            return self.proc.returncode
        finally:
            if self._log_file:
                self._log_file.close()


def make_servers(which: list[str], model: Path, llama_server: Path | None, workdir: Path,
                 slots: int, n_ctx: int, threads: int, n_batch: int,
                 llama_server_extra: tuple[str, ...] = ()) -> list[Server]:
    """`llama_server_extra`: more llama-server arguments, for what corral has without a flag
    (a chat template file that matches corral's, say)."""
    # corral's warm-restart state and saved KV go to the run's own folder: a run must neither
    # restore what an earlier one saved nor leave anything in the user's state folder
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")},
           "XDG_STATE_HOME": str(workdir / "state")}
    servers = []
    for name in which:
        port = free_port()
        if name == "corral":
            config = write_config(workdir / "corral.toml", {
                "include_default_model": True, "preload": [CORRAL_MODEL],
                "defaults": {"n_ctx": n_ctx, "n_parallel": slots, "n_threads": threads, "n_batch": n_batch,
                             "keep_alive": -1, "max_queue": 64}})
            argv = [*corral_command(), "serve", "--host", "127.0.0.1", "--port", str(port),
                    "--config", str(config)]
            servers.append(Server(name, argv, port, "/health", workdir / "corral.log", env))
        elif name == "llama-server":
            assert llama_server is not None
            from corral.backend.weights import cpu_has_amx
            # Same settings as corral's context (backend/engine.py new_context) and defaults:
            # unified KV, full-size SWA cache, flash attention on, n_batch = n_ubatch, same
            # threads/slots; where the CPU has AMX, weights without repacking (weights.cpu_has_amx).
            argv = [str(llama_server), "-m", str(model), "--host", "127.0.0.1", "--port", str(port),
                    "--parallel", str(slots), "--cont-batching", "-c", str(n_ctx),
                    "-t", str(threads), "-tb", str(threads), "-b", str(n_batch), "-ub", str(n_batch),
                    "--kv-unified", "--swa-full", "--flash-attn", "on", "--no-webui",
                    *(["--no-repack"] if cpu_has_amx() else []), *llama_server_extra]
            servers.append(Server(name, argv, port, "/health", workdir / "llama-server.log", env))
        elif name == "llama_cpp.server":
            argv = [sys.executable, "-m", "llama_cpp.server", "--model", str(model),
                    "--n_ctx", str(n_ctx), "--n_threads", str(threads),
                    "--host", "127.0.0.1", "--port", str(port)]
            servers.append(Server(name, argv, port, "/v1/models", workdir / "llama_cpp.server.log", env))
        else:
            raise ValueError(f"unknown server {name!r}; choose from {', '.join(SERVERS)}")
    return servers


# -- load generation ---------------------------------------------------------------------------

def prompt_for(k: int) -> str:
    """Unique for k < 1024: k and k + 64j share the opener, never the sentence (j < 16)."""
    opener = OPENERS[k % len(OPENERS)]
    sentence = PROMPTS[(k // len(OPENERS) + k) % len(PROMPTS)]
    return f"{opener}, {sentence[0].lower()}{sentence[1:]}"


def parse_level(level: str) -> tuple[int, int]:
    """(streams, prompt tokens; 0 for the short prompts) of a level such as "8" or "4x2000"."""
    streams, _, tokens = level.partition("x")
    return int(streams), int(tokens or 0)


FILLER = """river stone lantern harbour orchard meadow ledger signal copper engine valley market bridge
archive garden winter compass theatre canal quarry beacon cellar tower harvest journal station""".split()


def long_prompt_for(k: int, tokens: int) -> str:
    """prompt_for(k), then numbered notes of about `tokens` tokens (about four characters each),
    different for every k: long prompts that still share nothing beyond their opening word."""
    rng = random.Random(k)
    parts, size = [prompt_for(k)], 0
    while size < tokens * 4:
        words = " ".join(rng.choice(FILLER) for _ in range(rng.randint(6, 12)))
        parts.append(f"Note {len(parts)}: the {words}.")
        size += len(parts[-1]) + 1
    return " ".join(parts)


def payload(k: int, max_tokens: int, model: str, prompt_tokens: int = 0) -> dict[str, Any]:
    # repeat_penalty 1.0 explicitly: llama_cpp.server defaults to 1.1, which is not plain greedy
    prompt = long_prompt_for(k, prompt_tokens) if prompt_tokens else prompt_for(k)
    return {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "repeat_penalty": 1.0, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}


async def one_request(client: httpx.AsyncClient, url: str, body: dict[str, Any],
                      timeout: float, rec: Record | None = None) -> Record:
    """One streaming /v1/completions or /v1/chat/completions request. Pass `rec` to watch its
    progress (`times`) while it runs."""
    rec = rec if rec is not None else Record()
    texts: list[str] = []
    started = rec.started = time.perf_counter()
    last_piece: float | None = None
    try:
        async with asyncio.timeout(timeout):
            async with client.stream("POST", url, json=body) as resp:
                if resp.status_code != 200:
                    content = (await resp.aread()).decode(errors="replace")
                    rec.error = f"HTTP {resp.status_code}: {content[:300]}"
                    return rec
                async for line in resp.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    now = time.perf_counter()
                    obj = json.loads(data)
                    if obj.get("error"):
                        rec.error = f"stream error: {json.dumps(obj['error'])[:300]}"
                    for choice in obj.get("choices") or []:
                        text = choice.get("text") or (choice.get("delta") or {}).get("content") or ""
                        if text:
                            rec.pieces += 1
                            rec.times.append(now)
                            texts.append(text)
                            if rec.ttft is None:
                                rec.ttft = now - started
                            if last_piece is not None:
                                rec.max_gap = max(rec.max_gap, now - last_piece)
                            last_piece = now
                        if choice.get("finish_reason"):
                            rec.finish_reason = choice["finish_reason"]
                    usage = obj.get("usage")
                    if usage:
                        rec.usage = usage
                    if usage and usage.get("completion_tokens") is not None:
                        rec.usage_tokens = int(usage["completion_tokens"])
                    if obj.get("timings"):
                        rec.timings = obj["timings"]
        rec.latency = time.perf_counter() - started
        rec.ok = rec.error is None
    except TimeoutError:
        rec.error = f"timed out after {timeout:.0f} s ({rec.pieces} pieces received)"
    except Exception as exc:  # a benchmark reports failures, it does not stop at them
        rec.error = f"{type(exc).__name__}: {exc}"[:300]
    rec.text = "".join(texts)
    return rec


async def run_step(server: Server, concurrency: int, n_requests: int, first_k: int, max_tokens: int,
                   deadline_s: float, request_timeout: float, prompt_tokens: int = 0) -> Step:
    url = server.base + "/v1/completions"
    model = CORRAL_MODEL if server.name == "corral" else "default"
    limits = httpx.Limits(max_connections=concurrency + 8, max_keepalive_connections=concurrency + 8)
    records: list[Record] = []
    counter = itertools.count()
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(request_timeout, connect=10)) as client:
        started = time.perf_counter()

        async def worker() -> None:
            while True:
                i = next(counter)
                if i >= n_requests or time.perf_counter() - started > deadline_s:
                    return
                records.append(await one_request(client, url, payload(first_k + i, max_tokens, model, prompt_tokens),
                                                 request_timeout))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - started
    return Step(server.name, concurrency, len(records), wall, records, prompt_tokens)


def start_all(stack: contextlib.ExitStack, servers: list[Server], startup: dict[str, Any],
              keep_logs: Path | None, log_prefix: str = "") -> None:
    """Start every server; each is stopped when `stack` closes, its exit code noted in
    `startup[name]` and, with `keep_logs`, its log copied there (named `log_prefix` + its name)."""
    for server in servers:
        def _stop(server: Server = server) -> None:
            code = server.stop()
            startup.setdefault(server.name, {})["exit_code"] = code
            if keep_logs:
                keep_logs.mkdir(parents=True, exist_ok=True)
                with contextlib.suppress(OSError):
                    shutil.copy(server.log_path, keep_logs / f"{log_prefix}{server.log_path.name}")
        stack.callback(_stop)
        log(f"starting {server.name}: {' '.join(server.argv)}")
        server.start()


def ready_and_warm(server: Server, slots: int, request_timeout: float) -> dict[str, Any]:
    """Wait for the server, warm it up; its start-up figures."""
    ready = server.wait_ready(timeout=300)
    started = time.perf_counter()
    asyncio.run(warm_up(server, slots, request_timeout))
    return {"ready_s": round(ready, 1), "warmup_s": round(time.perf_counter() - started, 1),
            "rss_bytes_after_warmup": server.rss_bytes()}


async def warm_up(server: Server, slots: int, request_timeout: float) -> None:
    """One short request, then a burst of `slots` short ones (not the benchmark's prompts)."""
    url = server.base + "/v1/completions"
    model = CORRAL_MODEL if server.name == "corral" else "default"
    async with httpx.AsyncClient(timeout=httpx.Timeout(request_timeout, connect=10)) as client:
        body = {"model": model, "prompt": "Warm-up: the weather today is", "max_tokens": 8,
                "temperature": 0, "stream": True, "ignore_eos": True}
        first = await one_request(client, url, body, request_timeout)
        if not first.ok:
            raise RuntimeError(f"{server.name}: warm-up request failed: {first.error}\n{server.log_tail()}")
        burst = await asyncio.gather(*(one_request(
            client, url, {**body, "prompt": f"Warm-up {i}: a list of fruits includes", "max_tokens": 16},
            request_timeout) for i in range(slots)))
        failed = [r.error for r in burst if not r.ok]
        if failed:
            raise RuntimeError(f"{server.name}: {len(failed)} warm-up requests failed: {failed[0]}")


def corral_model_state(server: Server) -> dict[str, Any] | None:
    """Active/queued/in-flight of the default model, waiting up to 3 s for it to settle at zero."""
    state = None
    deadline = time.perf_counter() + 3.0
    while True:
        try:
            data = httpx.get(server.base + "/api/ps", timeout=5).json()
            model = next((m for m in data["models"] if m["name"] == CORRAL_MODEL), None)
            state = model and {k: model.get(k) for k in ("state", "active", "queued", "in_flight", "tokens_per_s")}
        except Exception as exc:
            return {"error": f"{type(exc).__name__}: {exc}"}
        if not state or (state["active"] == 0 and state["queued"] == 0 and state["in_flight"] == 0):
            return state
        if time.perf_counter() > deadline:
            return state
        time.sleep(0.2)


# -- main --------------------------------------------------------------------------------------

def _terminate(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.benchmarks.serving", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="write the table, settings and raw figures here as JSON")
    parser.add_argument("--servers", default=",".join(SERVERS),
                        help=f"comma-separated subset of {','.join(SERVERS)} (default: all)")
    parser.add_argument("--levels", default=",".join(DEFAULT_LEVELS),
                        help="levels: a number of streams, or SxN for S streams of ~N-token prompts "
                             f"(default: {','.join(DEFAULT_LEVELS)})")
    parser.add_argument("--requests", type=int, help="requests per step (default: 12/12/16/32/48 for 1/2/4/8/16, "
                                                     "else 2 x concurrency, at least 8)")
    parser.add_argument("--quick", action="store_true", help="tiny steps, for checking the script itself")
    parser.add_argument("--passes", type=int, default=1,
                        help="sweeps over all levels (orders rotate); figures pool all passes and the "
                             "per-pass spread is shown (default: 1)")
    parser.add_argument("--max-foreign", type=float, default=0.15, metavar="CORES",
                        help="a pass whose step saw more CPU than this (in cores) used by other processes "
                             "is left out of the pooled figures when a cleaner pass exists (default: 0.15)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--step-seconds", type=float, default=40.0,
                        help="no new requests start after this long in a step (default: 40)")
    parser.add_argument("--request-timeout", type=float, default=180.0)
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--n-ctx", type=int, default=16384,
                        help="context of each server, shared by its slots (default 16384: the long level fits)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--n-batch", type=int, default=512)
    parser.add_argument("--cache", type=Path,
                        default=Path(os.environ.get("CORRAL_BENCH_CACHE", "~/.cache/corral-bench")).expanduser())
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 2, help="build parallelism")
    parser.add_argument("--keep-logs", type=Path, help="copy the servers' logs into this folder")
    args = parser.parse_args(argv)

    which = [s.strip() for s in args.servers.split(",") if s.strip()]
    levels = [x.strip() for x in args.levels.split(",") if x.strip()]
    try:
        for level in levels:
            parse_level(level)
    except ValueError:
        parser.error(f"--levels {args.levels!r}: each level is a number of streams or SxN, such as 8 or 4x2000")
    signal.signal(signal.SIGTERM, _terminate)

    version = llama_cpp_version()
    build: dict[str, Any] = {}
    llama_server = None
    if "llama-server" in which:
        llama_server, build = ensure_llama_server(args.cache, version, args.jobs)
        build["version_line"] = version_line(llama_server)
    installed = ensure_server_extra(version) if "llama_cpp.server" in which else []

    model = default_model_path()
    log(f"model: {model}")
    run_started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    startup: dict[str, Any] = {}
    texts: dict[str, list[str]] = {}
    with tempfile.TemporaryDirectory(prefix="corral-bench-") as tmp, contextlib.ExitStack() as stack:
        workdir = Path(tmp)
        servers = make_servers(which, model, llama_server, workdir, args.slots, args.n_ctx, args.threads,
                               args.n_batch)
        start_all(stack, servers, startup, args.keep_logs)
        for server in servers:
            startup.setdefault(server.name, {}).update(ready_and_warm(server, args.slots, args.request_timeout))
            log(f"{server.name} ready ({startup[server.name]['ready_s']:.1f} s) and warmed up on port {server.port}")

        k = 0  # global request index: the same prompt sequence on every server
        steps: dict[tuple[str, int], list[Step]] = {}
        for p in range(args.passes):
            for li, level in enumerate(levels):
                conc, prompt_tokens = parse_level(level)
                table = QUICK_REQUESTS if args.quick else DEFAULT_REQUESTS
                n = args.requests or table.get(level, max(8, 2 * conc))
                shift = (li + p) % len(servers)
                for server in servers[shift:] + servers[:shift]:
                    idle_before = {s.name: s.cpu_seconds() for s in servers if s is not server}
                    cpu_before, client_before = server.cpu_seconds(), time.process_time()
                    busy_before = machine_busy_seconds()
                    step = asyncio.run(run_step(server, conc, n, k, args.max_tokens, args.step_seconds,
                                                args.request_timeout, prompt_tokens))
                    step.server_cpu_s = server.cpu_seconds() - cpu_before
                    step.client_cpu_s = time.process_time() - client_before
                    step.idle_cpu_s = {s.name: s.cpu_seconds() - idle_before[s.name]
                                       for s in servers if s is not server}
                    step.foreign_cpu_s = max(0.0, machine_busy_seconds() - busy_before - step.server_cpu_s
                                             - step.client_cpu_s - sum(step.idle_cpu_s.values()))
                    if server.name == "corral":
                        step.after = corral_model_state(server)
                    if server.proc and server.proc.poll() is not None:
                        log(f"{server.name} DIED during the {level} step (exit {server.proc.returncode}):\n"
                            f"{server.log_tail()}")
                    steps.setdefault((server.name, level), []).append(step)
                    if level == "1" and p == 0:
                        texts[server.name] = [r.text for r in step.records]
                    row = summarize(step, args.max_tokens)
                    log(f"pass {p + 1}/{args.passes} {level:<6} {server.name:<16} {fmt(row['tok_s']):>7} tok/s  "
                        f"TTFT p50 {fmt(row['ttft_p50_ms'], '.0f')} ms  err {row['errors']}  tokens "
                        f"{row['tokens_received']}/{row['tokens_expected']}  short {row['short_streams']}  "
                        f"other processes {row['foreign_cpu_cores']} cores"
                        + (f"  after: {row['after']}" if row["after"] else ""))
                    if row["errors"]:
                        log(f"  errors: {row['error_samples']}")
                k += n
        for (name, _level), parts in steps.items():
            # Other processes on the machine (other users' tests, builds) distort a step badly on
            # a small box: pool only the undisturbed passes when there are any, and say so.
            clean = [p for p in parts if p.foreign_cpu_s / max(p.wall_s, 1e-9) <= args.max_foreign]
            used = clean or parts
            row = summarize(merge_steps(used), args.max_tokens)
            row["passes"] = [summarize(part, args.max_tokens) for part in parts] if len(parts) > 1 else []
            row["passes_used"] = [i + 1 for i, part in enumerate(parts) if part in used]
            row["disturbed"] = not clean
            row["after"] = [part.after for part in parts] if name == "corral" else None
            rows.append(row)
        for server in servers:
            startup[server.name]["rss_bytes_end"] = server.rss_bytes()
            if server.name == "corral":
                lines = server.log_path.read_text(errors="replace").splitlines()
                startup["corral"]["log_problems"] = [l for l in lines if re.search(
                    r"ERROR|Traceback|Exception|CRITICAL", l)][:20]
    measured_s = time.perf_counter() - run_started

    agreement = text_agreement(texts)
    ratios = build_ratios(rows)
    targets = check_targets(ratios) if "corral" in which else []
    print(render_table(rows, ratios, targets))
    settings = {"model": str(model), "max_tokens": args.max_tokens, "temperature": 0, "ignore_eos": True,
                "slots": args.slots, "n_ctx": args.n_ctx, "threads": args.threads, "n_batch": args.n_batch,
                "levels": levels, "step_seconds": args.step_seconds, "prompt_example": prompt_for(0)}
    for peer, figures in agreement.items():
        print(f"c1 greedy text vs corral: {peer}: {figures['identical']}/{figures['compared']} identical, "
              f"{figures['same_first_32_chars']}/{figures['compared']} share the first 32 characters "
              "(informational: prompt-cache reuse changes how a prompt is batched, and greedy text on a "
              "quantized model follows the batch split; DESIGN.md 'Determinism, honestly')")
    print(f"\nmachine: {machine_info()['cpu']}, {os.cpu_count()} logical CPUs; llama-cpp-python {version}; "
          f"llama-server {build.get('version_line', '-')}; measured in {measured_s:.0f} s")
    if args.json:
        report = {
            "machine": machine_info(), "settings": settings,
            "commands": {s.name: s.argv for s in servers},
            "llama_server_build": build, "installed_for_llama_cpp_server": installed,
            "startup": startup, "results": rows, "ratios": ratios, "targets": targets,
            "table": render_table(rows, ratios, targets), "texts_c1": texts, "text_agreement_c1": agreement,
            "measured_seconds": round(measured_s, 1),
        }
        write_json(args.json, report)
    return 0



if __name__ == "__main__":
    sys.exit(main())
