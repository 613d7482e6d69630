"""What the console tests share: the app over FakeBackend (tests/fake_backend.py), waiting
for it under Pilot, moving its cursors, and reading what its screens show.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from textual.pilot import Pilot
from textual.widgets import DataTable

from corral.console.app import CorralApp, create_app
from corral.console.screens import ConfigScreen, DashboardScreen, PromptScreen
from corral.console.widgets import EventLog, ModelsTable
from fake_backend import FakeBackend


SIZE = (120, 40)


def make_app(backend: FakeBackend | None = None, **kw: object) -> tuple[CorralApp, FakeBackend]:
    backend = backend if backend is not None else FakeBackend()
    return create_app(backend, clock=backend.clock, **kw), backend  # type: ignore[arg-type]


async def wait_for(pilot: Pilot, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Let the app run until `predicate()` holds (the backend works in workers)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for the console")
        await pilot.pause(0.01)


def table(app: CorralApp) -> ModelsTable:
    return app.screen.query_one(ModelsTable)


def state(app: CorralApp, name: str) -> str:
    return table(app).cell_text(name, "state")


async def ready(pilot: Pilot) -> CorralApp:
    """Wait for the dashboard to show the first status."""
    app = pilot.app
    assert isinstance(app, CorralApp)
    await wait_for(pilot, lambda: isinstance(app.screen, DashboardScreen) and table(app).row_count > 0)
    return app


async def press_to_row(pilot: Pilot, rows: DataTable, key: str) -> None:
    """Move the cursor of `rows` to the row keyed `key` with the arrow keys, as an operator would."""
    target = rows.get_row_index(key)
    while rows.cursor_row != target:
        await pilot.press("down" if rows.cursor_row < target else "up")


async def select(pilot: Pilot, name: str) -> None:
    """Move the models table's cursor to `name`."""
    app = pilot.app
    assert isinstance(app, CorralApp)
    await press_to_row(pilot, table(app), name)
    assert table(app).selected is not None and table(app).selected.name == name


def log_text(app: CorralApp) -> str:
    return "\n".join(strip.text for strip in app.screen.query_one(EventLog).lines)


def notifications(app: CorralApp) -> list[str]:
    return [f"{n.title}: {n.message}" for n in app._notifications]


def transcript(app: CorralApp) -> list[str]:
    return [str(widget.render()) for widget in app.screen.query("#transcript Static")]


async def open_prompt(pilot: Pilot, model: str) -> PromptScreen:
    app = await ready(pilot)
    await select(pilot, model)
    await pilot.press("enter")
    await wait_for(pilot, lambda: isinstance(app.screen, PromptScreen))
    assert isinstance(app.screen, PromptScreen) and app.screen.model == model
    return app.screen


async def send(pilot: Pilot, text: str) -> None:
    await pilot.press(*text)
    await pilot.press("enter")


def details_text(app: CorralApp) -> str:
    """The details screen's text, whitespace folded."""
    import io

    from rich.console import Console

    console = Console(width=100, file=io.StringIO(), color_system=None)
    console.print(app.screen.query_one("#details-body").content)
    return " ".join(console.file.getvalue().split())


def versions_shown(app: CorralApp) -> list[tuple[str, ...]]:
    """The config screen's rows: (number, applied, source, changes)."""
    versions = app.screen.query_one("#versions")
    return [tuple(str(cell) for cell in versions.get_row_at(i)) for i in range(versions.row_count)]


async def open_config(pilot: Pilot) -> ConfigScreen:
    app = await ready(pilot)
    await pilot.press("c")
    await wait_for(pilot, lambda: isinstance(app.screen, ConfigScreen) and bool(app.screen.versions))
    assert isinstance(app.screen, ConfigScreen)
    return app.screen


async def reload_once(pilot: Pilot) -> None:
    """`r` on the config screen, and wait for the second version to show."""
    await pilot.press("r")
    await wait_for(pilot, lambda: len(versions_shown(pilot.app)) == 2)
