"""The config screen: the backend's configuration versions, newest first, with reload and
rollback.

The table lists every version the backend keeps (number, when it was applied, where it came
from, its first change); under it the highlighted version's changes and the actions they
caused, in full. `r` makes the backend read its config file again and `b` applies the
highlighted version again (after a confirm); both run as the app's backend workers, so a
failure (an invalid file, a version no longer kept) becomes a notification carrying the
backend's message. The list is fetched when the screen opens and again whenever a version is
applied, by anyone: the file watcher, `corral reload`, the HTTP API or this screen, so an
edit of the watched file shows up here by itself. Over `corral attach` the versions come
without their settings and text, which this screen does not need.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, cast

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.containers import VerticalScroll
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Static

from ..commands import CONFIG, bindings_for
from ..errors import describe_error
from ..widgets.event_log import compact_diff
from ..widgets.gauges import format_clock
from .confirm import ConfirmScreen

if TYPE_CHECKING:
    from corral.backend.events import Event
    from corral.backend.versions import ConfigVersion

    from ..app import CorralApp

REFRESH_ON = frozenset({"config_applied"})
# (key, header, fixed width or None for auto)
COLUMNS: tuple[tuple[str, str, int | None], ...] = (
    ("number", "#", 4), ("applied", "applied", 8), ("source", "source", None), ("changes", "changes", None))


def format_when(ts: float) -> str:
    """The full local date and time of a version ("unknown" for a zero time)."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "unknown"


def version_detail(version: ConfigVersion, running: bool) -> Text:
    """The highlighted version in full: its header line, every change, every action."""
    text = Text()
    text.append(f"version {version.number}", "bold")
    text.append(f"  {format_when(version.applied_at)}  {version.source}")
    if running:
        text.append("  (running)", "bold")
    for title, lines, empty in (("changes", version.diff, "none"), ("actions", version.actions, "none needed")):
        text.append(f"\n{title}\n", "underline")
        text.append("\n".join(f"  {line}" for line in lines) if lines else f"  {empty}")
    return text


class ConfigScreen(Screen[None]):
    """Configuration versions; see the module docstring."""

    SCOPE = CONFIG
    BINDINGS = bindings_for(CONFIG)

    def __init__(self) -> None:
        super().__init__()
        self.versions: list[ConfigVersion] = []  # newest first

    @property
    def corral(self) -> CorralApp:
        return cast("CorralApp", self.app)

    def compose(self) -> ComposeResult:
        yield Header(icon="◆")
        table: DataTable[str] = DataTable(id="versions", cursor_type="row", zebra_stripes=True)
        table.border_title = "config versions"
        yield table
        with VerticalScroll(id="version-box") as box:
            box.border_title = "selected version"
            yield Static("fetching the versions…", id="version-detail", markup=False)
        yield Footer()

    def on_mount(self) -> None:
        table = self.query_one("#versions", DataTable)
        for key, header, width in COLUMNS:
            table.add_column(header, key=key, width=width)
        self.corral.event_signal.subscribe(self, self._apply_event)
        table.focus()
        self.fetch_versions()

    def _apply_event(self, event: Event) -> None:
        if getattr(event, "type", "") in REFRESH_ON:
            self.fetch_versions()

    @work(exclusive=True, group="config-versions", exit_on_error=False, name="config versions")
    async def fetch_versions(self) -> None:
        """Ask the backend for its versions; a failure is said once, in a notification (the
        list keeps what it showed)."""
        try:
            versions = await self.corral.backend.config_versions()
        except Exception as error:  # noqa: BLE001 - shown to the operator, nothing to retry
            self.notify(describe_error(error), title="config versions unavailable",
                        severity="error", timeout=8, markup=False)
            return
        self.show_versions(sorted(versions, key=lambda v: v.number, reverse=True))

    def show_versions(self, versions: list[ConfigVersion]) -> None:
        """Fill the table with `versions` (newest first). The cursor stays on its version,
        unless it was on the newest: then it moves to the new newest, so a reload shows what
        it changed."""
        table = self.query_one("#versions", DataTable)
        selected = self.selected
        follow_newest = selected is None or selected is (self.versions[0] if self.versions else None)
        self.versions = versions
        table.clear()
        for version in versions:
            table.add_row(str(version.number), format_clock(version.applied_at), version.source,
                          compact_diff(version.diff, 1), key=str(version.number))
        table.border_subtitle = f"running: version {versions[0].number}" if versions else ""
        if not follow_newest and selected is not None and selected in versions:
            table.move_cursor(row=versions.index(selected), animate=False)
        self._show_detail()

    @property
    def selected(self) -> ConfigVersion | None:
        """The version under the cursor (None while the list is empty)."""
        row = self.query_one("#versions", DataTable).cursor_row
        return self.versions[row] if 0 <= row < len(self.versions) else None

    @on(DataTable.RowHighlighted, "#versions")
    def _show_detail(self) -> None:
        version = self.selected
        detail = self.query_one("#version-detail", Static)
        if version is None:
            detail.update("no versions")
            return
        detail.update(version_detail(version, running=version is self.versions[0]))

    # -- commands ---------------------------------------------------------------------------

    def action_reload(self) -> None:
        self.corral.reload_config()

    def action_rollback(self) -> None:
        version = self.selected
        if version is None:
            self.notify("No version selected.", severity="warning")
            return
        if version is self.versions[0]:
            self.notify(f"Version {version.number} is the running configuration.", severity="warning")
            return

        def answered(yes: bool | None) -> None:
            if yes:
                self.corral.rollback_config(version.number)

        detail = (f"Applies version {version.number} ({version.source}, {format_when(version.applied_at)}) "
                  "again as a new version and writes its text back to the config file.")
        self.app.push_screen(ConfirmScreen(f"Roll back to version {version.number}?", title="Roll back",
                                           yes_label="Roll back", detail=detail), answered)

    def action_back(self) -> None:
        self.dismiss(None)
