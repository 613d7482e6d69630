"""The corral console: a Textual app over any `Backend` (embedded, remote, or a test fake).

Data flows one way. Two long-lived workers read the backend: one consumes `backend.events()`
and one polls `backend.status()` about once a second (sooner when an event says state
changed). They post messages to the app, which keeps the latest `Status` and publishes it
and each event on `status_signal` / `event_signal`; screens subscribe and draw. Operator
actions run the backend call in a worker of their own (`run_backend`), and one handler,
`on_worker_state_changed`, turns every failed worker into a notification. The two readers
never fail as workers: they report an outage once, keep retrying, and say when it is over.
A rejected configuration (an invalid edit of the watched file, or a reload anyone asked for)
is an error notification on whatever screen is open, so the operator sees it at once.

Nothing here blocks the event loop, and nothing here imports llama_cpp: the console uses only
the backend's data modules (errors, events, snapshot, memory); events are told apart by their
`type` tag, which is also what a remote backend receives over SSE.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from textual import work
from textual.app import App
from textual.message import Message
from textual.signal import Signal
from textual.worker import Worker, WorkerState

from corral.backend.errors import ConfigError
from corral.backend.events import wait_event
from corral.themes import DEFAULT_THEME, THEMES
from corral.themes.files import load_user_themes

from .commands import APP, bindings_for, checked_keymap
from .errors import describe_error
from .palette import CommandTableProvider
from .screens import ConfirmScreen, Conversation, DashboardScreen, HelpScreen, PullScreen
from .widgets.models_table import backing_models

if TYPE_CHECKING:
    from collections.abc import Mapping

    from textual.binding import Keymap

    from corral.backend.protocol import Backend
    from corral.backend.pull.status import PullStatus
    from corral.backend.events import Event
    from corral.backend.snapshot import ModelInfo, Status

# Events after which the table should show the backend's word at once, not at the next tick.
# Request events are left to the 1 Hz poll: a busy server sends hundreds a second.
REFRESH_ON = frozenset({"state", "loaded", "pin", "notice", "dropped", "config_applied", "pull_finished",
                        "removed"})
MIN_POLL_GAP_S = 0.1
REJECTED_REPEAT_S = 2.0  # the same rejection within this is one notification, not two
QUIT_STATUS_TIMEOUT_S = 1.0
RETRY_MIN_S, RETRY_MAX_S = 0.5, 10.0  # event stream resubscription backoff


class StatusUpdated(Message):
    """A fresh `Status` from the poll worker."""

    def __init__(self, status: Status) -> None:
        super().__init__()
        self.status = status


class BackendEvent(Message):
    """One event from the backend's event stream."""

    def __init__(self, event: Event) -> None:
        super().__init__()
        self.event = event


class CorralApp(App[None]):
    """The console. Build it with `create_app(backend)`."""

    CSS_PATH = Path(__file__).with_name("app.tcss")
    TITLE = "corral"
    BINDINGS = bindings_for(APP)
    MODES = {"dashboard": DashboardScreen}
    DEFAULT_MODE = "dashboard"
    COMMANDS = App.COMMANDS | {CommandTableProvider}

    def __init__(self, backend: Backend, *, theme: str | None = None,
                 keymap: Mapping[str, str] | None = None, themes_dir: Path | None = None,
                 clock: Callable[[], float] | None = None, poll_interval: float = 1.0) -> None:
        super().__init__()
        self.backend = backend
        self.clock: Callable[[], float] = clock or time.time
        self.poll_interval = poll_interval
        self.status: Status | None = None
        self.status_signal: Signal[Status] = Signal(self, "status")
        self.event_signal: Signal[Event] = Signal(self, "event")
        self.keymap: dict[str, str] = {}
        self._wake = asyncio.Event()
        self._last_seq = 0
        self._status_error: str | None = None
        self._events_error: str | None = None
        self._last_rejection: tuple[str, float] = ("", 0.0)  # message, monotonic time
        self.conversations: dict[str, Conversation] = {}
        self.pull_status: PullStatus | None = None  # the console's running pull (PullScreen shows it)
        for item in THEMES:
            self.register_theme(item)
        user = load_user_themes(themes_dir, set(self.available_themes)) if themes_dir else None
        for item in user.themes if user else ():
            self.register_theme(item)
        self.theme_cycle = [item.name for item in (*THEMES, *(user.themes if user else ()))]  # what `t` steps through
        self.theme_problems = user.problems if user else []  # notified once the app runs
        name = theme or DEFAULT_THEME
        if name not in self.available_themes:
            known = ", ".join(sorted(self.available_themes))
            raise ConfigError(f"console.theme = {name!r}: unknown theme; available themes: {known}")
        self.theme = name
        if keymap:
            self.set_keymap(checked_keymap(keymap))
        self.sub_title = backend.label if backend.kind != "remote" else f"attached to {backend.label}"

    # -- startup and the two readers ---------------------------------------------------------

    def on_mount(self) -> None:
        for problem in self.theme_problems:  # a broken theme file costs that theme, never the console
            self.notify(problem, title="theme file left out", severity="error", timeout=20)
        self._consume_events()
        self._poll_status()

    @work(exclusive=True, group="events", exit_on_error=False, name="event stream")
    async def _consume_events(self) -> None:
        """Forward every event to the app.

        The first subscription replays what the backend still holds (after_seq=0), so loads
        begun before the console opened show in its log. A broken stream (a remote server
        going away) is reported once and resubscribed after the last event seen, with a
        growing pause; the backend's replay ring fills the gap. The worker ends only when
        the backend ends the stream (it is closing).
        """
        delay = RETRY_MIN_S
        while True:
            try:
                async for event in self.backend.events(self._last_seq):
                    if self._events_error is not None:
                        self._events_error = None
                        self.notify("receiving events again", title="event stream", timeout=3)
                    delay = RETRY_MIN_S
                    if event.seq:
                        self._last_seq = event.seq
                    elif self._last_seq == 0 and getattr(event, "type", "") == "dropped":
                        continue  # history older than the replay ring, not events we missed
                    self.post_message(BackendEvent(event))
                return
            except Exception as error:  # noqa: BLE001 - reported, then retried
                message = describe_error(error)
                if message != self._events_error:
                    self._events_error = message
                    self.notify(message, title="event stream lost", severity="error",
                                timeout=8, markup=False)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)

    @work(exclusive=True, group="status", exit_on_error=False, name="status poll")
    async def _poll_status(self) -> None:
        """Fetch status every `poll_interval` seconds, or at once when woken by an event.

        A failed poll is reported once (not every second) and the loop goes on, so the
        console recovers by itself when a remote server comes back.
        """
        loop = asyncio.get_running_loop()
        while True:
            self._wake.clear()
            started = loop.time()
            try:
                status = await self.backend.status()
            except Exception as error:  # noqa: BLE001 - every failure becomes a notice
                message = describe_error(error)
                if message != self._status_error:
                    self._status_error = message
                    self.notify(message, title="status unavailable", severity="error",
                                timeout=8, markup=False)
            else:
                if self._status_error is not None:
                    self._status_error = None
                    self.notify("status is back", title=self.backend.label, timeout=3)
                self.post_message(StatusUpdated(status))
            await wait_event(self._wake, self.poll_interval)
            # woken early by a burst of events: still at most one fetch per MIN_POLL_GAP_S
            await asyncio.sleep(max(0.0, MIN_POLL_GAP_S - (loop.time() - started)))

    def on_status_updated(self, message: StatusUpdated) -> None:
        self.status = message.status
        self.status_signal.publish(message.status)

    def on_backend_event(self, message: BackendEvent) -> None:
        event: Any = message.event
        kind = getattr(event, "type", "")
        self.event_signal.publish(event)
        if kind in REFRESH_ON:
            self._wake.set()
        if kind == "config_rejected":
            self.notify_rejected(event.error)

    def notify_rejected(self, message: str) -> None:
        """Say that a configuration was refused, once: a reload the console asked for fails
        both as its worker's error and as the `config_rejected` event, in either order."""
        now = time.monotonic()
        last, at = self._last_rejection
        self._last_rejection = (message, now)
        if message == last and now - at < REJECTED_REPEAT_S:
            return
        self.notify(message, title="config rejected: nothing changed", severity="error",
                    timeout=10, markup=False)

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        """The one place failures become notifications (Harlequin style)."""
        worker = event.worker
        if event.state == WorkerState.ERROR and isinstance(worker.error, ConfigError):
            self.notify_rejected(describe_error(worker.error))
        elif event.state == WorkerState.ERROR and worker.error is not None:
            self.notify(describe_error(worker.error), title=f"{worker.name} failed",
                        severity="error", timeout=10, markup=False)
        elif event.state == WorkerState.SUCCESS and worker.group == "events":
            self.notify("the backend's event stream ended; the table still refreshes",
                        title="event stream", severity="warning")

    # -- what the operator can do -------------------------------------------------------------

    @property
    def models(self) -> tuple[ModelInfo, ...]:
        """The models of the latest status (empty before the first poll)."""
        return self.status.models if self.status is not None else ()

    def run_backend(self, name: str, call: Callable[[], Awaitable[Any]]) -> Worker[Any]:
        """Await `call()` in a worker named `name`; a failure becomes a notification, and
        the status is fetched again when it finishes."""

        async def run() -> Any:
            try:
                return await call()
            finally:
                self._wake.set()

        return self.run_worker(run(), name=name, group="backend", exit_on_error=False)

    def load_model(self, name: str) -> Worker[Any]:
        return self.run_backend(f"load {name}", lambda: self.backend.load(name))

    def evict_model(self, name: str, *, force: bool = False) -> Worker[Any]:
        return self.run_backend(f"evict {name}", lambda: self.backend.evict(name, force=force))

    def pin_model(self, name: str, pinned: bool) -> Worker[Any]:
        verb = "pin" if pinned else "unpin"
        return self.run_backend(f"{verb} {name}", lambda: self.backend.pin(name, pinned))

    def reload_config(self) -> Worker[Any]:
        """Make the backend read its config file again, naming the console as the source."""
        return self.run_backend("reload config", lambda: self.backend.reload_config("console"))

    def rollback_config(self, number: int) -> Worker[Any]:
        """Apply version `number` again; the backend writes it back to the file."""
        return self.run_backend(f"rollback to version {number}",
                                lambda: self.backend.rollback_config(number, "console"))

    def pull_model(self, source: str, name: str | None = None) -> Worker[Any]:
        """Pull `source` in a worker that outlives the pull dialog; `pull_status` follows it."""

        async def pull() -> None:
            try:
                async for status in self.backend.pull(source, name=name):
                    self.pull_status = status
                if self.pull_status is not None and self.pull_status.model:
                    self.notify(f"{self.pull_status.model} is in the catalog", title="pulled", timeout=5)
            finally:
                self.pull_status = None

        return self.run_backend(f"pull {source}", pull)

    def cancel_pull(self, pull_id: str) -> Worker[Any]:
        return self.run_backend("cancel pull", lambda: self.backend.cancel_pull(pull_id))

    def action_pull(self) -> None:
        if not isinstance(self.screen, PullScreen):
            self.push_screen(PullScreen())

    async def _unload_all(self) -> None:
        unload_all = getattr(self.backend, "unload_all", None)
        if callable(unload_all):
            await unload_all()
            return
        for model in backing_models(self.models):  # a backend without unload_all: evict one by one
            if model.loaded:
                await self.backend.evict(model.name, force=True)

    def action_unload_all(self) -> None:
        loaded = [m.name for m in backing_models(self.models) if m.loaded]
        if not loaded:
            self.notify("Nothing is loaded.", severity="warning")
            return

        def answered(yes: bool | None) -> None:
            if yes:
                self.run_backend("unload all", self._unload_all)

        self.push_screen(ConfirmScreen(f"Unload all {len(loaded)} loaded model(s)?",
                                       title="Unload all", yes_label="Unload",
                                       detail=", ".join(loaded)), answered)

    def conversation(self, model: str) -> Conversation:
        """The prompt screen's conversation with `model`, kept for the whole session."""
        return self.conversations.setdefault(model, Conversation(model))

    def action_refresh_status(self) -> None:
        self._wake.set()

    def action_next_theme(self) -> None:
        names = self.theme_cycle
        index = names.index(self.theme) if self.theme in names else -1
        self.theme = names[(index + 1) % len(names)]
        self.notify(f"theme: {self.theme}", timeout=2)

    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen())

    async def action_quit(self) -> None:
        """Quit; while requests are in flight, ask first (ctrl+q in that dialog quits)."""
        if isinstance(self.screen, ConfirmScreen) and self.screen.id == "confirm-quit":
            self.exit()
            return
        self._confirm_quit()

    @work(exclusive=True, group="quit", exit_on_error=False, name="quit")
    async def _confirm_quit(self) -> None:
        models = self.models
        try:  # the last poll may be a second old: ask once more, briefly
            status = await asyncio.wait_for(self.backend.status(), QUIT_STATUS_TIMEOUT_S)
            models = status.models
        except Exception:  # noqa: BLE001 - a dead backend must not stop a quit
            pass
        busy = [m for m in backing_models(models) if m.in_flight > 0]
        if not busy:
            self.exit()
            return
        count = sum(m.in_flight for m in busy)
        names = ", ".join(m.name for m in busy)
        if self.backend.kind == "remote":
            detail = "They keep running on the server."
        else:
            detail = "Quitting stops the embedded backend and cuts them off."
        answer = await self.push_screen_wait(ConfirmScreen(
            f"{count} request(s) in flight ({names}). Quit anyway?", title="Quit",
            yes_label="Quit", detail=detail, id="confirm-quit"))
        if answer:
            self.exit()

    # -- keymap -------------------------------------------------------------------------------

    def set_keymap(self, keymap: Keymap) -> None:
        """Remap commands by id (`{"corral.load": "L"}`); the help screen shows the result."""
        self.keymap = dict(keymap)
        super().set_keymap(keymap)

    def update_keymap(self, keymap: Keymap) -> None:
        self.keymap = {**self.keymap, **keymap}
        super().update_keymap(keymap)


def create_app(backend: Backend, *, theme: str | None = None, keymap: Mapping[str, str] | None = None,
               themes_dir: Path | None = None,
               clock: Callable[[], float] | None = None, poll_interval: float = 1.0) -> CorralApp:
    """Build the console for `backend`. `theme` and `keymap` come from the config's [console]
    section (an unknown theme or command id is a ConfigError naming the key); `themes_dir`
    holds the user's theme files (themes/files.py), which `theme` may name; `clock` (unix
    seconds) drives relative times such as "last used", so tests can freeze it;
    `poll_interval` is the status refresh period."""
    return CorralApp(backend, theme=theme, keymap=keymap, themes_dir=themes_dir, clock=clock,
                     poll_interval=poll_interval)
