"""The one table of console commands.

Every command the operator can run is a row here. The table feeds the key bindings (each
`Binding` carries the command's `id`, so a user keymap, `[console] keymap` in the config,
remaps it through `App.set_keymap`), the footer (`show`), the help screen and the command
palette (ctrl+p). Screens ask for their bindings with `bindings_for(scope)`; a command acts
only on the screen its scope names, so single-letter keys never fire while the operator
types in the prompt screen's inputs.

An `action` is a Textual action string run on the node that owns the binding (the screen
of its scope); an `app.` prefix runs it on the app. Actions on the selected model live on
the dashboard, those on the selected config version on the config screen, the rest on the
app, which owns the backend workers.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from textual.binding import Binding

from corral.backend.errors import ConfigError

DASHBOARD = "dashboard"
PROMPT = "prompt"
CONFIG = "config"
REQUESTS = "requests"
FLEET = "fleet"
DETAILS = "details"
APP = "app"
SCOPES = (DASHBOARD, PROMPT, CONFIG, REQUESTS, FLEET, DETAILS)


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
    priority: bool = False  # wins over the focused widget's own binding of the same key

    @property
    def binding(self) -> Binding:
        return Binding(self.key, self.action, self.description, show=self.show, id=self.id,
                       tooltip=self.help or self.description, priority=self.priority)


COMMANDS: tuple[Command, ...] = (
    Command("corral.load", "l", "Load", "load",
            help="Load the selected model (retry if it failed)"),
    Command("corral.evict", "e", "Evict", "evict", confirm=True,
            help="Unload the selected model, or clear a failure"),
    Command("corral.pin", "p", "Pin/unpin", "toggle_pin",
            help="Pin or unpin: pinned models are never evicted"),
    Command("corral.prompt", "enter", "Prompt", "prompt",
            help="Prompt the selected model: chat, or completion where it has no chat template "
                 "(loads it if needed)"),
    Command("corral.details", "d", "Details", "details",
            help="Metadata, memory estimate vs measured, load time, latency percentiles"),
    Command("corral.filter", "/", "Filter", "filter", show=False,
            help="Filter the models table by name, state or quantization (esc clears)"),
    Command("corral.session", "s", "Session", "session_filter", show=False,
            help="Show only the event log lines of one session: its id or part of it (esc clears)"),
    Command("corral.pull", "g", "Pull", "app.pull", show=False,
            help="Pull a model from a URL or Hugging Face (hf://owner/repo:Q4_K_M) into a model folder"),
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
    Command("corral.config", "c", "Config", "config",
            help="Configuration versions: reload the file, roll back to an earlier version"),
    Command("corral.requests", "w", "Requests", "requests", show=False,
            help="Requests running and queued on every loaded model, live; cancel one from there"),
    # Textual's Input binds ctrl+c to copy: stop is a priority binding so it wins.
    Command("corral.prompt.stop", "ctrl+c", "Stop", "stop", scope=PROMPT, priority=True,
            help="Stop the answer being streamed"),
    Command("corral.prompt.back", "escape", "Stop/back", "back", scope=PROMPT,
            help="Stop the answer being streamed; when none is, back to the dashboard"),
    Command("corral.prompt.clear", "ctrl+l", "Clear", "clear_history", scope=PROMPT,
            help="Forget this model's conversation"),
    Command("corral.prompt.mode", "ctrl+t", "Chat/completion", "toggle_mode", scope=PROMPT,
            help="Switch between chat (the model's chat template) and completion (the text continued "
                 "as it is): a model without a template of its own opens in completion"),
    Command("corral.details.logs", "l", "Log", "logs", scope=DETAILS,
            help="llama.cpp's own lines of the model's loads and runs, newest last: why a load failed"),
    Command("corral.config.reload", "r", "Reload", "reload", scope=CONFIG,
            help="Read the config file again and apply what changed (a new version)"),
    Command("corral.config.rollback", "b", "Roll back", "rollback", scope=CONFIG, confirm=True,
            help="Apply the selected version again, as a new version, and write it to the file"),
    Command("corral.config.back", "escape", "Back", "back", scope=CONFIG,
            help="Back to the dashboard"),
    Command("corral.requests.cancel", "x", "Cancel request", "cancel", scope=REQUESTS, confirm=True,
            help="Cancel the selected request: its client gets finish reason \"cancelled\" and its slot is freed"),
    Command("corral.requests.back", "escape", "Back", "back", scope=REQUESTS,
            help="Back to the dashboard"),
    Command("corral.fleet.load", "l", "Load here", "load", scope=FLEET,
            help="Load the selected model on the selected node (fleet view)"),
    Command("corral.fleet.evict", "e", "Evict here", "evict", scope=FLEET, confirm=True,
            help="Evict the selected model from the selected node (fleet view)"),
    Command("corral.fleet.pin", "p", "Pin/unpin here", "toggle_pin", scope=FLEET,
            help="Pin or unpin the selected model on the selected node (fleet view)"),
)

COMMANDS_BY_ID: dict[str, Command] = {command.id: command for command in COMMANDS}


def bindings_for(scope: str) -> list[Binding]:
    """The bindings of every command whose scope is `scope`, in table order."""
    return [command.binding for command in COMMANDS if command.scope == scope]


def commands_for(scope: str | None = None) -> tuple[Command, ...]:
    """Commands of one scope (all of them when `scope` is None), in table order."""
    return tuple(c for c in COMMANDS if scope is None or c.scope == scope)


def checked_keymap(keymap: Mapping[str, str]) -> dict[str, str]:
    """A user keymap ready for `App.set_keymap`; an unknown command id is a `ConfigError`
    naming the config key, since the config's own validation cannot know the ids."""
    unknown = sorted(set(keymap) - set(COMMANDS_BY_ID))
    if unknown:
        raise ConfigError(f"console.keymap: unknown command id {', '.join(map(repr, unknown))}; "
                          f"known ids: {', '.join(COMMANDS_BY_ID)}")
    return {command_id: ",".join(part.strip() for part in keys.split(",") if part.strip())
            for command_id, keys in keymap.items()}
