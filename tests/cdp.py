"""A small Chrome DevTools Protocol client: enough to drive Debian's `chromium` headless from a
test (open a page, run script in it, click, type, take a screenshot) over aiohttp's websocket
client, so no browser download and no driver are needed.

`chromium(profile)` starts the browser on a debugging port it picks itself (it writes the port
to `DevToolsActivePort` in its profile folder) and yields the `Page` of its first tab. Waiting
is always for a condition with a deadline (`Page.wait_for`), never for a fixed time.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

START_TIMEOUT_S = 30.0
CALL_TIMEOUT_S = 30.0
POLL_S = 0.05  # between two evaluations of a condition in `wait_for`


def chromium_path() -> str | None:
    """Debian's `chromium` (or another Chromium-based browser on PATH), None if there is none."""
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if found := shutil.which(name):
            return found
    return None


class CdpError(Exception):
    """The browser refused a command; the message is the protocol's error."""


class Page:
    """One tab, reached over its own DevTools websocket."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self._ws = ws
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        """Route answers to their callers; events are not used, so they are dropped."""
        try:
            async for message in self._ws:
                if message.type != aiohttp.WSMsgType.TEXT:
                    continue
                data = message.json()
                future = self._pending.pop(data.get("id", 0), None)
                if future is not None and not future.done():
                    future.set_result(data)
        finally:
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(CdpError("the browser closed its DevTools connection"))

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        """Call `method` and return its result."""
        number = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[number] = future
        await self._ws.send_json({"id": number, "method": method, "params": params})
        async with asyncio.timeout(CALL_TIMEOUT_S):
            answer = await future
        if "error" in answer:
            raise CdpError(f"{method}: {answer['error'].get('message')} ({answer['error'].get('data', '')})")
        return answer.get("result", {})

    async def evaluate(self, expression: str) -> Any:
        """The value of a script expression in the page (awaited when it is a promise)."""
        result = await self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise CdpError(f"{expression!r} threw: {details.get('exception', {}).get('description') or details}")
        return result["result"].get("value")

    async def wait_for(self, expression: str, what: str, timeout: float, *, shown: str | None = None) -> Any:
        """The first truthy value of `expression`, evaluated until it has one; AssertionError
        naming `what` when `timeout` passes first, with the value of `shown` (what the page
        showed instead) or else the last value or error. An evaluation that fails counts as
        not yet: while the page navigates, its old document is gone before the new one runs."""
        value: Any = None
        try:
            async with asyncio.timeout(timeout):
                while True:
                    try:
                        if value := await self.evaluate(expression):
                            return value
                    except CdpError as error:
                        value = error
                    await asyncio.sleep(POLL_S)
        except TimeoutError:
            seen = await self.evaluate(shown) if shown else value
            raise AssertionError(f"{what}: not within {timeout:.0f} s; the page shows:\n{seen}") from None

    async def goto(self, url: str, timeout: float = START_TIMEOUT_S) -> None:
        """Open `url` and wait until the page and its scripts have loaded."""
        await self.send("Page.navigate", url=url)
        await self.wait_for(f"location.href.startsWith({url!r}) && document.readyState === 'complete'",
                            f"{url} loaded", timeout)

    async def click(self, selector: str) -> None:
        """A left click in the middle of the first element matching `selector`."""
        box = await self.evaluate(f"(() => {{ const r = document.querySelector({selector!r})"
                                  f"?.getBoundingClientRect(); return r && [r.x + r.width / 2, r.y + r.height / 2]; }})()")
        if not box:
            raise CdpError(f"nothing on the page matches {selector!r}")
        x, y = box
        for kind in ("mousePressed", "mouseReleased"):
            await self.send("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)

    async def press(self, key: str) -> None:
        """Type one printable character as a key press (keydown with its text, then keyup)."""
        code = f"Key{key.upper()}" if key.isalpha() else ""
        common = {"key": key, "code": code, "windowsVirtualKeyCode": ord(key.upper())}
        await self.send("Input.dispatchKeyEvent", type="keyDown", text=key, **common)
        await self.send("Input.dispatchKeyEvent", type="keyUp", **common)

    async def screenshot(self, path: Path) -> bytes:
        """Save the visible page as a PNG at `path`; returns its bytes."""
        data = base64.b64decode((await self.send("Page.captureScreenshot", format="png"))["data"])
        path.write_bytes(data)
        return data

    async def close(self) -> None:
        await self._ws.close()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader


async def _debugging_port(proc: subprocess.Popen[bytes], profile: Path) -> int:
    """The port chromium chose: the first line of DevToolsActivePort, once it is written."""
    marker = profile / "DevToolsActivePort"
    async with asyncio.timeout(START_TIMEOUT_S):
        while True:
            if proc.poll() is not None:
                raise CdpError(f"chromium exited with status {proc.returncode} before it opened its DevTools port")
            lines = marker.read_text(encoding="ascii").splitlines() if marker.exists() else []
            if lines and lines[0].strip().isdigit():
                return int(lines[0])
            await asyncio.sleep(POLL_S)


@contextlib.asynccontextmanager
async def chromium(profile: Path, *, width: int = 1280, height: int = 800) -> AsyncIterator[Page]:
    """Headless chromium with its own profile folder and a `width`x`height` viewport; yields
    the page of its first tab, and ends the browser afterwards."""
    executable = chromium_path()
    if executable is None:
        raise CdpError("no chromium on PATH")
    profile.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [executable, "--headless", "--no-sandbox", "--disable-dev-shm-usage", "--no-first-run",
         "--no-default-browser-check", "--disable-extensions", "--disable-background-networking",
         "--disable-component-update", "--mute-audio", "--hide-scrollbars", f"--user-data-dir={profile}",
         f"--window-size={width},{height}", "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
         "about:blank"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port = await _debugging_port(proc, profile)
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/json/list") as answer:
                targets = await answer.json()
            url = next(t["webSocketDebuggerUrl"] for t in targets if t.get("type") == "page")
            async with session.ws_connect(url, max_msg_size=0) as ws:
                page = Page(ws)
                try:
                    await page.send("Page.enable")
                    await page.send("Emulation.setDeviceMetricsOverride", width=width, height=height,
                                    deviceScaleFactor=1, mobile=False)
                    yield page
                finally:
                    await page.close()
    finally:
        proc.terminate()
        try:
            await asyncio.to_thread(proc.wait, 10)
        except subprocess.TimeoutExpired:
            proc.kill()
            await asyncio.to_thread(proc.wait)
