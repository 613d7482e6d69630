"""Themes, the one command table (bindings, help, palette) and keymaps."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from corral.backend.errors import ConfigError
from corral.console.app import CorralApp, create_app
from corral.console.commands import COMMANDS, bindings_for
from corral.console.screens import ConfigScreen, DashboardScreen, DetailsScreen, HelpScreen, PromptScreen, RequestsScreen
from corral.console.screens.fleet import FleetScreen
from corral.themes import THEMES
from console_support import SIZE, make_app, open_prompt, ready, select, state, table, wait_for
from fake_backend import FakeBackend


async def test_t_cycles_the_themes() -> None:
    app, _ = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        names = [theme.name for theme in THEMES]
        assert app.theme == "corral-dark" == names[0]
        seen = []
        for _ in names:
            await pilot.press("t")
            await pilot.pause()
            seen.append(app.theme)
        assert seen == names[1:] + names[:1]


async def test_a_theme_switch_recolours_the_table() -> None:
    app, _ = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        before = table(app)._cells["gemma-3-270m"]["state"].style
        await pilot.press("t")
        await wait_for(pilot, lambda: table(app)._cells["gemma-3-270m"]["state"].style != before)


def test_unknown_theme_is_a_config_error_naming_the_key() -> None:
    with pytest.raises(ConfigError, match="console.theme = 'nope': unknown theme; available themes: .*corral-contrast"):
        create_app(FakeBackend(), theme="nope")  # type: ignore[arg-type]


async def test_app_starts_with_the_theme_asked_for() -> None:
    app, _ = make_app(theme="corral-light")
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        assert app.theme == "corral-light"


def test_cli_refuses_a_bad_console_config_naming_the_key(tmp_path: Path) -> None:
    config = tmp_path / "corral.toml"
    config.write_text('include_default_model = false\n[console]\ntheme = "neon"\n', encoding="utf-8")
    result = subprocess.run([sys.executable, "-m", "corral.console.cli", "--config", str(config)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "console.theme = 'neon': unknown theme" in result.stderr


# -- the command table ------------------------------------------------------------------------


def test_one_command_table_feeds_the_bindings() -> None:
    for scope in ("dashboard", "prompt", "config", "requests", "fleet", "details"):
        ids = [binding.id for binding in bindings_for(scope)]
        assert ids == [command.id for command in COMMANDS if command.scope == scope]
    assert DashboardScreen.BINDINGS == bindings_for("dashboard")
    assert PromptScreen.BINDINGS == bindings_for("prompt")
    assert ConfigScreen.BINDINGS == bindings_for("config")
    assert RequestsScreen.BINDINGS == bindings_for("requests")
    assert FleetScreen.BINDINGS == bindings_for("fleet")
    keys = {command.id: command.key for command in COMMANDS}
    assert keys == {
        "corral.load": "l", "corral.evict": "e", "corral.pin": "p", "corral.unload_all": "u",
        "corral.prompt": "enter", "corral.details": "d", "corral.filter": "/",
        "corral.refresh": "r", "corral.help": "question_mark", "corral.quit": "q",
        "corral.theme": "t", "corral.prompt.stop": "ctrl+c", "corral.prompt.back": "escape",
        "corral.prompt.clear": "ctrl+l", "corral.prompt.mode": "ctrl+t", "corral.session": "s",
        "corral.config": "c", "corral.pull": "g",
        "corral.config.reload": "r", "corral.config.rollback": "b", "corral.config.back": "escape",
        "corral.requests": "w", "corral.requests.cancel": "x", "corral.requests.back": "escape",
        "corral.fleet.load": "l", "corral.fleet.evict": "e", "corral.fleet.pin": "p",
        "corral.details.logs": "l",
    }
    [stop] = [b for b in bindings_for("prompt") if b.id == "corral.prompt.stop"]
    assert stop.priority  # Input binds ctrl+c to copy; stop must win
    assert CorralApp.BINDINGS == []  # no single-letter key at app level: screens scope them


async def test_help_lists_the_command_table() -> None:
    app, _ = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await pilot.press("question_mark")
        await wait_for(pilot, lambda: isinstance(app.screen, HelpScreen))
        help_table = app.screen.query_one("#help-table")
        rows = [help_table.get_row(command.id) for command in COMMANDS]
        assert [str(row[2]).rstrip("…") for row in rows] == [c.description for c in COMMANDS]
        assert [str(row[0]) for row in rows] == ["l", "e", "p", "⏎", "d", "/", "s", "g", "u", "r", "t", "?", "q",
                                                 "c", "w", "^c", "esc", "^l", "^t", "l", "r", "b", "esc", "x", "esc",
                                                 "l", "e", "p"]
        assert [str(row[1]) for row in rows] == (["dashboard"] * 15 + ["prompt"] * 4 + ["details"] + ["config"] * 3
                                                 + ["requests"] * 2 + ["fleet"] * 3)
        assert str(help_table.get_row("corral.evict")[2]) == "Evict…"  # it asks first
        assert str(help_table.get_row("corral.load")[2]) == "Load"
        await pilot.press("escape")
        await wait_for(pilot, lambda: isinstance(app.screen, DashboardScreen))


async def test_command_palette_lists_the_command_table_and_runs_a_command() -> None:
    from textual.command import CommandPalette

    app, backend = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await select(pilot, "tiny-llama")
        await pilot.press("ctrl+p")
        await wait_for(pilot, lambda: isinstance(app.screen, CommandPalette))
        await pilot.press(*"load")
        await pilot.pause(0.3)
        await pilot.press("enter")
        await wait_for(pilot, lambda: state(app, "tiny-llama") == "ready")
        assert backend.calls == [("load", "tiny-llama")]


async def test_palette_offers_the_commands_of_the_screen_it_opened_over() -> None:
    from corral.console.palette import CommandTableProvider

    app, _ = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await open_prompt(pilot, "gemma-3-270m")
        provider = CommandTableProvider(app.screen)
        titles = [hit.text async for hit in provider.discover()]
        assert "Stop (^c)" in titles and "Theme (t)" in titles and "Quit (q)" in titles
        assert not any(title.startswith("Load") for title in titles)  # dashboard-only


async def test_keymap_remaps_a_command_by_id() -> None:
    app, backend = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        app.set_keymap({"corral.load": "L"})
        await select(pilot, "tiny-llama")
        await pilot.press("l")
        await pilot.pause(0.05)
        assert backend.calls == []
        await pilot.press("L")
        await wait_for(pilot, lambda: state(app, "tiny-llama") == "ready")
        await pilot.press("question_mark")
        await wait_for(pilot, lambda: isinstance(app.screen, HelpScreen))
        assert str(app.screen.query_one("#help-table").get_row("corral.load")[0]) == "L"


async def test_keymap_from_config_is_applied_at_start_and_checked() -> None:
    app, backend = make_app(keymap={"corral.load": "L", "corral.details": "i, f3"})
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await select(pilot, "tiny-llama")
        await pilot.press("l")
        await pilot.pause(0.05)
        assert backend.calls == []
        await pilot.press("L")
        await wait_for(pilot, lambda: state(app, "tiny-llama") == "ready")
        await pilot.press("f3")
        await wait_for(pilot, lambda: isinstance(app.screen, DetailsScreen))
    with pytest.raises(ConfigError, match="console.keymap: unknown command id 'corral.lod'"):
        make_app(keymap={"corral.lod": "L"})
