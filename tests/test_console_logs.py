"""The log view: a model's llama.cpp lines one key from its details, following new ones."""

from __future__ import annotations

from textual.pilot import Pilot

from corral.console.app import CorralApp
from corral.console.screens import DetailsScreen, LogScreen
from corral.console.screens.logs import ModelLogView
from console_support import SIZE, make_app, ready, select, state, wait_for
from fake_backend import BROKEN_REASON


def shown(app: CorralApp) -> list[str]:
    return [f"{line.level} {line.text}" for line in app.screen.query_one(ModelLogView).shown]


def state_of(app: CorralApp, name: str) -> str:
    assert app.status is not None
    return next(m.state for m in app.status.models if m.name == name)


async def open_log(pilot: Pilot, model: str) -> LogScreen:
    app = pilot.app
    await select(pilot, model)
    await pilot.press("d")
    await wait_for(pilot, lambda: isinstance(app.screen, DetailsScreen))
    await pilot.press("l")
    await wait_for(pilot, lambda: isinstance(app.screen, LogScreen))
    assert isinstance(app.screen, LogScreen)
    return app.screen


async def test_why_a_load_failed_is_one_key_from_the_details() -> None:
    app, _ = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await select(pilot, "broken")
        await pilot.press("l")
        await wait_for(pilot, lambda: state(app, "broken") == "failed")
        await open_log(pilot, "broken")
        await wait_for(pilot, lambda: bool(shown(app)))
        assert shown(app)[0].startswith("corral loading /models/broken.gguf")
        assert shown(app)[-2] == f"error {BROKEN_REASON}"  # newest last: the error, then corral's line
        assert shown(app)[-1].startswith("corral load failed")
        await pilot.press("escape")
        await wait_for(pilot, lambda: isinstance(app.screen, DetailsScreen))


async def test_the_view_follows_a_load_that_starts_while_it_is_open() -> None:
    app, _ = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        screen = await open_log(pilot, "tiny-llama")
        note = screen.query_one("#logs-note")
        await wait_for(pilot, lambda: "no llama.cpp lines yet" in str(note.render()))
        assert shown(app) == []
        app.load_model("tiny-llama")
        await wait_for(pilot, lambda: len(shown(app)) == 6 and state_of(app, "tiny-llama") == "ready")
        assert "6 lines" in str(note.render())

