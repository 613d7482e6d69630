"""A modal yes/no question; dismissed with True (y, Yes) or False (n, Escape, No)."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Static


class ConfirmScreen(ModalScreen[bool]):
    """Ask `question`; `yes_label` names the action so the button says what it does."""

    BINDINGS = [
        Binding("y", "answer(True)", "Yes", id="corral.confirm.yes"),
        Binding("n,escape", "answer(False)", "No", id="corral.confirm.no"),
        Binding("left,right", "toggle_focus", show=False),
    ]

    def __init__(self, question: str, *, title: str = "Confirm", yes_label: str = "Yes",
                 detail: str = "", id: str | None = None) -> None:
        super().__init__(id=id, classes="dialog")
        self.question = question
        self.title_text = title
        self.yes_label = yes_label
        self.detail = detail

    def compose(self) -> ComposeResult:
        with Vertical(id="confirm-box", classes="dialog-box") as box:
            box.border_title = self.title_text
            yield Static(self.question, id="confirm-question", markup=False)
            if self.detail:
                yield Static(self.detail, id="confirm-detail", markup=False)
            with Horizontal(id="confirm-buttons"):
                yield Button(f"{self.yes_label} (y)", id="confirm-yes", variant="error")
                yield Button("No (n)", id="confirm-no", variant="primary")

    def on_mount(self) -> None:
        self.query_one("#confirm-no", Button).focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        self.dismiss(event.button.id == "confirm-yes")

    def action_answer(self, answer: bool) -> None:
        self.dismiss(answer)

    def action_toggle_focus(self) -> None:
        self.focus_next(Button)
