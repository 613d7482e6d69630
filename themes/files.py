"""User themes: TOML files in the config folder's `themes/`, one Textual theme per file.

A file holds Textual's theme fields at its top level:

    name = "solarized-night"
    primary = "#268BD2"
    background = "#002B36"
    dark = true
    [variables]
    block-cursor-foreground = "#FDF6E3"

Every colour is checked with Textual's own parser, so a file that loads here cannot fail
later, when the theme is applied. A broken file is never fatal: `load_user_themes` returns
the themes that are good and, for each bad file, one line naming the file and the field.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from textual.color import Color, ColorParseError
from textual.theme import Theme

COLOURS = ("primary", "secondary", "accent", "foreground", "background", "surface", "panel", "success",
           "warning", "error", "boost")
NUMBERS = ("luminosity_spread", "text_alpha")
FIELDS = ("name", *COLOURS, "dark", *NUMBERS, "variables")


class ThemeFileError(ValueError):
    """A theme file that cannot become a theme; the message names the file and the field."""


@dataclass(frozen=True)
class UserThemes:
    themes: list[Theme]
    problems: list[str]  # one per file left out: "FILE: FIELD ...: what is wrong, what to do"


def load_user_themes(folder: Path, taken: set[str] | frozenset[str] = frozenset()) -> UserThemes:
    """Every `*.toml` in `folder` (in name order) that is a valid theme; `taken` are names a
    user theme may not reuse (the built-in ones). No folder: no themes, no problems."""
    themes: list[Theme] = []
    problems: list[str] = []
    try:
        files = sorted(folder.glob("*.toml"))
    except OSError as exc:
        return UserThemes([], [f"{folder}: cannot list the theme files: {exc.strerror}"])
    names = set(taken)
    for file in files:
        try:
            theme = load_theme_file(file)
            if theme.name in names:
                raise ThemeFileError(f"{file}: name = {theme.name!r}: another theme has this name; choose another")
        except ThemeFileError as exc:
            problems.append(str(exc))
            continue
        names.add(theme.name)
        themes.append(theme)
    return UserThemes(themes, problems)


def load_theme_file(file: Path) -> Theme:
    """The theme `file` describes; ThemeFileError naming the file and the field otherwise."""
    try:
        data = tomllib.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ThemeFileError(f"{file}: cannot read: {reason}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ThemeFileError(f"{file}: not valid TOML: {exc}") from None
    return theme_from_dict(data, str(file))


def theme_from_dict(data: dict[str, Any], where: str) -> Theme:
    unknown = [key for key in data if key not in FIELDS]
    if unknown:
        raise ThemeFileError(f"{where}: {unknown[0]}: unknown field; the fields are {', '.join(FIELDS)}")
    name = data.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ThemeFileError(f"{where}: name: required, the theme's name as text (name = \"my-theme\")")
    if "primary" not in data:
        raise ThemeFileError(f"{where}: primary: required, a colour (\"#268BD2\"); every other colour is optional")
    for key in COLOURS:
        if key in data:
            _check_colour(where, key, data[key])
    if "dark" in data and not isinstance(data["dark"], bool):
        raise ThemeFileError(f"{where}: dark = {data['dark']!r}: must be true or false")
    for key in NUMBERS:
        value = data.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1):
            raise ThemeFileError(f"{where}: {key} = {value!r}: must be a number from 0 to 1")
    variables = data.get("variables", {})
    if not isinstance(variables, dict):
        raise ThemeFileError(f"{where}: variables: must be a table of names and values ([variables])")
    for key, value in variables.items():
        if not isinstance(value, str):
            raise ThemeFileError(f"{where}: variables.{key} = {value!r}: must be text (a colour or a style)")
    return Theme(**{**data, "name": name.strip(), "variables": dict(variables)})


def _check_colour(where: str, key: str, value: Any) -> None:
    if isinstance(value, str):
        try:
            Color.parse(value)
            return
        except ColorParseError:
            pass
    raise ThemeFileError(f"{where}: {key} = {value!r}: not a colour; write \"#RRGGBB\", \"rgb(r, g, b)\" or a "
                         "colour name such as \"crimson\"")
