"""The prompt screen: chat with one model, or have it continue text, its answer streaming in
as it is generated.

The conversation (turns, the temperature / max tokens / repetition penalty / DRY multiplier /
system prompt used, and the mode) lives on the app, one per model, so leaving the screen and coming back later in the session
shows it again. Each answer streams in a worker, through `backend.chat` in chat mode or
`backend.complete` in completion mode; `ctrl+c` or `esc` cancels that worker, which closes
the backend's stream and so frees the model's slot at its next decode step. The partial
answer stays, marked "stopped". After each answer the screen shows its TTFT and tokens/s,
from the stats the last chunk carries.

A model without a chat template of its own (a base model, such as the default gemma-3-270m:
its chats would go through a fallback template it was never trained on) opens in completion
mode, and the screen says so; `ctrl+t` switches between the modes.

A base model at temperature 0.7 loops (the same sentence over and over), so answers here are
sampled with the loop guard (generation.LOOP_GUARD: a repetition penalty and llama.cpp's DRY
sampler); its two strengths are fields of their own, and 1 and 0 turn them off.
"""

from __future__ import annotations

import asyncio
import secrets
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

from textual import on
from textual.app import ComposeResult
from textual.containers import Horizontal, VerticalScroll
from textual.screen import Screen
from textual.validation import Integer, Number
from textual.widgets import Footer, Header, Input, Label, Static
from textual.worker import Worker, WorkerState

from corral.backend.generation import LIMITS, LOOP_GUARD

from ..commands import COMMANDS_BY_ID, PROMPT, bindings_for
from ..errors import describe_error
from .help import key_label

if TYPE_CHECKING:
    from corral.backend.generation import RequestStats
    from corral.backend.snapshot import ModelInfo

    from ..app import CorralApp

MAX_TEMPERATURE = 2.0
MAX_TOKENS = 8192


@dataclass
class Turn:
    """One message; an answer also keeps how it ended and its speed (`note`)."""

    role: str  # "user" | "assistant"
    text: str
    note: str = ""


@dataclass
class Conversation:
    """One model's chat in this console session, with the parameters it is sent with."""

    model: str
    turns: list[Turn] = field(default_factory=list)
    temperature: float = 0.7
    max_tokens: int = 256
    repeat_penalty: float = float(LOOP_GUARD["repeat_penalty"])
    dry_multiplier: float = float(LOOP_GUARD["dry_multiplier"])
    system: str = ""
    completion: bool | None = None  # the mode the operator chose; None: as the model suggests
    session_id: str = field(default_factory=lambda: f"console-{secrets.token_hex(4)}")

    def messages(self) -> list[dict[str, Any]]:
        """The chat to send: the system prompt, then every turn with text (a stopped answer
        keeps what it had said; an empty one is left out)."""
        system = [{"role": "system", "content": self.system}] if self.system.strip() else []
        return system + [{"role": t.role, "content": t.text} for t in self.turns if t.text]

    def options(self) -> dict[str, Any]:
        """The sampling options answers are sent with: the fields, over the rest of the guard."""
        return {**LOOP_GUARD, "max_tokens": self.max_tokens, "temperature": self.temperature,
                "repeat_penalty": self.repeat_penalty, "dry_multiplier": self.dry_multiplier,
                "session_id": self.session_id}

    def document(self) -> str:
        """The text a completion continues: the system prompt, then every turn with text, a
        line each."""
        system = [self.system] if self.system.strip() else []
        return "\n".join(system + [t.text for t in self.turns if t.text])


def lacks_chat_template(info: ModelInfo | None) -> bool:
    """Chats with this model would use a fallback template: the one it loaded with says so, or,
    before a load, the catalog found none in its GGUF (and config sets none)."""
    if info is None:
        return False
    if info.chat_template is not None:
        return info.chat_template.startswith("fallback:")
    return info.has_chat_template is False


def stats_note(stats: RequestStats | None, finish_reason: str | None) -> str:
    """"TTFT 48 ms · 61.2 tok/s · 32 tokens · stop" for the line under an answer."""
    parts = []
    if stats is not None:
        if stats.ttft_s is not None:
            parts.append(f"TTFT {stats.ttft_s * 1000:.0f} ms")
        if stats.tokens_per_s:
            parts.append(f"{stats.tokens_per_s:.1f} tok/s")
        parts.append(f"{stats.completion_tokens} tokens")
    if finish_reason:
        parts.append(finish_reason)
    return " · ".join(parts)


class TurnView(Static):
    """One message in the transcript."""

    def __init__(self, turn: Turn) -> None:
        super().__init__(turn.text or "…", markup=False, classes=f"turn turn-{turn.role}")
        self.turn = turn

    def show(self) -> None:
        self.update(self.turn.text or "…")


class NoteView(Static):
    """The line under an answer: its TTFT, speed and how it ended."""

    def __init__(self, note: str) -> None:
        super().__init__(note, markup=False, classes="turn-note")


class PromptScreen(Screen[None]):
    """Chat with `model`; see the module docstring."""

    SCOPE = PROMPT
    BINDINGS = bindings_for(PROMPT)
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (100, "-wide")]

    def __init__(self, model: str) -> None:
        super().__init__()
        self.model = model
        self._answer: Worker[None] | None = None
        self._no_template = False  # set at compose, from the latest status

    @property
    def corral(self) -> CorralApp:
        return cast("CorralApp", self.app)

    @property
    def conversation(self) -> Conversation:
        return self.corral.conversation(self.model)

    @property
    def completion(self) -> bool:
        """Completion mode: the conversation goes as one text to continue, not as a chat."""
        chosen = self.conversation.completion
        return self._no_template if chosen is None else chosen

    @property
    def streaming(self) -> bool:
        return self._answer is not None and self._answer.state in (WorkerState.PENDING, WorkerState.RUNNING)

    def compose(self) -> ComposeResult:
        chat = self.conversation
        info = next((m for m in self.corral.models if m.name == self.model), None)
        self._no_template = lacks_chat_template(info)
        yield Header(icon="◆")
        with Horizontal(id="prompt-main"):
            transcript = VerticalScroll(id="transcript")
            transcript.border_title = self._mode_title()
            with transcript:
                for turn in chat.turns:
                    yield TurnView(turn)
                    if turn.note:
                        yield NoteView(turn.note)
            with VerticalScroll(id="params") as params:
                params.border_title = "parameters"
                yield Label("temperature")
                yield Input(str(chat.temperature), id="param-temperature", type="number",
                            validators=[Number(minimum=0, maximum=MAX_TEMPERATURE)])
                yield Label("max tokens")
                yield Input(str(chat.max_tokens), id="param-max-tokens", type="integer",
                            validators=[Integer(minimum=1, maximum=MAX_TOKENS)])
                yield Label("repeat penalty")
                yield Input(str(chat.repeat_penalty), id="param-repeat-penalty", type="number",
                            validators=[Number(minimum=1, maximum=LIMITS["repeat_penalty"].le)])
                yield Label("DRY multiplier")
                yield Input(str(chat.dry_multiplier), id="param-dry-multiplier", type="number",
                            validators=[Number(minimum=0, maximum=LIMITS["dry_multiplier"].le)])
                yield Label("system prompt")
                yield Input(chat.system, id="param-system", placeholder="none")
        yield Static(self._mode_line(), id="prompt-mode", markup=False)
        yield Static(self._last_note(), id="prompt-status", markup=False)
        yield Input(id="prompt-input", placeholder=f"message {self.model} · enter sends")
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = self.corral.sub_title
        self.query_one("#prompt-input", Input).focus()
        self.query_one("#transcript").anchor()  # stays at the newest text as answers grow

    def _last_note(self) -> str:
        notes = [t.note for t in self.conversation.turns if t.role == "assistant" and t.note]
        return notes[-1] if notes else "ctrl+c / esc stops an answer · tab moves between fields"

    def _status(self, text: str) -> None:
        self.query_one("#prompt-status", Static).update(text)

    # -- chat or completion ------------------------------------------------------------------

    def _mode_title(self) -> str:
        return f"{'completion' if self.completion else 'chat'} · {self.model}"

    def _mode_line(self) -> str:
        """Which mode answers come in, and why, with the key that switches."""
        key = key_label(self.app, COMMANDS_BY_ID["corral.prompt.mode"], self.corral.keymap)
        if self.completion:
            why = (f"{self.model} has no chat template of its own" if self._no_template
                   else "the text is continued as it is, without the chat template")
            return f"completion mode: {why} · {key}: chat"
        why = f" (a fallback template: {self.model} has none of its own)" if self._no_template else ""
        return f"chat mode{why} · {key}: completion"

    def action_toggle_mode(self) -> None:
        """Switch between chat and completion; the next message goes the new way."""
        self.conversation.completion = not self.completion
        self.query_one("#transcript", VerticalScroll).border_title = self._mode_title()
        self.query_one("#prompt-mode", Static).update(self._mode_line())

    # -- parameters --------------------------------------------------------------------------

    @on(Input.Changed, "#params Input")
    def _parameter_changed(self, event: Input.Changed) -> None:
        """Keep each valid value on the conversation; an invalid one stays red in its field
        and the last valid value is used."""
        chat = self.conversation
        if event.input.id == "param-system":
            chat.system = event.value
        elif event.value and (event.validation_result is None or event.validation_result.is_valid):
            if event.input.id == "param-temperature":
                chat.temperature = float(event.value)
            elif event.input.id == "param-max-tokens":
                chat.max_tokens = int(event.value)
            elif event.input.id == "param-repeat-penalty":
                chat.repeat_penalty = float(event.value)
            elif event.input.id == "param-dry-multiplier":
                chat.dry_multiplier = float(event.value)

    # -- sending and streaming ---------------------------------------------------------------

    @on(Input.Submitted, "#prompt-input")
    def _submitted(self) -> None:
        self.action_send()

    def action_send(self) -> None:
        box = self.query_one("#prompt-input", Input)
        text = box.value.strip()
        if not text:
            return
        if self.streaming:
            self.notify("An answer is still streaming: stop it first (ctrl+c).", severity="warning")
            return
        box.value = ""
        chat = self.conversation
        chat.turns.append(Turn("user", text))
        answer = Turn("assistant", "")
        chat.turns.append(answer)
        view = TurnView(answer)
        transcript = self.query_one("#transcript", VerticalScroll)
        transcript.mount_all([TurnView(chat.turns[-2]), view])
        transcript.anchor()  # the operator may have scrolled up: follow the new answer again
        self._status(f"waiting for {self.model} (it loads first if it is not loaded)…")
        self._answer = self.run_worker(self._stream(answer, view), name=f"prompt {self.model}",
                                       group="prompt", exclusive=True, exit_on_error=False)

    async def _stream(self, answer: Turn, view: TurnView) -> None:
        """Append each chunk to the answer as it arrives; note the stats at the end."""
        chat = self.conversation
        backend = self.corral.backend
        options: dict[str, Any] = {**chat.options(), "api": "console"}
        stats, finish, thought = None, None, 0
        try:
            stream = (backend.complete(self.model, chat.document(), **options) if self.completion
                      else backend.chat(self.model, chat.messages(), **options))
            async for chunk in stream:
                if chunk.reasoning:  # a reasoning model thinks before it answers: say so
                    thought += len(chunk.reasoning)
                    self._status(f"thinking… {thought} characters of reasoning  ctrl+c / esc stops")
                if chunk.text:
                    answer.text += chunk.text
                    view.show()
                    self._status("streaming…  ctrl+c / esc stops")
                if chunk.finish_reason:
                    stats, finish = chunk.stats, chunk.finish_reason
        except asyncio.CancelledError:
            self._show_note(answer, view, "stopped")
            raise
        except Exception as error:
            self._show_note(answer, view, f"failed: {describe_error(error)}")
            raise
        self._show_note(answer, view, stats_note(stats, finish))

    def _show_note(self, answer: Turn, view: TurnView, note: str) -> None:
        answer.note = note
        self.query_one("#transcript", VerticalScroll).mount(NoteView(note), after=view)
        self._status(note)

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        """Worker messages stop at the screen that ran the worker: hand a failed answer to the
        app's one handler, which notifies with the reason."""
        if event.worker is self._answer and event.state == WorkerState.ERROR:
            self.corral.on_worker_state_changed(event)

    # -- commands ----------------------------------------------------------------------------

    def action_stop(self) -> None:
        if self.streaming and self._answer is not None:
            self._answer.cancel()

    def action_back(self) -> None:
        if self.streaming:
            self.action_stop()
        else:
            self.dismiss(None)

    def action_clear_history(self) -> None:
        if self.streaming:
            self.notify("An answer is still streaming: stop it first (ctrl+c).", severity="warning")
            return
        self.conversation.turns.clear()
        self.query_one("#transcript", VerticalScroll).remove_children()
        self._status("conversation cleared")
