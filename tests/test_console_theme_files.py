"""User themes as TOML files in the config folder's themes/: loaded beside the built-in
ones, listed by `t` and the palette; a broken file is a notification naming the file and
the field, never a crash."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from textual.theme import ThemeProvider

from corral.themes import THEMES
from corral.themes.files import load_theme_file, load_user_themes
from console_support import SIZE, make_app, notifications, ready

NIGHT = '''
name = "solarized-night"
primary = "#268BD2"
secondary = "#2AA198"
accent = "#B58900"
foreground = "#EEE8D5"
background = "#002B36"
surface = "#073642"
panel = "#0A4050"
success = "#859900"
warning = "#CB4B16"
error = "#DC322F"
dark = true
luminosity_spread = 0.2

[variables]
block-cursor-foreground = "#FDF6E3"
'''


def write(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def test_a_valid_file_is_a_theme_with_every_field(tmp_path: Path) -> None:
    theme = load_theme_file(write(tmp_path, "night.toml", NIGHT))
    assert (theme.name, theme.primary, theme.background, theme.dark) == ("solarized-night", "#268BD2", "#002B36", True)
    assert theme.luminosity_spread == 0.2 and theme.variables == {"block-cursor-foreground": "#FDF6E3"}


@pytest.mark.parametrize(("text", "says"), [
    ('sparkle = "#fff"\n' + NIGHT, "sparkle: unknown field; the fields are name, primary"),
    (NIGHT.replace('"#002B36"', '"#00GG36"'), "background = '#00GG36': not a colour"),
    (NIGHT.replace('"#B58900"', "7"), "accent = 7: not a colour"),
    (NIGHT.replace("dark = true", 'dark = "yes"'), "dark = 'yes': must be true or false"),
    (NIGHT.replace('"#FDF6E3"', "3"), "variables.block-cursor-foreground = 3: must be text"),
    (NIGHT.replace('name = "solarized-night"', ""), "name: required"),
    (NIGHT.replace('primary = "#268BD2"', ""), "primary: required"),
    ('name = "x"\nprimary = "#fff\n', "not valid TOML"),
    ("name = 'corral-dark'\nprimary = '#fff'\n", "name = 'corral-dark': another theme has this name"),
], ids=["unknown-field", "bad-colour", "colour-not-text", "dark-not-bool", "variable-not-text", "no-name",
        "no-primary", "bad-toml", "taken-name"])
def test_a_broken_file_is_left_out_with_its_file_and_field_named(tmp_path: Path, text: str, says: str) -> None:
    bad = write(tmp_path, "bad.toml", text)
    write(tmp_path, "night.toml", NIGHT)
    loaded = load_user_themes(tmp_path, {theme.name for theme in THEMES})
    assert [theme.name for theme in loaded.themes] == ["solarized-night"]
    [problem] = loaded.problems
    assert problem.startswith(f"{bad}: ") and says in problem, problem


def test_no_folder_means_no_themes_and_no_problems(tmp_path: Path) -> None:
    loaded = load_user_themes(tmp_path / "absent")
    assert loaded.themes == [] and loaded.problems == []


async def test_user_themes_join_t_and_the_palette_and_a_broken_one_is_a_notification(tmp_path: Path) -> None:
    write(tmp_path, "night.toml", NIGHT)
    bad = write(tmp_path, "neon.toml", 'name = "neon"\nprimary = "glowing"\n')
    app, _ = make_app(themes_dir=tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        assert app.theme_cycle == [*(theme.name for theme in THEMES), "solarized-night"]
        seen = []
        for _ in range(len(app.theme_cycle)):
            await pilot.press("t")
            seen.append(app.theme)
        assert seen == [*app.theme_cycle[1:], app.theme_cycle[0]]
        assert "solarized-night" in [name for name, _ in ThemeProvider(app.screen).commands]
        assert "neon" not in app.available_themes
        [note] = [n for n in notifications(app) if n.startswith("theme file left out")]
        assert f"{bad}: primary = 'glowing': not a colour" in note


async def test_the_config_may_name_a_user_theme(tmp_path: Path) -> None:
    write(tmp_path, "night.toml", NIGHT)
    app, _ = make_app(theme="solarized-night", themes_dir=tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        assert app.theme == "solarized-night"


def test_the_console_finds_themes_beside_its_config_file(tmp_path: Path) -> None:
    """`corral --config FILE` reads FILE's folder's themes/ (checked by naming a user theme
    in [console], which fails when the theme is not found, before any backend starts)."""
    config = write(tmp_path, "corral.toml", 'include_default_model = false\n[console]\ntheme = "nowhere"\n')
    write(tmp_path / "themes", "night.toml", NIGHT)
    result = subprocess.run([sys.executable, "-m", "corral.console.cli", "--config", str(config)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "solarized-night" in result.stderr  # listed among the themes known
