"""Console idle cost: CPU and RSS of an idle `corral`, with no model loaded or with one.

    .venv/bin/python -m tests.benchmarks.console_idle [--seconds 30] [--warmup 10] [--size 160x50]
                                                      [--loaded] [--runs N]

Starts the installed `corral` console (the embedded backend, the bundled default model listed
but not loaded; with `--loaded`, preloaded and idle) on a pseudo-terminal of the given size, as
an operator's SSH session would, lets it settle for `--warmup` seconds (first start: the
default model's file is checked; with `--loaded` the warm-up starts once the load is done),
then measures over `--seconds`: the CPU time the process and its children used, as a
percentage of one core, and their resident memory (the last sample and the highest seen, once
a second). `--runs` repeats the whole thing with a fresh console and prints each run and the
spread: the machine this runs on is usually shared, and one window can catch a neighbour.
The limits are under 2 % of a core (every run) and, with no model loaded, under 150 MB; the
exit status is 1 when a figure is over its limit.

Each run is isolated: HOME and the XDG folders point into a temporary folder, and the config
file of its own (`--config`, where $XDG_CONFIG_HOME puts it: the console watches its folder)
turns the other tools' model stores off, so the user's config, warm-restart state (which would
load models), pulls and stores stay out of the measurement.
The pty's output is read and thrown away all along: a console whose terminal stops reading
would block, and an idle console that wrote steadily would show here as CPU. Not part of the
default test run (pyproject: norecursedirs = tests/benchmarks).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import pty
import signal
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

CPU_LIMIT_PERCENT = 2.0
RSS_LIMIT_BYTES = 150 * 1000 * 1000  # with no model loaded: a loaded model's weights count in RSS
MB = 1000 * 1000
DEFAULT_MODEL = "gemma-3-270m"
LOAD_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class IdleFigures:
    seconds: float
    cpu_percent: float  # of one core, process and children
    rss_last: int
    rss_max: int
    bytes_written: int  # to the terminal during the window


def tree(proc: psutil.Process) -> list[psutil.Process]:
    return [proc, *proc.children(recursive=True)]


def cpu_seconds(proc: psutil.Process) -> float:
    total = 0.0
    for p in tree(proc):
        try:
            times = p.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


def rss(proc: psutil.Process) -> int:
    total = 0
    for p in tree(proc):
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


class Terminal:
    """A pty of a fixed size whose output is drained (and counted) by a thread."""

    def __init__(self, columns: int, rows: int) -> None:
        self.master, self.slave = pty.openpty()
        fcntl.ioctl(self.slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
        self.written = 0
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()

    def _drain(self) -> None:
        while True:
            try:
                data = os.read(self.master, 65536)
            except OSError:
                return
            if not data:
                return
            self.written += len(data)

    def close(self) -> None:
        for fd in (self.slave, self.master):
            try:
                os.close(fd)
            except OSError:
                pass


def isolated_env(home: Path) -> dict[str, str]:
    """The environment of a console that reads nothing of the user's: no CORRAL_* variables,
    and HOME and the XDG folders (config, warm-restart state, pulls, caches) under `home`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CORRAL_", "XDG_", "HF_", "OLLAMA_"))}
    env.update(TERM="xterm-256color", COLORTERM="truecolor", LANG="C.UTF-8", HOME=str(home))
    for name in ("CONFIG", "STATE", "DATA", "CACHE"):
        env[f"XDG_{name}_HOME"] = str(home / name.lower())
    return env


def wait_loaded(child: subprocess.Popen[bytes], state_file: Path) -> None:
    """Until the warm-restart state lists the default model as loaded: the backend writes it
    once the load is done (backend/warmstate.py)."""
    deadline = time.monotonic() + LOAD_TIMEOUT_S
    while True:
        if child.poll() is not None:
            raise SystemExit(f"corral exited while loading {DEFAULT_MODEL} with status {child.returncode}")
        try:
            if DEFAULT_MODEL in json.loads(state_file.read_text(encoding="utf-8")).get("loaded", []):
                return
        except (OSError, ValueError):
            pass  # not written yet, or being replaced
        if time.monotonic() > deadline:
            raise SystemExit(f"{DEFAULT_MODEL} was not loaded within {LOAD_TIMEOUT_S:.0f} s")
        time.sleep(0.2)


def measure(columns: int, rows: int, warmup: float, seconds: float, loaded: bool) -> IdleFigures:
    corral = Path(sys.executable).with_name("corral")
    if not corral.exists():
        raise SystemExit(f"no `corral` next to {sys.executable}: pip install -e . first")
    with tempfile.TemporaryDirectory(prefix="corral-idle-") as tmp:
        home = Path(tmp)
        config = home / "config" / "corral" / "config.toml"  # where $XDG_CONFIG_HOME puts it
        config.parent.mkdir(parents=True)
        preload = f"preload = [{DEFAULT_MODEL!r}]\n" if loaded else ""
        config.write_text(f"include_default_model = true\n{preload}"
                          "[stores]\nollama = false\nhuggingface = false\nlmstudio = false\n", encoding="utf-8")
        env = isolated_env(home)
        terminal = Terminal(columns, rows)
        child = subprocess.Popen([str(corral), "--config", str(config)], stdin=terminal.slave,
                                 stdout=terminal.slave, stderr=terminal.slave, env=env,
                                 start_new_session=True)
        try:
            proc = psutil.Process(child.pid)
            if loaded:
                wait_loaded(child, Path(env["XDG_STATE_HOME"]) / "corral" / "state.json")
            time.sleep(warmup)
            if child.poll() is not None:
                raise SystemExit(f"corral exited during the warm-up with status {child.returncode}")
            written, started, cpu_before = terminal.written, time.monotonic(), cpu_seconds(proc)
            rss_max = 0
            while (elapsed := time.monotonic() - started) < seconds:
                rss_max = max(rss_max, rss(proc))
                time.sleep(min(1.0, seconds - elapsed))
            wall = time.monotonic() - started
            used = cpu_seconds(proc) - cpu_before
            rss_last = rss(proc)
            return IdleFigures(wall, 100 * used / wall, rss_last, max(rss_max, rss_last),
                               terminal.written - written)
        finally:
            os.killpg(child.pid, signal.SIGTERM)
            try:
                child.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
            terminal.close()


def report(runs: list[IdleFigures], columns: int, rows: int, loaded: bool) -> bool:
    """Print each run and the spread against the limits; True when every run meets them."""
    cpu_ok = all(f.cpu_percent < CPU_LIMIT_PERCENT for f in runs)
    rss_ok = loaded or all(f.rss_max < RSS_LIMIT_BYTES for f in runs)
    models = f"{DEFAULT_MODEL} loaded and idle" if loaded else "default model listed, none loaded"
    print(f"corral console, idle: embedded backend, {models}; {columns}x{rows} pty, "
          f"{len(runs)} run(s) of {runs[0].seconds:.0f} s")
    print(f"{'run':>3} {'CPU % of one core':>18} {'RSS max MB':>11} {'RSS end MB':>11} {'output B/s':>11}")
    for number, f in enumerate(runs, 1):
        print(f"{number:>3} {f.cpu_percent:>18.2f} {f.rss_max / MB:>11.1f} {f.rss_last / MB:>11.1f} "
              f"{f.bytes_written / f.seconds:>11.0f}")
    cpu = sorted(f.cpu_percent for f in runs)
    print(f"CPU: min {cpu[0]:.2f}, median {cpu[len(cpu) // 2]:.2f}, max {cpu[-1]:.2f} "
          f"(limit {CPU_LIMIT_PERCENT:.1f}: {'yes' if cpu_ok else 'NO'})")
    rss_limit = "none with a model loaded" if loaded else f"{RSS_LIMIT_BYTES / MB:.0f}: {'yes' if rss_ok else 'NO'}"
    print(f"RSS max: {max(f.rss_max for f in runs) / MB:.1f} MB (limit {rss_limit})")
    return cpu_ok and rss_ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=30.0, help="measurement window (default 30)")
    parser.add_argument("--warmup", type=float, default=10.0, help="settling time before it (default 10)")
    parser.add_argument("--size", default="160x50", help="terminal COLUMNSxROWS (default 160x50)")
    parser.add_argument("--loaded", action="store_true", help=f"preload {DEFAULT_MODEL} and measure it idle")
    parser.add_argument("--runs", type=int, default=1, help="fresh consoles measured one after another (default 1)")
    args = parser.parse_args(argv)
    columns, rows = (int(n) for n in args.size.lower().split("x"))
    runs = [measure(columns, rows, args.warmup, args.seconds, args.loaded) for _ in range(max(1, args.runs))]
    return 0 if report(runs, columns, rows, args.loaded) else 1


if __name__ == "__main__":
    raise SystemExit(main())
