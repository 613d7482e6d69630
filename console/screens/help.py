"""The help screen: the command table, with the keys in force (after any user keymap)."""

from __future__ import annotations

from collections.abc import Mapping

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import DataTable, Static

from ..commands import COMMANDS, Command


def key_label(app: object, command: Command, keymap: Mapping[str, str]) -> str:
    """The key(s) that run `command` now, as the footer shows them."""
    keys = keymap.get(command.id, command.key)
    display = getattr(app, "get_key_display", None)
    labels = []
    for key in keys.split(","):
        key = key.strip()
        labels.append(display(Binding(key, command.action)) if display else key)
    return ", ".join(labels)


class HelpScreen(ModalScreen[None]):
    """Lists every command: its key, its name (… when it asks first), what it does."""

    BINDINGS = [
        Binding("escape,q,question_mark", "close", "Close", id="corral.help.close"),
    ]

    def compose(self) -> ComposeResult:
        with Vertical(id="help-box", classes="dialog-box") as box:
            box.border_title = "corral — keys"
            box.border_subtitle = "esc to close"
            yield DataTable(id="help-table", cursor_type="row", zebra_stripes=True)
            yield Static("… asks first.  [b]ctrl+p[/b] finds any command, [b]tab[/b] moves focus, "
                         "[b]ctrl+q[/b] quits from anywhere.", id="help-footnote")

    def on_mount(self) -> None:
        table = self.query_one("#help-table", DataTable)
        table.add_column("key", key="key")
        table.add_column("on", key="scope")
        table.add_column("command", key="command")
        table.add_column("what it does", key="help")
        keymap: Mapping[str, str] = getattr(self.app, "keymap", {})
        for command in COMMANDS:
            name = command.description + ("…" if command.confirm else "")
            table.add_row(key_label(self.app, command, keymap), command.scope, name,
                          command.help or command.description, key=command.id)
        table.focus()

    def action_close(self) -> None:
        self.dismiss(None)
