"""The app around the screens: quitting, its two backend readers (status poll and event
stream) when they fail, what importing it loads, and the fake backend the console tests use."""

from __future__ import annotations

import subprocess
import sys

from corral.console.screens import ConfirmScreen, DashboardScreen
from console_support import SIZE, log_text, make_app, notifications, ready, select, state, wait_for
from fake_backend import FIXED_NOW, FakeBackend


async def test_quit_without_requests_exits_at_once() -> None:
    app, _ = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await pilot.press("q")
        await wait_for(pilot, lambda: not app.is_running)


async def test_quit_with_a_request_in_flight_asks_first() -> None:
    app, backend = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        backend.set_in_flight("gemma-3-270m", 2)
        await wait_for(pilot, lambda: state(app, "gemma-3-270m") == "busy")
        await pilot.press("q")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        assert "2 request(s) in flight (gemma-3-270m)" in str(app.screen.query_one("#confirm-question").render())
        await pilot.press("n")
        await wait_for(pilot, lambda: isinstance(app.screen, DashboardScreen))
        assert app.is_running
        await pilot.press("q")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.press("y")
        await wait_for(pilot, lambda: not app.is_running)


async def test_a_failing_status_poll_is_reported_once_and_recovers() -> None:
    backend = FakeBackend()
    real_status = backend.status
    failures = {"left": 3}

    async def flaky_status():
        if failures["left"]:
            failures["left"] -= 1
            raise ConnectionError("server at http://x:8000 is not answering")
        return await real_status()

    backend.status = flaky_status  # type: ignore[method-assign]
    app, _ = make_app(backend, poll_interval=0.01)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        errors = [n for n in notifications(app) if "status unavailable" in n]
        assert errors == ["status unavailable: ConnectionError: server at http://x:8000 is not answering"]


async def test_a_broken_event_stream_is_reported_and_resubscribed() -> None:
    backend = FakeBackend()
    real_events = backend.events
    calls: list[int | None] = []

    def flaky_events(after_seq: int | None = None):
        calls.append(after_seq)
        if len(calls) == 1:
            async def broken():
                raise ConnectionError("SSE stream closed by peer")
                yield  # pragma: no cover - makes this an async generator
            return broken()
        return real_events(after_seq)

    backend.events = flaky_events  # type: ignore[method-assign]
    app, _ = make_app(backend)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await wait_for(pilot, lambda: backend.subscribers == 1)
        assert calls == [0, 0]
        assert "event stream lost: ConnectionError: SSE stream closed by peer" in notifications(app)
        await select(pilot, "tiny-llama")
        await pilot.press("l")
        await wait_for(pilot, lambda: "loading → ready" in log_text(app))


def test_importing_the_console_does_not_import_llama_cpp() -> None:
    code = (
        "import sys\n"
        "import corral.console.app\n"
        "bad = sorted(m for m in sys.modules if m == 'llama_cpp' or m.startswith('llama_cpp.')"
        " or m in ('corral.backend.engine', 'corral.backend.manager', 'corral.backend.llamalog'))\n"
        "print(','.join(bad))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""


def test_fake_backend_is_deterministic() -> None:
    import asyncio

    async def run() -> list[tuple[str, int, float]]:
        backend = FakeBackend()
        stream = backend.events(after_seq=0)
        await backend.load("tiny-llama")
        events = []
        async for event in stream:
            events.append((event.type, event.seq, event.ts))
            if event.type == "state" and event.new == "ready":
                break
        await backend.aclose()
        return events

    from corral.backend.protocol import Backend

    assert isinstance(FakeBackend(), Backend)
    first, second = asyncio.run(run()), asyncio.run(run())
    assert first == second
    assert {ts for _, _, ts in first} == {FIXED_NOW}
