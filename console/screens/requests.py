"""The requests screen: every request running or queued on a loaded model, live, with a key to
cancel the selected one.

One row a request: model, API it came in by, session, request id, state (running, or queued
with its place in line), age, tokens so far and tok/s; under the table, the selected request
in full (ids are cut to fit the columns). `x` cancels it after a confirm; the backend ends it
with finish reason "cancelled" in its own dialect and frees its slot, and the event log names
the console as the canceller.

It refreshes on the app's status poll (about once a second): a poll that shows requests in
flight fetches `backend.requests()`, one that shows none clears the table without asking, so
an idle console makes no calls of its own. Column widths follow the screen's width, so 80
columns show every column.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from rich.text import Text
from textual import events, on, work
from textual.app import ComposeResult
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Static

from corral.backend.inflight import QUEUED
from ..commands import REQUESTS, bindings_for
from ..errors import describe_error
from ..widgets.gauges import NA, format_duration
from .confirm import ConfirmScreen

if TYPE_CHECKING:
    from corral.backend.inflight import RequestInfo
    from corral.backend.snapshot import Status

    from ..app import CorralApp

# (key, header, width, share of the room left over, or 0 for a fixed width)
COLUMNS: tuple[tuple[str, str, int, int], ...] = (
    ("model", "model", 12, 3), ("api", "api", 9, 0), ("session", "session", 7, 2), ("request", "request", 8, 3),
    ("state", "state", 9, 0), ("age", "age", 5, 0), ("tokens", "tokens", 6, 0), ("speed", "tok/s", 5, 0))
CHROME = 2 + 2 * len(COLUMNS)  # the table's border and each column's padding (cell_padding 1)


def widths(total: int) -> dict[str, int]:
    """Each column's width for a table `total` cells wide: the fixed ones as given, the rest
    share what is left in proportion to their shares."""
    room = max(0, total - CHROME - sum(width for _, _, width, _ in COLUMNS))
    shares = sum(share for *_, share in COLUMNS)
    out = {key: width + room * share // shares for key, _, width, share in COLUMNS}
    out["model"] += total - CHROME - sum(out.values()) if room else 0  # rounding leftovers
    return out


def clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[:max(0, width - 1)] + "…"


def state_label(request: RequestInfo) -> str:
    return f"queued {request.queue_position}" if request.state == QUEUED else request.state


def speed(request: RequestInfo) -> str:
    return f"{request.tokens_per_s:.1f}" if request.tokens_per_s else NA


def request_detail(request: RequestInfo) -> Text:
    """The selected request in full: its whole id and session, and every figure."""
    text = Text()
    text.append(f"request {request.request_id}", "bold")
    text.append(f"  on {request.model} via {request.api or 'unknown API'}")
    if request.session_id:
        text.append(f"  session {request.session_id}")
    place = f", {request.queue_position} in line" if request.state == QUEUED else ""
    text.append(f"\n{request.state}{place} for {format_duration(request.age_s)}: "
                f"{request.prompt_tokens} prompt tokens, {request.tokens} generated, {speed(request)} tok/s")
    return text


class RequestsScreen(Screen[None]):
    """Requests in flight; see the module docstring."""

    SCOPE = REQUESTS
    BINDINGS = bindings_for(REQUESTS)

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[RequestInfo] = []
        self._error: str | None = None  # the last fetch's failure, said once until a fetch works

    @property
    def corral(self) -> CorralApp:
        return cast("CorralApp", self.app)

    def compose(self) -> ComposeResult:
        yield Header(icon="◆")
        table: DataTable[str] = DataTable(id="requests", cursor_type="row", zebra_stripes=True)
        table.border_title = "requests in flight"
        yield table
        box = Static("fetching the requests…", id="request-detail", markup=False)
        box.border_title = "selected request"
        yield box
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#requests", DataTable).focus()
        self.corral.status_signal.subscribe(self, self._apply_status)
        self.fetch_requests()

    def _apply_status(self, status: Status) -> None:
        if any(model.in_flight for model in status.models):
            self.fetch_requests()
        elif self.requests:
            self.show_requests([])

    @work(exclusive=True, group="requests", exit_on_error=False, name="requests")
    async def fetch_requests(self) -> None:
        """Ask the backend for its requests. A failure is said once in a notification (the next
        poll retries, and a server too old for the route would fail every second); the table
        keeps what it showed."""
        try:
            found = await self.corral.backend.requests()
        except Exception as error:  # noqa: BLE001 - shown to the operator; the next poll retries
            message = describe_error(error)
            if message != self._error:
                self._error = message
                self.notify(message, title="requests unavailable", severity="error", timeout=8, markup=False)
            return
        self._error = None
        self.show_requests(found)

    def show_requests(self, found: list[RequestInfo]) -> None:
        """Fill the table with `found`, the cursor staying on the request it was on."""
        table = self.query_one("#requests", DataTable)
        selected = self.selected
        self.requests = list(found)
        self._fill(table)
        keys = [(r.model, r.request_id) for r in self.requests]
        if selected is not None and (selected.model, selected.request_id) in keys:
            table.move_cursor(row=keys.index((selected.model, selected.request_id)), animate=False)
        running = sum(1 for r in self.requests if r.state != QUEUED)
        table.border_subtitle = f"{running} running, {len(self.requests) - running} queued"
        self._show_detail()

    def _fill(self, table: DataTable[str]) -> None:
        width = widths(table.size.width or self.size.width)
        table.clear(columns=True)
        for key, header, _, _ in COLUMNS:
            table.add_column(header, key=key, width=width[key])
        for i, r in enumerate(self.requests):
            cells = {"model": r.model, "api": r.api or NA, "session": r.session_id or NA, "request": r.request_id,
                     "state": state_label(r), "age": format_duration(r.age_s), "tokens": str(r.tokens),
                     "speed": speed(r)}
            table.add_row(*(clip(cells[key], width[key]) for key, *_ in COLUMNS), key=str(i))

    def on_resize(self, event: events.Resize) -> None:
        self._fill(self.query_one("#requests", DataTable))

    @property
    def selected(self) -> RequestInfo | None:
        """The request under the cursor (None while the table is empty)."""
        row = self.query_one("#requests", DataTable).cursor_row
        return self.requests[row] if 0 <= row < len(self.requests) else None

    @on(DataTable.RowHighlighted, "#requests")
    def _show_detail(self) -> None:
        request = self.selected
        detail = self.query_one("#request-detail", Static)
        detail.update(request_detail(request) if request is not None else "nothing running or queued")

    # -- commands ---------------------------------------------------------------------------

    def action_cancel(self) -> None:
        request = self.selected
        if request is None:
            self.notify("No request selected.", severity="warning")
            return

        def answered(yes: bool | None) -> None:
            if yes:
                self.corral.run_backend(f"cancel request {request.request_id}",
                                        lambda: self.corral.backend.cancel_request(request.request_id, "console"))

        detail = (f"{state_label(request).capitalize()} on {request.model} via {request.api or 'an unknown API'}, "
                  f"{request.tokens} tokens so far. Its client gets what was generated, ending with finish "
                  "reason \"cancelled\", and its slot is freed.")
        self.app.push_screen(ConfirmScreen(f"Cancel request {request.request_id}?", title="Cancel request",
                                           yes_label="Cancel it", detail=detail), answered)

    def action_back(self) -> None:
        self.dismiss(None)
