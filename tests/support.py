"""What the tests share: a real `corral serve` on 127.0.0.1, its config file, a free port,
polling, the HTTP checks the server tests and the reliability tests both make, and the tool
and schema the dialect tests share.

pytest imports this as `support` (tests/ has no `__init__.py`, so pytest puts it on sys.path);
the benchmarks, run as `python -m tests.benchmarks.<name>` from the repository root, import it
as `tests.support`. So it imports nothing from tests/ and nothing beyond corral's own
dependencies (the benchmarks also run where only those are installed, such as the GPU machine).
Fixtures live in conftest.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import httpx
from pydantic import BaseModel, Field

TINY = ("tiny-a", "tiny-b", "tiny-c")  # conftest's `tiny_models`
SLOW = "slow"  # a larger random model (~300 tokens/s on 2 cores): requests still running when needed
SLOW_SHAPE = dict(n_layer=8, n_embd=512, n_head=8, n_kv_head=8, n_ff=1024, context_length=4096)
HELLO = [{"role": "user", "content": "Once upon a time"}]
WRAPPER = (  # `corral serve` exactly as the entry point runs it, reporting what it imported
    "import atexit, sys\n"
    "atexit.register(lambda: print('textual modules:', sorted(m for m in sys.modules "
    "if m.split('.')[0] == 'textual'), file=sys.stderr))\n"
    "from corral.console.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


# -- processes and polling -------------------------------------------------------------------


def clean_env(**extra: str) -> dict[str, str]:
    """The test process's environment without anything that changes imports or corral's config."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("CORRAL_") and k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env.update(extra)
    return env


def free_port() -> int:
    """A 127.0.0.1 port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for(check: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll `check` until it returns something truthy (returned), or fail naming `what`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


# -- config files ----------------------------------------------------------------------------


def toml(settings: Mapping[str, Any], table: str = "") -> str:
    """`settings` (the shape `settings_from_dict` takes) as TOML: JSON's strings, numbers,
    booleans and arrays are TOML's too; a mapping is a [table], a list of mappings an
    [[array of tables]]."""
    values, tables = [], []
    for key, value in settings.items():
        name = f"{table}.{key}" if table else key
        if isinstance(value, Mapping):
            tables.append(f"[{name}]\n{toml(value, name)}")
        elif isinstance(value, list) and value and all(isinstance(item, Mapping) for item in value):
            tables += [f"[[{name}]]\n{toml(item, name)}" for item in value]
        else:
            values.append(f"{key} = {json.dumps(value)}\n")
    return "".join(values + tables)


def write_config(path: Path, settings: str | Mapping[str, Any]) -> Path:
    """Write a config file: TOML text as it is, or settings as `toml` renders them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(settings if isinstance(settings, str) else toml(settings), encoding="utf-8")
    return path


def tiny_settings(model_dir: Path, **more: Any) -> dict[str, Any]:
    """The models of `model_dir` with small contexts, one thread each and no idle unload."""
    return {"include_default_model": False, "model_dirs": [str(model_dir)],
            "defaults": {"n_ctx": 256, "n_parallel": 2, "n_threads": 1, "keep_alive": -1}, **more}


def slow_config(root: Path, model_dir: Path, slow: Path) -> Path:
    """`root`/corral.toml for conftest's `models`: tiny-a/b/c, and the slow model with one slot
    and a queue of one."""
    return write_config(root / "corral.toml", tiny_settings(
        model_dir, budgets={"max_loaded": 8},
        models=[{"name": SLOW, "path": str(slow), "n_ctx": 4096, "n_parallel": 1, "max_queue": 1}]))


# -- a `corral serve` process ----------------------------------------------------------------


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    url: str
    stdout: Path
    stderr: Path
    api_key: str | None = None
    ollama_url: str | None = None  # where it serves ollama's API at ollama's paths (--ollama-port)

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    @property
    def state_file(self) -> Path:
        """Its warm-restart state, in the home `start_server` gave it."""
        return self.stdout.parent / ".local" / "state" / "corral" / "state.json"

    def http(self, **kw: Any) -> httpx.Client:
        headers = {"authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        return httpx.Client(base_url=self.url, trust_env=False, timeout=30, headers=headers, **kw)

    def openai(self, api_key: str | None = None) -> Any:
        """The official `openai` client on this server (imported here: benchmarks load this
        module where openai may be missing)."""
        import openai

        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key or self.api_key or "none",
                             max_retries=0, http_client=httpx.Client(trust_env=False, timeout=60))

    def ollama(self, host: str | None = None) -> Any:
        """The official `ollama` client on this server's ollama port (or on `host`, such as
        `{url}/ollama`)."""
        import ollama

        headers = {"authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        return ollama.Client(host=host or self.ollama_url, headers=headers, trust_env=False, timeout=60)

    def log(self) -> str:
        return self.stderr.read_text(errors="replace")

    def stop(self) -> int:
        """SIGTERM, and the exit status; a process still there after 30 s is killed and fails."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise


def start_server(root: Path, config: Path, *, api_key: str | None = None, grace: float = 1.0, port: int = 0,
                 timeout: float = 60.0, extra: tuple[str, ...] = (), env: Mapping[str, str] | None = None) -> Server:
    """Start `corral serve` on 127.0.0.1 (`port` 0: a free one) with `root` as its home and
    working folder (so its state file is its own) and `env` added to its environment, and wait
    for its listening line and a 200 from /health."""
    root.mkdir(parents=True, exist_ok=True)
    env = clean_env(HOME=str(root), XDG_STATE_HOME=str(root / ".local" / "state"), **(env or {}))
    if api_key:
        env["CORRAL_API_KEY"] = api_key  # the environment, not argv: keys must not show in `ps`
    stdout, stderr = root / "stdout.txt", root / "stderr.txt"
    with stdout.open("wb") as out, stderr.open("wb") as err:
        proc = subprocess.Popen([sys.executable, "-c", WRAPPER, "serve", "--config", str(config), "--port", str(port),
                                 "--grace", str(grace), *extra], stdout=out, stderr=err, env=env, cwd=root)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = re.search(r"listening on (http://127\.0\.0\.1:\d+) \((\d+) models\)"
                          r"(?:; ollama API on (http://127\.0\.0\.1:\d+))?", stdout.read_text())
        if match:
            server = Server(proc, match.group(1), stdout, stderr, api_key, match.group(3))
            with httpx.Client(trust_env=False) as client:  # a warm restart is still loading its models
                wait_for(lambda: client.get(f"{server.url}/health").json() == {"status": "ok"},
                         timeout=max(deadline - time.monotonic(), 1.0), what="/health to say ok")
            return server
        if proc.poll() is not None:
            raise AssertionError(f"corral serve exited with {proc.returncode}:\n{stderr.read_text()}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"corral serve did not start:\n{stderr.read_text()}")


# -- what the server tests check -------------------------------------------------------------


def model_state(http: httpx.Client, name: str) -> dict[str, Any]:
    return next(m for m in http.get("/api/ps").json()["models"] if m["name"] == name)


def assert_idle(http: httpx.Client, name: str) -> None:
    wait_for(lambda: (lambda m: m["active"] == 0 and m["queued"] == 0 and m["in_flight"] == 0)(model_state(http, name)),
             what=f"{name} to be idle")


def assert_error(response: httpx.Response, status: int, code: str, mentions: str = "") -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert error["code"] == code and error["type"] == code
    assert error["request_id"] == response.headers["x-request-id"]
    assert mentions in error["message"], error["message"]
    return error


def replayed_events(http: httpx.Client, after: int = 0) -> Iterator[dict[str, Any]]:
    """Events from the server's replay ring, read until the stream goes quiet."""
    with http.stream("GET", "/api/events", params={"after": after}, timeout=httpx.Timeout(30, read=0.5)) as response:
        assert response.status_code == 200
        try:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    yield json.loads(line[6:])
        except httpx.ReadTimeout:
            return


class StubBackend:
    """Just enough of a backend for the server app: readiness on demand, and a models() that fails."""

    def __init__(self) -> None:
        self.started = threading.Event()

    async def ready(self) -> None:
        await asyncio.to_thread(self.started.wait)

    async def warmed(self) -> None:
        await self.ready()

    async def models(self) -> list[Any]:
        raise RuntimeError("secret detail from deep inside")

    async def _no_events(self) -> AsyncIterator[Any]:
        await asyncio.Event().wait()
        yield None

    def events(self, after_seq: int | None = None) -> AsyncIterator[Any]:
        return self._no_events()


# -- what the dialect tests share ----------------------------------------------------------------

WEATHER_PARAMETERS: dict[str, Any] = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 40},
                   "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
}


class Person(BaseModel):
    """A structured-output target: strings, an integer and an enum."""

    name: str = Field(max_length=30)
    age: int
    role: Literal["engineer", "artist", "farmer"]


def check_weather(arguments: Any) -> dict[str, Any]:
    """A weather call's arguments (JSON text or parsed) fit WEATHER_PARAMETERS."""
    args = json.loads(arguments) if isinstance(arguments, str) else arguments
    assert isinstance(args, dict) and set(args) == {"city", "unit"}, args
    assert isinstance(args["city"], str) and len(args["city"]) <= 40
    assert args["unit"] in ("celsius", "fahrenheit")
    return args


def default_model_config(root: Path, model_dir: Path | None = None) -> Path:
    """`root`/corral.toml serving the default model (by its path: a server home of its own
    would assemble the 253 MB file again) and the models of `model_dir`, 4 slots each."""
    from corral.backend.catalog import DEFAULT_MODEL_NAME, default_model_path

    return write_config(root / "corral.toml", {
        "include_default_model": False, "model_dirs": [str(model_dir)] if model_dir else [],
        "models": [{"name": DEFAULT_MODEL_NAME, "path": str(default_model_path())}],
        "defaults": {"n_ctx": 2048, "n_parallel": 4, "keep_alive": -1}, "budgets": {"max_loaded": 4}})
