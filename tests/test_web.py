"""`corral web`: the console served to a browser by textual-serve, in a real subprocess."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import httpx
import psutil
import pytest

from ggufs import write_tiny_llama
from support import clean_env, free_port, tiny_settings, write_config

# The serving process reports, as it exits, which of these it imported.
REPORT = ("import atexit, sys\n"
          "atexit.register(lambda: print('IMPORTED', sorted({m.split('.')[0] for m in sys.modules} & "
          "{'llama_cpp', 'textual'}), file=sys.stderr, flush=True))\n"
          "from corral.console.cli import main\n"
          "sys.exit(main())\n")


class WebProcess:
    def __init__(self, proc: subprocess.Popen[str], url: str) -> None:
        self.proc, self.url = proc, url

    def stop(self) -> tuple[int, str]:
        """SIGTERM, then the exit status and what it wrote to stderr."""
        self.proc.terminate()
        try:
            _, err = self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate(timeout=10)
        return self.proc.returncode, err


@contextlib.contextmanager
def corral_web(tmp_path: Path, *args: str) -> Iterator[WebProcess]:
    """`corral web` on a free port, once its page answers."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", REPORT, "web", "--port", str(port), *args], cwd=tmp_path,
                            env=clean_env(XDG_CONFIG_HOME=str(tmp_path / "xdg"),
                                          CORRAL_STATE_FILE=str(tmp_path / "state.json")),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    web = WebProcess(proc, f"http://127.0.0.1:{port}")
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, f"corral web exited with {proc.returncode}: {proc.communicate()[1]}"
            with contextlib.suppress(httpx.TransportError):
                httpx.get(web.url, timeout=2.0)
                break
            assert time.monotonic() < deadline, "corral web did not answer within 60 s"
            time.sleep(0.1)
        yield web
    finally:
        if proc.poll() is None:
            web.stop()


@pytest.fixture
def config(tmp_path: Path) -> Path:
    models = tmp_path / "models"
    write_tiny_llama(models / "tiny-web.gguf", name="tiny-web")
    return write_config(tmp_path / "corral.toml", tiny_settings(models))


async def read_screen(url: str, wanted: str, timeout: float = 90.0) -> str:
    """Open a browser's session (the websocket) and read the console's output until `wanted`
    shows; closing the socket ends that session's console."""
    seen = ""
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(f"{url.replace('http', 'ws', 1)}/ws?width=120&height=40") as ws:
            async with asyncio.timeout(timeout):
                async for message in ws:
                    if message.type == aiohttp.WSMsgType.BINARY:
                        seen += message.data.decode("utf-8", "replace")
                    if wanted in seen:
                        break
    return seen


@pytest.mark.timeout(180)
def test_web_serves_the_console_page_and_a_session_without_loading_llama_cpp(tmp_path: Path, config: Path) -> None:
    with corral_web(tmp_path, "--config", str(config)) as web:
        page = httpx.get(web.url, timeout=10.0)
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "corral" in page.text and "/ws" in page.text

        server = psutil.Process(web.proc.pid)
        screen = asyncio.run(read_screen(web.url, "tiny-web"))
        assert "tiny-web" in screen  # the embedded console listed the config's model
        deadline = time.monotonic() + 30
        while server.children(recursive=True) and time.monotonic() < deadline:
            time.sleep(0.1)  # the tab closed: its console must end
        assert not server.children(recursive=True)
        code, err = web.stop()
    assert code == 0, err
    assert "IMPORTED []" in err, err  # the serving process loaded neither llama.cpp nor Textual


def test_web_warns_when_it_listens_beyond_this_machine(tmp_path: Path, config: Path) -> None:
    with corral_web(tmp_path, "--host", "0.0.0.0", "--config", str(config)) as web:
        code, err = web.stop()
    assert code == 0
    assert "corral web: warning: listening on 0.0.0.0: there is no login" in err


def test_web_refuses_port_zero(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "corral.console.cli", "web", "--port", "0"], cwd=tmp_path,
                          env=clean_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "corral: web --port 0: the page must tell browsers the port" in proc.stderr
