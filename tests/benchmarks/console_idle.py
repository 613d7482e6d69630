"""Console idle cost: CPU and RSS of an idle `corral` with no model loaded.

    .venv/bin/python -m tests.benchmarks.console_idle [--seconds 30] [--warmup 10] [--size 160x50]

Starts the installed `corral` console (the embedded backend, the bundled default model listed
but not loaded) on a pseudo-terminal of the given size, as an operator's SSH session would,
lets it settle for `--warmup` seconds (first start: the default model's file is checked), then
measures over `--seconds`: the CPU time the process and its children used, as a percentage of
one core, and their resident memory (the last sample and the highest seen, once a second).
The issue's limits are under 2 % of a core and under 150 MB; the exit status is 1 when a
figure is over its limit.

A config file of its own (`--config`, defaults only) keeps the user's config and preloads out
of the measurement. The pty's output is read and thrown away all along: a console whose
terminal stops reading would block, and an idle console that wrote steadily would show here as
CPU. Not part of the default test run (pyproject: norecursedirs = tests/benchmarks).
"""

from __future__ import annotations

import argparse
import fcntl
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
RSS_LIMIT_BYTES = 150 * 1000 * 1000
MB = 1000 * 1000


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


def measure(columns: int, rows: int, warmup: float, seconds: float) -> IdleFigures:
    corral = Path(sys.executable).with_name("corral")
    if not corral.exists():
        raise SystemExit(f"no `corral` next to {sys.executable}: pip install -e . first")
    with tempfile.TemporaryDirectory(prefix="corral-idle-") as tmp:
        config = Path(tmp) / "corral.toml"
        config.write_text("include_default_model = true\n", encoding="utf-8")
        env = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
        env.update(TERM="xterm-256color", COLORTERM="truecolor", LANG="C.UTF-8")
        terminal = Terminal(columns, rows)
        child = subprocess.Popen([str(corral), "--config", str(config)], stdin=terminal.slave,
                                 stdout=terminal.slave, stderr=terminal.slave, env=env,
                                 start_new_session=True)
        try:
            proc = psutil.Process(child.pid)
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


def report(figures: IdleFigures, columns: int, rows: int) -> bool:
    """Print the figures against the limits; True when both are met."""
    cpu_ok = figures.cpu_percent < CPU_LIMIT_PERCENT
    rss_ok = figures.rss_max < RSS_LIMIT_BYTES
    print(f"corral console, idle: embedded backend, default model listed, none loaded; "
          f"{columns}x{rows} pty, {figures.seconds:.0f} s")
    print(f"{'figure':<22} {'value':>12} {'limit':>10}  ok")
    print(f"{'CPU (% of one core)':<22} {figures.cpu_percent:>12.2f} {CPU_LIMIT_PERCENT:>10.1f}  {'yes' if cpu_ok else 'NO'}")
    print(f"{'RSS max (MB)':<22} {figures.rss_max / MB:>12.1f} {RSS_LIMIT_BYTES / MB:>10.0f}  {'yes' if rss_ok else 'NO'}")
    print(f"{'RSS at end (MB)':<22} {figures.rss_last / MB:>12.1f}")
    print(f"{'terminal output (B/s)':<22} {figures.bytes_written / figures.seconds:>12.0f}")
    return cpu_ok and rss_ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=30.0, help="measurement window (default 30)")
    parser.add_argument("--warmup", type=float, default=10.0, help="settling time before it (default 10)")
    parser.add_argument("--size", default="160x50", help="terminal COLUMNSxROWS (default 160x50)")
    args = parser.parse_args(argv)
    columns, rows = (int(n) for n in args.size.lower().split("x"))
    figures = measure(columns, rows, args.warmup, args.seconds)
    return 0 if report(figures, columns, rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
