"""The one table of console commands.

Every command the operator can run is a row here. The table feeds the key bindings (each
`Binding` carries the command's `id`, so a user keymap can remap it with `App.set_keymap`),
the footer (`show`), the help screen, and later the command palette. Screens ask for their
bindings with `bindings_for(scope)`; a command acts only on the screen its scope names, so
single-letter keys never fire while the operator types in an input on another screen.

An `action` is a Textual action string run on the node that owns the binding (the
dashboard screen for scope "dashboard"); an `app.` prefix runs it on the app. Actions on the
selected model live on the screen, the rest on the app, which owns the backend workers.
"""

from __future__ import annotations

from dataclasses import dataclass

from textual.binding import Binding

DASHBOARD = "dashboard"
APP = "app"


@dataclass(frozen=True)
class Command:
    id: str  # stable id for user keymaps: "corral.load"
    key: str  # default key(s), Textual key names, comma-separated
    description: str  # short, for the footer
    action: str  # action run on the scope's node
    show: bool = True  # listed in the footer
    scope: str = DASHBOARD  # where the binding lives
    help: str = ""  # a longer line for the help screen and the palette
    confirm: bool = False  # asks before acting (destructive)

    @property
    def binding(self) -> Binding:
        return Binding(self.key, self.action, self.description, show=self.show, id=self.id,
                       tooltip=self.help or self.description)


COMMANDS: tuple[Command, ...] = (
    Command("corral.load", "l", "Load", "load",
            help="Load the selected model (retry if it failed)"),
    Command("corral.evict", "e", "Evict", "evict", confirm=True,
            help="Unload the selected model, or clear a failure"),
    Command("corral.pin", "p", "Pin/unpin", "toggle_pin",
            help="Pin or unpin: pinned models are never evicted"),
    Command("corral.unload_all", "u", "Unload all", "app.unload_all", confirm=True,
            help="Unload every loaded model"),
    Command("corral.refresh", "r", "Refresh", "app.refresh_status", show=False,
            help="Fetch fresh status from the backend now"),
    Command("corral.theme", "t", "Theme", "app.next_theme", show=False,
            help="Switch to the next theme"),
    Command("corral.help", "question_mark", "Help", "app.help",
            help="Show this list of keys"),
    Command("corral.quit", "q", "Quit", "app.quit",
            help="Quit (asks while requests are in flight)"),
)

COMMANDS_BY_ID: dict[str, Command] = {command.id: command for command in COMMANDS}


def bindings_for(scope: str) -> list[Binding]:
    """The bindings of every command whose scope is `scope`, in table order."""
    return [command.binding for command in COMMANDS if command.scope == scope]


def commands_for(scope: str | None = None) -> tuple[Command, ...]:
    """Commands of one scope (all of them when `scope` is None), in table order."""
    return tuple(c for c in COMMANDS if scope is None or c.scope == scope)
