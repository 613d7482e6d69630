"""`corral web`: the console served to a browser by textual-serve, in a real subprocess; over
textual-serve's websocket, and in Debian's headless `chromium` driven over the DevTools protocol."""

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

from cdp import Page, chromium, chromium_path
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
    write_tiny_llama(models / "tiny-writer.gguf", name="tiny-writer")  # listed, never loaded
    return write_config(tmp_path / "corral.toml", tiny_settings(models))


# Run in the page before textual-serve's script: keep the xterm.js terminal it builds
# (`this.terminal = new Terminal(...)`) where the test can read its screen buffer, since the
# terminal draws on a canvas and the DOM holds no text. `corralScreen()` is the visible screen.
CAPTURE_TERMINAL = """
Object.defineProperty(Object.prototype, "terminal", {
  configurable: true,
  set(value) {
    Object.defineProperty(this, "terminal", {value, writable: true, configurable: true, enumerable: true});
    if (value && value.buffer && value.buffer.active) window.corralTerminal = value;
  },
});
window.corralScreen = () => {
  const term = window.corralTerminal;
  if (!term) return "";
  const buffer = term.buffer.active, lines = [];
  for (let y = 0; y < term.rows; y++) lines.push(buffer.getLine(buffer.viewportY + y)?.translateToString(true) ?? "");
  return lines.join("\\n");
};
"""
START_SHOWN = "getComputedStyle(document.querySelector('#start')).display !== 'none'"
WIDTH, HEIGHT = 1280, 800


def row_shows(name: str, *words: str) -> str:
    """A page expression: the screen text once the line naming `name` holds every word, else false."""
    row = f"(corralScreen().split('\\n').find(l => l.includes({name!r})) ?? '')"
    return "(" + " && ".join(f"{row}.includes({word!r})" for word in words) + ") && corralScreen()"


async def drive_console(page: Page, url: str, screenshot: Path) -> tuple[str, str]:
    """Open the page with textual-serve's Start button, click it, wait for the models table,
    press `l` and wait for the model to be ready; the screens before and after the key."""
    await page.send("Page.addScriptToEvaluateOnNewDocument", source=CAPTURE_TERMINAL)
    await page.goto(f"{url}/?delay=1")
    await page.wait_for(START_SHOWN, "textual-serve's Start button", 10)
    assert await page.evaluate("corralScreen().trim()") == ""  # nothing runs before the click
    await page.click("#start")
    listed = await page.wait_for(row_shows("tiny-web", "available"), "the models table listing tiny-web", 30,
                                 shown="corralScreen()")
    await page.evaluate("corralTerminal.focus()")
    await page.press("l")
    loaded = await page.wait_for(row_shows("tiny-web", "ready", "CPU"), "tiny-web ready after `l`", 30,
                                 shown="corralScreen()")
    await page.screenshot(screenshot)
    return listed, loaded


@pytest.mark.skipif(chromium_path() is None, reason="needs a Chromium browser on PATH (Debian: apt-get install chromium)")
@pytest.mark.timeout(120)
def test_web_console_in_chromium_lists_and_loads_a_model(tmp_path: Path, config: Path,
                                                          pytestconfig: pytest.Config) -> None:
    screenshot = Path(pytestconfig.getoption("web_screenshot") or tmp_path / "web.png")

    async def run(url: str) -> tuple[str, str]:
        async with chromium(tmp_path / "chromium", width=WIDTH, height=HEIGHT) as page:
            return await drive_console(page, url, screenshot)

    with corral_web(tmp_path, "--config", str(config)) as web:
        listed, loaded = asyncio.run(run(web.url))
    assert "corral" in listed.splitlines()[0]  # the title bar, drawn in the browser's terminal
    assert any(all(word in line for word in ("model", "state", "size", "quant", "placed")) for line in listed.splitlines())
    assert "available" in next(line for line in loaded.splitlines() if "tiny-writer" in line)
    png = screenshot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert (int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")) == (WIDTH, HEIGHT)


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
