"""The command palette's corral commands (ctrl+p), fed by the command table.

The palette lists the commands that act on the screen it was opened over (its `SCOPE`:
dashboard, prompt or config) plus the app-wide ones (`app.` actions: theme, help, unload
all, quit), each with the key that runs it now, after any user keymap. Choosing one runs
the same action its key would, on the same screen.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial

from textual.command import DiscoveryHit, Hit, Hits, Provider

from .commands import COMMANDS, Command
from .screens.help import key_label


class CommandTableProvider(Provider):
    """One palette entry per applicable row of the command table."""

    def _commands(self) -> Iterator[Command]:
        scope = getattr(self.screen, "SCOPE", None)
        for command in COMMANDS:
            if command.scope == scope or command.action.startswith("app."):
                yield command

    def _title(self, command: Command) -> str:
        keys = key_label(self.app, command, getattr(self.app, "keymap", {}))
        return f"{command.description} ({keys})"

    async def _run(self, command: Command) -> None:
        await self.screen.run_action(command.action)

    async def discover(self) -> Hits:
        for command in self._commands():
            yield DiscoveryHit(self._title(command), partial(self._run, command), help=command.help)

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        for command in self._commands():
            title = self._title(command)
            score = max(matcher.match(title), matcher.match(command.help) * 0.5)
            if score > 0:
                yield Hit(score, matcher.highlight(title), partial(self._run, command), help=command.help)
