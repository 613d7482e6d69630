"""The requests screen under Pilot, over FakeBackend: `w` opens it from the dashboard, it lists
what runs and waits and follows the status poll, `x` cancels the selected request after a
confirm (the stream ends "cancelled", the event log names the console), and an idle console
asks the backend nothing for it."""

from __future__ import annotations

import asyncio

from textual.pilot import Pilot
from textual.widgets import DataTable, Static

from corral.backend.errors import NotFound
from corral.console.screens import ConfirmScreen, DashboardScreen, RequestsScreen
from corral.console.screens.requests import COLUMNS, CHROME, widths
from console_support import SIZE, log_text, make_app, notifications, ready, wait_for
from fake_backend import FakeBackend

MODEL = "gemma-3-270m"


def rows(app: object) -> list[tuple[str, ...]]:
    table = app.screen.query_one("#requests", DataTable)  # type: ignore[attr-defined]
    return [tuple(str(cell) for cell in table.get_row_at(i)) for i in range(table.row_count)]


def detail(app: object) -> str:
    return str(app.screen.query_one("#request-detail", Static).content)  # type: ignore[attr-defined]


async def open_requests(pilot: Pilot) -> RequestsScreen:
    app = await ready(pilot)
    await pilot.press("w")
    await wait_for(pilot, lambda: isinstance(app.screen, RequestsScreen))
    assert isinstance(app.screen, RequestsScreen)
    return app.screen


def test_columns_fit_80_and_share_wider_screens() -> None:
    for total in (80, 120):
        shares = widths(total)
        assert sum(shares.values()) + CHROME == total
        assert all(shares[key] >= width for key, _, width, _ in COLUMNS)
    assert widths(120)["request"] > widths(80)["request"]


async def test_w_lists_running_and_queued_requests_and_follows_the_poll() -> None:
    app, backend = make_app(poll_interval=0.05)
    backend.add_request("run-1", MODEL, api="anthropic", session_id="sess-a")
    backend.add_request("wait-1", MODEL, state="queued", api="ollama")
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_requests(pilot)
        await wait_for(pilot, lambda: len(screen.requests) == 2)
        assert rows(app) == [(MODEL, "anthropic", "sess-a", "run-1", "running", "3s", "40", "21.5"),
                             (MODEL, "ollama", "–", "wait-1", "queued 1", "3s", "0", "–")]
        assert "request run-1" in detail(app) and "session sess-a" in detail(app)
        await pilot.press("down")
        assert "queued, 1 in line" in detail(app)
        backend.add_request("run-2", "qwen2.5-0.5b-instruct", tokens=7)
        await wait_for(pilot, lambda: len(screen.requests) == 3)  # the next poll shows it
        assert rows(app)[1][3] == "wait-1"  # the cursor stayed on its request
        assert screen.selected is not None and screen.selected.request_id == "wait-1"
        await pilot.press("escape")
        await wait_for(pilot, lambda: isinstance(app.screen, DashboardScreen))


async def test_an_idle_console_does_not_ask_for_requests_every_poll() -> None:
    """With nothing in flight the view asks once, when it opens; the polls after it only tell
    it that nothing runs. A request showing up in a poll makes it ask again."""
    app, backend = make_app(poll_interval=0.05)
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_requests(pilot)
        polls: list[object] = []
        app.status_signal.subscribe(screen, polls.append)
        await wait_for(pilot, lambda: len(polls) >= 10)
        assert backend.calls.count(("requests",)) == 1
        assert detail(app) == "nothing running or queued"
        backend.add_request("run-1", MODEL)
        await wait_for(pilot, lambda: bool(screen.requests))
        assert backend.calls.count(("requests",)) >= 2


async def test_a_failing_backend_is_said_once_not_every_poll() -> None:
    app, backend = make_app(poll_interval=0.05)
    backend.add_request("run-1", MODEL)

    async def refused() -> list[object]:
        backend.calls.append(("requests",))
        raise NotFound("GET /api/requests: not found (a server older than this console)")

    backend.requests = refused  # type: ignore[method-assign]
    async with app.run_test(size=SIZE) as pilot:
        await open_requests(pilot)
        await wait_for(pilot, lambda: backend.calls.count(("requests",)) >= 5)
        assert sum("older than this console" in n for n in notifications(app)) == 1


async def test_x_asks_then_cancels_the_selected_request() -> None:
    app, backend = make_app(poll_interval=0.05)
    backend.add_request("run-1", MODEL)
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_requests(pilot)
        await wait_for(pilot, lambda: bool(screen.requests))
        await pilot.press("x")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.press("n")  # no: nothing is cancelled
        await wait_for(pilot, lambda: app.screen is screen)
        assert not [c for c in backend.calls if c[0] == "cancel_request"]
        await pilot.press("x")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.press("y")
        await wait_for(pilot, lambda: not screen.requests)
        assert ("cancel_request", "run-1", "console") in backend.calls
        assert detail(app) == "nothing running or queued"
        await pilot.press("x")  # nothing selected: said, not asked
        assert app.screen is screen


async def test_cancelling_a_streaming_answer_ends_it_as_cancelled() -> None:
    """A client's answer (an API request, say) cancelled from the requests screen: its stream
    ends with finish reason "cancelled" and the event log says the console did it."""
    app, backend = make_app(FakeBackend(token_delay=1.0), poll_interval=0.05)

    async def client() -> list[str | None]:
        return [chunk.finish_reason async for chunk in backend.complete(MODEL, "Once", request_id="cli-1",
                                                                         api="openai")]

    async with app.run_test(size=SIZE) as pilot:
        screen = await open_requests(pilot)
        answer = asyncio.create_task(client())
        await wait_for(pilot, lambda: [r.request_id for r in screen.requests] == ["cli-1"])
        assert rows(app)[0][1:5] == ("openai", "–", "cli-1", "running")
        await pilot.press("x")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.press("y")
        assert (await asyncio.wait_for(answer, 5))[-1] == "cancelled"
        await wait_for(pilot, lambda: not screen.requests)
        await pilot.press("escape")
        await wait_for(pilot, lambda: "request cli-1 cancelled by console" in log_text(app))
