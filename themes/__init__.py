"""corral's console themes: Textual `Theme` objects, data only.

The console's TCSS refers to theme `$variables` only (`$primary`, `$text-success`, ...), so
any theme here, or any of Textual's built-in themes, restyles the whole console. `THEMES` is
the order the `t` key cycles through; the first is the default.
"""

from __future__ import annotations

from textual.theme import Theme

CORRAL_DARK = Theme(
    name="corral-dark",
    primary="#4FA3E0",
    secondary="#3B6E8F",
    accent="#E5A44B",
    warning="#E5C07B",
    error="#E06C75",
    success="#7DC77A",
    foreground="#D8DEE9",
    background="#161B22",
    surface="#1E242C",
    panel="#262E38",
    dark=True,
)

CORRAL_LIGHT = Theme(
    name="corral-light",
    primary="#1F6FB2",
    secondary="#4C7A99",
    accent="#B25E00",
    warning="#A36B00",
    error="#C0392B",
    success="#2E7D32",
    foreground="#1F2328",
    background="#F6F8FA",
    surface="#FFFFFF",
    panel="#E3E8EE",
    dark=False,
)

# High contrast: pure black and white with saturated, clearly distinct state colours.
CORRAL_CONTRAST = Theme(
    name="corral-contrast",
    primary="#FFD700",
    secondary="#00BFFF",
    accent="#FF00FF",
    warning="#FFFF00",
    error="#FF3030",
    success="#00FF00",
    foreground="#FFFFFF",
    background="#000000",
    surface="#000000",
    panel="#1A1A1A",
    boost="#FFFFFF10",
    dark=True,
    luminosity_spread=0.25,
    text_alpha=1.0,
)

THEMES: list[Theme] = [CORRAL_DARK, CORRAL_LIGHT, CORRAL_CONTRAST]
DEFAULT_THEME = CORRAL_DARK.name

__all__ = ["CORRAL_CONTRAST", "CORRAL_DARK", "CORRAL_LIGHT", "DEFAULT_THEME", "THEMES"]
