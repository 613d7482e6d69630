"""The config screen: versions, reload, rollback, and rejected configurations."""

from __future__ import annotations

from textual.pilot import Pilot
from textual.widgets import DataTable

from corral.backend.events import ConfigRejected
from corral.console.app import CorralApp
from corral.console.screens import ConfigScreen, ConfirmScreen, DashboardScreen
from corral.console.widgets import EventLog
from console_support import (SIZE, log_text, make_app, notifications, open_config, press_to_row, ready,
                             reload_once, versions_shown, wait_for)


def version_detail(app: CorralApp) -> str:
    return str(app.screen.query_one("#version-detail").render())


def log_words(app: CorralApp) -> str:
    """The event log's text with whitespace folded (lines wrap), from whichever screen is open."""
    [dashboard] = [screen for screen in app.screen_stack if isinstance(screen, DashboardScreen)]
    log = dashboard.query_one(EventLog)
    return " ".join(" ".join(strip.text for strip in log.lines).split())


async def select_version(pilot: Pilot, number: str) -> None:
    await press_to_row(pilot, pilot.app.screen.query_one("#versions", DataTable), number)


async def ask_rollback(pilot: Pilot, number: str) -> None:
    """Select version `number` and press `b`: the confirm dialog opens."""
    await select_version(pilot, number)
    await pilot.press("b")
    await wait_for(pilot, lambda: isinstance(pilot.app.screen, ConfirmScreen))


async def test_config_screen_lists_versions_and_r_reloads_a_new_one() -> None:
    app, backend = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await open_config(pilot)
        assert versions_shown(app) == [("1", "--:--:--", "start", "no changes")]
        assert "version 1" in version_detail(app) and "(running)" in version_detail(app)
        await reload_once(pilot)
        number, _, source, changes = versions_shown(app)[0]
        assert (number, source, changes) == ("2", "console", "defaults.keep_alive: 300.0 → 60.0")
        # the cursor was on the newest version, so it follows the new newest and shows its diff
        assert "version 2" in version_detail(app)
        assert "defaults.keep_alive: 300.0 → 60.0" in version_detail(app)
        backend.reload_diff = ("budgets.max_loaded: 3 → 2", "models[qwen]: added")
        await select_version(pilot, "1")
        await pilot.press("r")
        await wait_for(pilot, lambda: len(versions_shown(app)) == 3)
        assert versions_shown(app)[0][3] == "budgets.max_loaded: 3 → 2; +1 more"
        assert "version 1" in version_detail(app)  # off the newest, the cursor stays put
        assert "config v3 applied, from console budgets.max_loaded: 3 → 2; models[qwen]: added" in log_words(app)
        await pilot.press("escape")
        await wait_for(pilot, lambda: isinstance(app.screen, DashboardScreen))
        assert "config v3 applied, from console" in log_text(app)


async def test_config_screen_follows_a_change_made_elsewhere() -> None:
    """A reload from anywhere (the file watcher, corral reload, the API) shows up by itself."""
    app, backend = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await open_config(pilot)
        await backend.reload_config("file change")
        await wait_for(pilot, lambda: len(versions_shown(app)) == 2)
        assert versions_shown(app)[0][2] == "file change"


async def test_a_rejected_reload_notifies_once_and_is_logged() -> None:
    app, backend = make_app()
    backend.reload_error = "defaults.n_ctx = 'lots': expected an integer"
    async with app.run_test(size=SIZE) as pilot:
        await open_config(pilot)
        await pilot.press("r")
        rejected = "config rejected: nothing changed: defaults.n_ctx = 'lots': expected an integer"
        await wait_for(pilot, lambda: rejected in notifications(app))
        await wait_for(pilot, lambda: "config rejected, from console: defaults.n_ctx = 'lots'" in log_words(app))
        await pilot.pause(0.1)
        # the worker's ConfigError and the config_rejected event are one notification
        assert notifications(app).count(rejected) == 1
        assert len(versions_shown(app)) == 1


async def test_an_invalid_file_edit_is_notified_on_the_dashboard() -> None:
    app, backend = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        backend.publish(ConfigRejected(source="file change", error="unknown key 'budget'; did you mean 'budgets'?"))
        await wait_for(pilot, lambda: "config rejected, from file change: unknown key 'budget'" in log_text(app))
        assert ("config rejected: nothing changed: unknown key 'budget'; did you mean 'budgets'?"
                in notifications(app))


async def test_rollback_asks_then_applies_the_selected_version() -> None:
    app, backend = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await open_config(pilot)
        await reload_once(pilot)
        await pilot.press("b")  # the newest is the running one: nothing to roll back to
        await wait_for(pilot, lambda: any("Version 2 is the running configuration" in n for n in notifications(app)))
        assert isinstance(app.screen, ConfigScreen)
        await ask_rollback(pilot, "1")
        assert "Roll back to version 1?" in str(app.screen.query_one("#confirm-question").render())
        await pilot.press("n")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfigScreen))
        await pilot.pause(0.05)
        assert len(versions_shown(app)) == 2
        await pilot.press("b")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.press("y")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfigScreen) and len(versions_shown(app)) == 3)
        number, _, source, _ = versions_shown(app)[0]
        assert (number, source) == ("3", "console (rollback to 1)")


async def test_rollback_to_a_version_no_longer_kept_says_so() -> None:
    app, backend = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await open_config(pilot)
        await reload_once(pilot)
        del backend._versions[0]  # the backend dropped it meanwhile
        await ask_rollback(pilot, "1")
        await pilot.press("y")
        await wait_for(pilot, lambda: "rollback to version 1 failed: config version 1 does not exist"
                       in notifications(app))
