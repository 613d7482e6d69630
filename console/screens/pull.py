"""The pull dialog: a model from a URL or Hugging Face into a model folder, with its progress.

The pull itself runs in an app worker (`CorralApp.pull_model`), not in this screen, so closing
the dialog leaves it running: the event log shows its progress and its end, and opening the
dialog again shows the running pull. Cancelling asks first, and keeps the partial file that
the same pull resumes later.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Input, ProgressBar, Static

from corral.backend.memory import format_bytes
from corral.backend.pull.status import PullStatus

from .confirm import ConfirmScreen

if TYPE_CHECKING:
    from corral.console.app import CorralApp

SOURCES_HELP = ("A URL of a .gguf file, hf://owner/repo/file.gguf, or hf://owner/repo:Q4_K_M "
                "(the quantization picked from the repository). enter pulls, esc closes (the pull "
                "goes on), ctrl+x cancels it.")
REFRESH_S = 0.25


def describe(status: PullStatus | None) -> str:
    """One line on where a pull stands: stage, bytes, rate and time left."""
    if status is None:
        return "No pull is running."
    what = status.model or status.source
    if status.status != "downloading":
        return f"{what}: {status.status}" + (f" → {', '.join(status.paths)}" if status.paths else "")
    done = format_bytes(status.completed)
    size = f" of {format_bytes(status.total)}" if status.total else ""
    rate = f", {format_bytes(int(status.rate))}/s" if status.rate else ""
    eta = f", {status.eta_s:.0f} s left" if status.eta_s is not None else ""
    shards = f" ({status.files} files)" if status.files > 1 else ""
    return f"{what}{shards}: {done}{size}{rate}{eta}"


class PullScreen(ModalScreen[None]):
    BINDINGS = [
        Binding("escape", "close", "Close", id="corral.pull.close"),
        Binding("ctrl+x", "cancel_pull", "Cancel pull", id="corral.pull.cancel", priority=True),
    ]

    def __init__(self) -> None:
        super().__init__(id="pull", classes="dialog")

    @property
    def corral(self) -> CorralApp:
        return self.app  # type: ignore[return-value]

    def compose(self) -> ComposeResult:
        with Vertical(id="pull-box", classes="dialog-box") as box:
            box.border_title = "Pull a model"
            yield Static(SOURCES_HELP, id="pull-help", markup=False)
            yield Input(placeholder="hf://owner/repo:Q4_K_M or https://…/model.gguf", id="pull-source")
            yield Input(placeholder="name in the catalog (optional: from the file)", id="pull-name")
            yield ProgressBar(total=None, show_eta=False, id="pull-bar")
            yield Static("", id="pull-state", markup=False)

    def on_mount(self) -> None:
        self.query_one("#pull-source", Input).focus()
        self._show()
        self.set_interval(REFRESH_S, self._show)

    def _show(self) -> None:
        status = self.corral.pull_status
        bar = self.query_one("#pull-bar", ProgressBar)
        if status is not None and status.total:
            bar.update(total=status.total, progress=status.completed)
        else:
            bar.update(total=None)
        self.query_one("#pull-state", Static).update(describe(status))

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        source = self.query_one("#pull-source", Input).value.strip()
        if not source:
            self.notify("Type a source first: a URL or hf://owner/repo:QUANT.", severity="warning")
            return
        if self.corral.pull_status is not None:
            self.notify("A pull is running: wait for it, or cancel it with ctrl+x.", severity="warning")
            return
        name = self.query_one("#pull-name", Input).value.strip() or None
        self.corral.pull_model(source, name)
        self._show()

    def action_close(self) -> None:
        self.dismiss(None)

    def action_cancel_pull(self) -> None:
        status = self.corral.pull_status
        if status is None:
            self.notify("No pull is running.", severity="warning")
            return

        def answered(yes: bool | None) -> None:
            if yes:
                self.corral.cancel_pull(status.id)

        self.app.push_screen(ConfirmScreen(f"Cancel the pull of {status.model or status.source}?",
                                           title="Cancel pull", yes_label="Cancel pull",
                                           detail="The partial file stays; pulling the same source again resumes it."),
                             answered)
