"""Smoke test: the real `corral` binary in a real terminal (tmux), driven by keys.

Pilot tests (test_console_*.py) drive the app object in-process; this one runs the installed
console script in a tmux pane of 120x40, presses keys with `send-keys` and reads the screen
with `capture-pane`, as a person at a terminal would. It covers what Pilot cannot see: the
CLI wiring, the embedded backend loading a real (tiny) GGUF through llama.cpp, a prompt
answered with streamed text, and that no llama.cpp log line ever reaches the terminal. Besides the captured screens, every byte the
program writes to the pane is recorded with `pipe-pane`, so a log line that Textual paints
over a moment later is still caught.

Isolation: a config TOML in tmp_path (no default model, a model dir of three tiny GGUFs),
passed with CORRAL_CONFIG; HOME and XDG_CONFIG_HOME point at empty tmp dirs; every other
CORRAL_* variable is dropped. tmux runs on its own socket (`tmux -L <unique>`) with its own
config file (`-f`), so a user's tmux server and ~/.tmux.conf are never touched, and the
server is killed in the fixture's teardown whatever happens.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from support import SLOW, Server, slow_config, start_server

WIDTH, HEIGHT = 120, 40
SESSION = "corral"
START_TIMEOUT_S = 20.0
ACTION_TIMEOUT_S = 20.0
QUIT_TIMEOUT_S = 15.0
POLL_S = 0.1
MODELS = ("tiny-a", "tiny-b", "tiny-c")

# Text that only a llama.cpp / ggml log line would put on the terminal.
LEAK_MARKERS = ("llama_", "load_tensors", "print_info", "ggml_", "llm_load", "load_backend",
                "gguf_init")
LEAK_RE = re.compile("|".join(re.escape(m) for m in LEAK_MARKERS))


def _leaks(text: str) -> list[str]:
    """The lines of `text` that look like llama.cpp log lines."""
    return [line.strip() for line in text.splitlines() if LEAK_RE.search(line)]


class Tmux:
    """One tmux server on a private socket, holding one session that runs a command."""

    def __init__(self, tmp_path: Path, env: dict[str, str]) -> None:
        self.socket = f"corral-pytest-{os.getpid()}-{secrets.token_hex(4)}"
        self.env = env
        self.conf = tmp_path / "tmux.conf"
        # status off: the pane gets all 40 rows; remain-on-exit: after the program ends the
        # pane stays (dead) so its exit status and anything printed after the TUI can be read.
        self.conf.write_text("set -g status off\nset -g remain-on-exit on\nset -g history-limit 5000\n")
        self.raw_log = tmp_path / "pane-output.raw"
        self.screens: list[str] = []  # every screen captured, for the leak check
        self.server_pid = 0  # our tmux server (on our private socket), once started
        self.socket_path: Path | None = None

    def tmux(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["tmux", "-u", "-L", self.socket, "-f", str(self.conf), *args],
                              env=self.env, capture_output=True, text=True, timeout=15,
                              check=check)

    def start(self, command: list[str], cwd: Path) -> None:
        # pipe-pane is chained in the same tmux invocation, so it is in place before the
        # server reads the program's first output.
        self.tmux("new-session", "-d", "-s", SESSION, "-x", str(WIDTH), "-y", str(HEIGHT),
                  "-c", str(cwd),
                  *(arg for key in ("CORRAL_CONFIG", "HOME", "XDG_CONFIG_HOME")
                    for arg in ("-e", f"{key}={self.env[key]}")),
                  shlex.join(command),
                  ";", "pipe-pane", "-o", "-t", SESSION, f"cat >> {shlex.quote(str(self.raw_log))}")
        self.server_pid = int(self.pane("#{pid}"))
        self.socket_path = Path(self.pane("#{socket_path}"))

    def kill(self) -> None:
        """Stop our tmux server (and with it corral, if still running); tmux leaves its
        socket file behind, so remove that too."""
        try:
            self.tmux("kill-server", check=False)
        except subprocess.TimeoutExpired:
            pass
        if self.socket_path is not None:
            self.socket_path.unlink(missing_ok=True)

    def send(self, *keys: str) -> None:
        self.tmux("send-keys", "-t", SESSION, *keys)

    def pane(self, fmt: str) -> str:
        return self.tmux("display-message", "-p", "-t", SESSION, fmt).stdout.strip()

    def exit_status(self) -> tuple[str, str] | None:
        """(exit status, signal) once the program has ended and tmux has reaped it, else None.

        tmux marks a pane dead when its pty closes and fills in the status only when it
        reaps the process on SIGCHLD. A tmux built with libutempter (Debian's 3.3a, here:
        about 1 run in 3) can miss that SIGCHLD, leaving the program a zombie and the status
        empty for good (tmux/tmux#311, and #4841 for the dead-before-status race); a
        SIGCHLD sent to our own tmux server makes it reap."""
        dead, status, sig = self.pane("#{pane_dead}|#{pane_dead_status}|#{pane_dead_signal}").split("|")
        if dead != "1":
            return None
        if not (status or sig):
            if self.server_pid:
                os.kill(self.server_pid, signal.SIGCHLD)
            return None
        return status, sig

    def wait_exit(self, timeout: float) -> tuple[str, str]:
        """Wait until the program ends; fail with the screen if it is still running."""
        deadline = time.monotonic() + timeout
        while (result := self.exit_status()) is None:
            if time.monotonic() > deadline:
                pytest.fail(f"corral still running {timeout:.0f} s later; screen:\n{self.capture()}")
            time.sleep(POLL_S)
        return result

    def capture(self) -> str:
        """The visible screen, as text; fails at once if it shows a llama.cpp log line."""
        screen = self.tmux("capture-pane", "-p", "-t", SESSION).stdout
        self.screens.append(screen)
        if leaked := _leaks(screen):
            pytest.fail("llama.cpp log lines reached the terminal:\n" + "\n".join(leaked)
                        + f"\nscreen:\n{screen}")
        return screen

    def raw_output(self) -> str:
        """Everything the program wrote to the terminal so far (escape sequences included)."""
        try:
            return self.raw_log.read_bytes().decode("utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for(self, what: str | Callable[[str], bool], timeout: float = ACTION_TIMEOUT_S,
                 description: str | None = None) -> str:
        """Poll the screen until it contains `what` (or `what(screen)` is true); return it.
        On timeout, fail with the last screen so the failure can be read in the report."""
        check = (lambda screen: what in screen) if isinstance(what, str) else what
        label = description or (repr(what) if isinstance(what, str) else getattr(what, "__name__", "condition"))
        deadline = time.monotonic() + timeout
        screen = ""
        while True:
            screen = self.capture()
            if check(screen):
                return screen
            if time.monotonic() > deadline:
                break
            if self.pane("#{pane_dead}") == "1":
                status, sig = self.wait_exit(2.0)
                pytest.fail(f"corral exited (status {status or '-'}, signal {sig or '-'}) while waiting "
                            f"for {label}; last screen:\n{self.capture()}")
            time.sleep(POLL_S)
        pytest.fail(f"timed out after {timeout:.0f} s waiting for {label}; last screen:\n{screen}")


# -- reading the models table off the screen ------------------------------------------------


def _cells(line: str) -> str:
    return line.strip().strip("│").strip()


def model_row(screen: str, name: str) -> str | None:
    """The models-table line of `name` (event-log lines start with a time, not the name)."""
    for line in screen.splitlines():
        if _cells(line).startswith(name + " "):
            return line
    return None


def model_state(screen: str, name: str) -> str | None:
    row = model_row(screen, name)
    return _cells(row).split()[1] if row is not None else None


def pin_cell(screen: str, name: str) -> str | None:
    """The text under the table's `pin` header in the row of `name`."""
    header = next((line for line in screen.splitlines() if "mem est/meas" in line and " pin " in line), None)
    row = model_row(screen, name)
    if header is None or row is None:
        return None
    start = header.index(" pin ") + 1
    return row[start:start + 3].strip()


def states(screen: str) -> dict[str, str | None]:
    return {name: model_state(screen, name) for name in MODELS}


def state_is(name: str, state: str) -> Callable[[str], bool]:
    def check(screen: str) -> bool:
        return model_state(screen, name) == state

    check.__name__ = f"{name} to show state {state!r}"
    return check


# -- the test -------------------------------------------------------------------------------


def running_corral(tmp_path: Path, config: str, *args: str) -> Iterator[Tmux]:
    """`corral *args` in a tmux pane, with `config` as its config file's text, isolated as the
    module docstring says."""
    if shutil.which("tmux") is None:
        pytest.skip("tmux not installed: apt-get install tmux")
    corral = Path(sys.executable).with_name("corral")
    if not corral.exists():
        pytest.fail(f"no `corral` console script next to {sys.executable}: is the project installed (pip install -e .)?")

    home = tmp_path / "home"
    xdg = tmp_path / "xdg-config"
    home.mkdir(parents=True)
    xdg.mkdir()
    path = tmp_path / "corral.toml"
    path.write_text(config, encoding="utf-8")
    env = {key: value for key, value in os.environ.items()
           if not key.startswith("CORRAL_") and key not in ("TMUX", "TMUX_PANE")}
    env.update(CORRAL_CONFIG=str(path), HOME=str(home), XDG_CONFIG_HOME=str(xdg),
               LANG="C.UTF-8", LC_ALL="C.UTF-8")

    tmux = Tmux(tmp_path, env)
    try:
        tmux.start([str(corral), *args], cwd=tmp_path)
        yield tmux
    finally:
        tmux.kill()


@pytest.fixture
def console(tmp_path: Path, model_dir: Path) -> Iterator[Tmux]:
    yield from running_corral(
        tmp_path,
        "include_default_model = false\n"
        f"model_dirs = [{json.dumps(str(model_dir))}]\n"  # a JSON string is a TOML basic string
        "\n[defaults]\nn_ctx = 256\nn_parallel = 2\nn_threads = 1\n")


def test_console_in_a_real_terminal(console: Tmux) -> None:
    # 1. The dashboard comes up with the three models, all available.
    screen = console.wait_for(lambda s: all(v == "available" for v in states(s).values()),
                              timeout=START_TIMEOUT_S, description="tiny-a/b/c to show 'available'")
    assert "corral" in screen and "models" in screen
    assert pin_cell(screen, "tiny-a") == "", screen

    # 2. `l` loads the model under the cursor (the first row).
    console.send("l")
    screen = console.wait_for(state_is("tiny-a", "ready"))
    assert model_state(screen, "tiny-b") == "available", screen
    assert model_state(screen, "tiny-c") == "available", screen

    # 3. `enter` opens the prompt screen on it; the answer streams in and its stats follow.
    console.send("Enter")
    console.wait_for("message tiny-a", description="the prompt screen")
    console.send("-l", "Once upon a time")
    console.send("Enter")
    answered = console.wait_for(lambda s: re.search(r"TTFT \d+ ms · [\d.]+ tok/s · \d+ tokens", s) is not None,
                                description="the answer's TTFT and tok/s line")
    lines = [line.strip("│ ") for line in answered.splitlines()]
    asked = next(i for i, line in enumerate(lines) if line.startswith("Once upon a time"))
    stats = next(i for i, line in enumerate(lines) if line.startswith("TTFT"))
    assert any(line.strip() for line in lines[asked + 1:stats]), answered  # the streamed text
    console.send("Escape")
    console.wait_for(lambda s: "mem est/meas" in s, description="back on the dashboard")

    # 4. `p` pins it: the pin column gets its mark.
    console.send("p")
    pinned = console.wait_for(lambda s: pin_cell(s, "tiny-a") not in ("", None),
                              description="the pin column of tiny-a to change")
    assert pin_cell(pinned, "tiny-a") == "●", pinned

    # 5. `e` asks first; `y` evicts it (forced, since it is pinned).
    console.send("e")
    dialog = console.wait_for(lambda s: "Evict tiny-a?" in s and "Evict (y)" in s,
                              description="the evict confirmation dialog")
    assert "pinned" in dialog, dialog  # the dialog says the pin is overridden
    assert model_state(dialog, "tiny-a") == "ready", dialog  # nothing happens before the answer
    console.send("y")
    screen = console.wait_for(lambda s: model_state(s, "tiny-a") == "available" and "Evict tiny-a?" not in s,
                              description="tiny-a back to 'available' and the dialog gone")

    # 6. Load a second model, so quitting also has to close a live llama.cpp context.
    console.send("Down")  # keys are handled in order: the cursor moves before `l` acts
    console.send("l")
    console.wait_for(state_is("tiny-b", "ready"))
    assert model_state(console.capture(), "tiny-a") == "available"

    # 7. `q` quits: the process ends, with status 0, within a bounded time.
    console.send("q")
    status, sig = console.wait_exit(QUIT_TIMEOUT_S)
    after = console.capture()  # the normal screen, after the TUI left the alternate one
    assert (status, sig) == ("0", ""), f"corral exited with status {status!r} signal {sig!r}; screen:\n{after}"
    left = [line for line in after.splitlines() if line.strip() and not line.startswith("Pane is dead")]
    assert not left, f"corral left text on the terminal after it quit:\n{after}"

    # 8. No llama.cpp log line reached the terminal: `capture` checked every screen seen;
    #    the raw bytes written to the pane also hold whatever was painted over at once.
    assert len(console.screens) > 5  # the screen checks did run
    raw = console.raw_output()
    assert raw, "pipe-pane recorded nothing: the raw-output check would be vacuous"
    raw_leaks = _leaks(raw)
    assert not raw_leaks, "llama.cpp log lines were written to the terminal:\n" + "\n".join(raw_leaks[:20])


# -- the requests view, attached to a server ---------------------------------------------------


@pytest.fixture
def attached(tmp_path: Path, models: tuple[Path, Path]) -> Iterator[tuple[Tmux, Server]]:
    """`corral attach` to a `corral serve` of the tiny models and the slow one (one slot)."""
    server = start_server(tmp_path / "server", slow_config(tmp_path / "server", *models))
    try:
        for tmux in running_corral(tmp_path / "console", "include_default_model = false\n", "attach", server.url):
            yield tmux, server
    finally:
        assert server.stop() == 0, server.log()


def slow_slots(screen: str) -> str | None:
    """The queue panel's `active/slots` of the slow model: `│ slow   waiting  active/1  oldest`."""
    found = re.search(rf"│ {SLOW}\s+\d+\s+(\d+/1)\s", screen)
    return found.group(1) if found else None


def test_the_requests_view_cancels_a_streaming_answer(attached: tuple[Tmux, Server]) -> None:
    """While a client streams a long answer, `w` shows it running; `x` and `y` cancel it: the
    client's stream ends with finish reason "cancelled" and the slot is free again."""
    console, server = attached
    console.wait_for(lambda s: model_state(s, SLOW) == "available", timeout=START_TIMEOUT_S,
                     description="the slow model in the table")

    def long_answer() -> str | None:
        body = {"model": SLOW, "prompt": "Once", "stream": True, "max_tokens": 4000, "ignore_eos": True}
        finish = None
        with server.http() as http, http.stream("POST", "/v1/completions", json=body,
                                                headers={"x-request-id": "tmux-long"},
                                                timeout=httpx.Timeout(30, read=120)) as response:
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    finish = json.loads(line[6:])["choices"][0]["finish_reason"] or finish
        return finish

    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(long_answer)
        console.wait_for(lambda s: slow_slots(s) == "1/1", description="the slow model's slot in use")
        console.send("w")
        listed = console.wait_for(lambda s: re.search(r"tmux-long\s+running", s) is not None,
                                  description="the request running in the requests view")
        assert "openai" in listed and "1 running, 0 queued" in listed, listed
        console.send("x")
        console.wait_for("Cancel request tmux-long?", description="the cancel confirmation")
        console.send("y")
        console.wait_for("nothing running or queued", description="the request gone from the view")
        assert answer.result(timeout=60) == "cancelled"
    console.send("Escape")
    screen = console.wait_for(lambda s: slow_slots(s) == "0/1", description="the slow model's slot free")
    assert "tmux-long cancelled by console" in screen, screen
