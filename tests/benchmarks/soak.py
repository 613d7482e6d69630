"""Soak: `corral serve` under `corral bench`'s mixed load at twice its slots, for a long time.

    .venv/bin/python -m tests.benchmarks.soak                      # 30 minutes (issue 8)
    .venv/bin/python -m tests.benchmarks.soak --duration 2m        # checks the script itself

What a user needs to trust a server for a day, measured over the run: every request it
accepted is answered (failed must be 0), the ones it could not take are refused with a 429
rather than a timeout, latency stays bounded, and the process neither grows (RSS) nor leaks
descriptors (open fds), both read at the start (after warm-up) and at the end; and its peak
RSS (VmHWM) stays within the memory estimate of its loaded models plus what the process held
listening with no model loaded (issue 18: the estimate holds under load).

The server is a real `corral serve` on a free 127.0.0.1 port with the default model
(gemma-3-270m), `n_parallel` slots and a small queue, so the 2x load exercises queueing and
refusal both; its state file lives in a temporary folder, so a user's state is never touched.
The load is `corral bench URL --duration D --concurrency 2*slots`, run as a library, with its
default scenario mix (short chats, long prompts, streams, embeddings). Exit status 1 when any
request failed or the peak went past the estimate, so the script can gate a release.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil

from corral.console import bench
from tests.benchmarks.peers import corral_command
from tests.benchmarks.report import proc_status_bytes
from tests.support import write_config

MODEL = "gemma-3-270m"
START_TIMEOUT_S = 600.0  # the first start assembles the default model's GGUF


@dataclass(frozen=True)
class ProcessFigures:
    """The server process's resident memory and open file descriptors at one moment."""

    rss: int
    fds: int

    @classmethod
    def of(cls, pid: int) -> ProcessFigures:
        process = psutil.Process(pid)
        return cls(process.memory_info().rss, process.num_fds())


class RssTrace:
    """The server's RSS once a minute while the load runs: start and end alone cannot tell
    memory that fills up and levels off (KV pages touched for the first time, bounded rings)
    from a leak, which keeps climbing."""

    def __init__(self, pid: int, every_s: float = 60.0) -> None:
        self.process = psutil.Process(pid)
        self.every_s = every_s
        self.samples_mb: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-trace", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            with contextlib.suppress(psutil.Error):
                self.samples_mb.append(round(self.process.memory_info().rss / 2**20, 1))

    def __enter__(self) -> RssTrace:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@contextlib.contextmanager
def serving(folder: Path, config: Path) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """A `corral serve --port 0` until the block ends, then SIGTERM (SIGKILL after 60 s)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
    env["CORRAL_STATE_FILE"] = str(folder / "state.json")
    stdout, stderr = folder / "serve.out", folder / "serve.log"
    with stdout.open("wb") as out, stderr.open("wb") as err:
        proc = subprocess.Popen([*corral_command(), "serve", "--config", str(config), "--port", "0"],
                                stdout=out, stderr=err, env=env, start_new_session=True)
    try:
        yield proc, _listening_url(proc, stdout, stderr)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _listening_url(proc: subprocess.Popen[bytes], stdout: Path, stderr: Path) -> str:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        match = re.search(r"listening on (http://127\.0\.0\.1:\d+)", stdout.read_text())
        if match:
            return match.group(1)
        if proc.poll() is not None:
            raise SystemExit(f"corral serve exited with {proc.returncode}:\n{stderr.read_text()[-4000:]}")
        time.sleep(0.2)
    raise SystemExit("corral serve did not start in time")


def warm(url: str) -> None:
    """One request before the baseline, so loading and first-use allocations are not counted
    as growth."""
    with httpx.Client(base_url=url, trust_env=False, timeout=START_TIMEOUT_S) as client:
        response = client.post("/v1/completions", json={"model": MODEL, "prompt": "Hello", "max_tokens": 8})
        response.raise_for_status()


def loaded_estimate(url: str) -> int:
    """What the server's loaded models are estimated to reach under load, together."""
    with httpx.Client(base_url=url, trust_env=False, timeout=30) as client:
        models = client.get("/api/ps").json()["models"]
    return sum(m["estimate_bytes"] or 0 for m in models if m["state"] in ("ready", "busy"))


def soak_figures(report: dict[str, Any], start: ProcessFigures, end: ProcessFigures) -> dict[str, Any]:
    """The issue's figures from bench's total row: accepted = every request not refused."""
    total = next(row for row in report["rows"] if row["label"] == "soak total")
    return {
        "seconds": report["seconds"], "concurrency": total["concurrency"],
        "accepted": total["requests"] - total["refused"], "completed": total["ok"],
        "refused_429": total["refused"], "failed": total["errors"],
        "latency_p50_ms": total["latency_p50_ms"], "latency_p99_ms": total["latency_p99_ms"],
        "ttft_p50_ms": total["ttft_p50_ms"], "ttft_p99_ms": total["ttft_p99_ms"], "tok_s": total["tok_s"],
        "rss_start_mb": round(start.rss / 2**20, 1), "rss_end_mb": round(end.rss / 2**20, 1),
        "fds_start": start.fds, "fds_end": end.fds,
        "error_kinds": total["error_kinds"], "error_samples": total["error_samples"],
    }


def print_figures(figures: dict[str, Any]) -> None:
    print(f"soak: {figures['seconds']:.0f} s at concurrency {figures['concurrency']}")
    print(f"requests accepted {figures['accepted']}, completed {figures['completed']}, "
          f"refused (429) {figures['refused_429']}, failed {figures['failed']}")
    print(f"latency p50 {figures['latency_p50_ms']} ms, p99 {figures['latency_p99_ms']} ms; "
          f"TTFT p50 {figures['ttft_p50_ms']} ms, p99 {figures['ttft_p99_ms']} ms; {figures['tok_s']} tok/s")
    print(f"RSS start {figures['rss_start_mb']} MB, end {figures['rss_end_mb']} MB; "
          f"fds start {figures['fds_start']}, end {figures['fds_end']}")
    print(f"RSS each minute (MB): {' '.join(str(mb) for mb in figures['rss_by_minute_mb'])}")
    verdict = "within" if figures["peak_within_estimate"] else "ABOVE"
    print(f"RSS peak {figures['rss_peak_mb']} MB, {verdict} the baseline with no model loaded "
          f"({figures['rss_baseline_mb']} MB) + the loaded models' estimate ({figures['estimate_mb']} MB)")
    for sample in figures["error_samples"]:
        print(f"failure: {sample}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", default="30m", help="how long the load runs (default: 30m)")
    parser.add_argument("--slots", type=int, default=4, help="n_parallel of the model (default: 4)")
    parser.add_argument("--max-queue", type=int, default=2,
                        help="per-model queue bound; small, so 2x load also meets refusals (default: 2)")
    parser.add_argument("--report-every", default="5m", help="one progress row per interval (default: 5m)")
    parser.add_argument("--json", metavar="FILE", help="write the figures and bench's report as JSON")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="corral-soak-") as tmp:
        folder = Path(tmp)
        config = write_config(folder / "corral.toml", {
            "include_default_model": True,
            "defaults": {"n_ctx": 4096, "n_parallel": args.slots, "keep_alive": -1, "max_queue": args.max_queue}})
        with serving(folder, config) as (proc, url):
            baseline = ProcessFigures.of(proc.pid)  # listening, no model loaded yet
            warm(url)
            start = ProcessFigures.of(proc.pid)
            report_path = folder / "bench.json"
            bench_args = argparse.ArgumentParser()
            bench.add_arguments(bench_args)
            with RssTrace(proc.pid) as trace:
                status = bench.run(bench_args.parse_args([
                    url, "--model", MODEL, "--duration", args.duration, "--concurrency", str(2 * args.slots),
                    "--report-every", args.report_every, "--json", str(report_path)]))
            end = ProcessFigures.of(proc.pid)
            peak = proc_status_bytes("VmHWM", proc.pid)
            estimate = loaded_estimate(url)
            if status != 0:
                print(f"corral bench ended with status {status}", file=sys.stderr)
                return status
            report = json.loads(report_path.read_text())
        figures = soak_figures(report, start, end)
        figures["rss_by_minute_mb"] = trace.samples_mb
        figures |= {"rss_baseline_mb": round(baseline.rss / 2**20, 1), "rss_peak_mb": round(peak / 2**20, 1),
                    "estimate_mb": round(estimate / 2**20, 1),
                    "peak_within_estimate": peak <= baseline.rss + estimate}
    print_figures(figures)
    if args.json:
        Path(args.json).write_text(json.dumps({"figures": figures, "bench": report}, indent=2) + "\n")
    return 1 if figures["failed"] or not figures["peak_within_estimate"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
