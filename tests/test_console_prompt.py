"""The prompt screen: a model's answer streams in, with its TTFT and speed; parameters and
history; stopping; failures; chat or completion."""

from __future__ import annotations

import pytest

from corral.backend.generation import LOOP_GUARD
from corral.backend.request import GenerationRequest
from corral.console.app import CorralApp
from corral.console.screens import DashboardScreen, PromptScreen
from console_support import SIZE, make_app, notifications, open_prompt, send, state, transcript, wait_for
from fake_backend import FakeBackend, model_info


def sent(backend: FakeBackend) -> list[GenerationRequest]:
    """The requests the backend was asked for, oldest first."""
    return [call[1] for call in backend.calls if call[0] == "generate"]


def mode_shown(app: CorralApp) -> tuple[str, str]:
    """The transcript's title and the line saying which mode answers come in, and why."""
    return str(app.screen.query_one("#transcript").border_title), str(app.screen.query_one("#prompt-mode").render())


async def test_prompt_streams_the_answer_and_shows_ttft_and_speed() -> None:
    app, backend = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await open_prompt(pilot, "qwen2.5-0.5b-instruct")
        await send(pilot, "hello")
        await wait_for(pilot, lambda: "TTFT 10 ms · 33.3 tok/s · 4 tokens · length" in transcript(app))
        assert transcript(app) == ["hello", "Once upon a time", "TTFT 10 ms · 33.3 tok/s · 4 tokens · length"]
        assert "TTFT 10 ms" in str(app.screen.query_one("#prompt-status").render())
        [request] = sent(backend)
        assert (request.model, [(m.role, m.content) for m in request.messages]) == (
            "qwen2.5-0.5b-instruct", [("user", "hello")])
        assert request.options["max_tokens"] == 256 and request.options["temperature"] == 0.7
        assert {k: request.options[k] for k in LOOP_GUARD} == LOOP_GUARD  # a base model must not loop
        assert app.screen.query_one("#param-repeat-penalty").value == str(LOOP_GUARD["repeat_penalty"])
        assert app.screen.query_one("#param-dry-multiplier").value == str(LOOP_GUARD["dry_multiplier"])
        assert request.session_id.startswith("console-")


async def test_prompt_parameters_and_history_go_with_the_next_question() -> None:
    app, backend = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await open_prompt(pilot, "gemma-3-270m")
        await send(pilot, "one")
        await wait_for(pilot, lambda: len(transcript(app)) == 3)
        app.screen.query_one("#param-temperature").value = "0"
        app.screen.query_one("#param-max-tokens").value = "32"
        app.screen.query_one("#param-repeat-penalty").value = "1"
        app.screen.query_one("#param-dry-multiplier").value = "1.5"
        app.screen.query_one("#param-dry-multiplier").value = "-2"  # invalid: the last valid value stays
        app.screen.query_one("#param-system").value = "Be brief."
        app.screen.query_one("#param-max-tokens").value = "not a number"  # invalid: the last valid value stays
        app.screen.query_one("#prompt-input").focus()
        await send(pilot, "two")
        await wait_for(pilot, lambda: len(transcript(app)) == 6)
        request = sent(backend)[-1]  # gemma-3-270m has no chat template: a completion of the whole text
        assert request.prompt == "Be brief.\none\nOnce upon a time\ntwo"
        assert (request.options["temperature"], request.options["max_tokens"]) == (0.0, 32)
        assert (request.options["repeat_penalty"], request.options["dry_multiplier"]) == (1.0, 1.5)
        # the history stays with the model for the session: back to the dashboard and in again
        await pilot.press("escape")
        await wait_for(pilot, lambda: isinstance(app.screen, DashboardScreen))
        await pilot.press("enter")
        await wait_for(pilot, lambda: isinstance(app.screen, PromptScreen))
        await wait_for(pilot, lambda: len(transcript(app)) == 6)
        assert app.screen.query_one("#param-system").value == "Be brief."
        await pilot.press("ctrl+l")
        await wait_for(pilot, lambda: transcript(app) == [])
        assert app.conversation("gemma-3-270m").turns == []


@pytest.mark.parametrize("key", ["ctrl+c", "escape"])
async def test_ctrl_c_or_esc_stops_a_streaming_answer(key: str) -> None:
    app, backend = make_app(FakeBackend(token_delay=30))
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_prompt(pilot, "gemma-3-270m")
        await send(pilot, "tell me a story")
        await wait_for(pilot, lambda: "Once" in transcript(app))
        assert screen.streaming and backend.info("gemma-3-270m").in_flight == 1
        await pilot.press(key)
        await wait_for(pilot, lambda: "stopped" in transcript(app))
        assert transcript(app) == ["tell me a story", "Once", "stopped"]
        assert not screen.streaming and backend.info("gemma-3-270m").in_flight == 0
        assert app.screen is screen  # stopping does not leave the screen; a second esc does
        await pilot.press("escape")
        await wait_for(pilot, lambda: isinstance(app.screen, DashboardScreen))


async def test_a_failing_answer_is_notified_and_marked() -> None:
    backend = FakeBackend()
    app, _ = make_app(backend)
    async with app.run_test(size=SIZE) as pilot:
        await open_prompt(pilot, "broken")
        await send(pilot, "hi")
        await wait_for(pilot, lambda: any("prompt broken failed" in n for n in notifications(app)))
        assert any(line.startswith("failed: model 'broken'") for line in transcript(app))
        assert state(app, "broken") == "failed" if isinstance(app.screen, DashboardScreen) else True


async def test_prompt_screen_fits_80x24() -> None:
    app, _ = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        await open_prompt(pilot, "gemma-3-270m")
        for widget in ("#transcript", "#params", "#param-system", "#prompt-input", "Footer"):
            region = app.screen.query_one(widget).region
            assert region.height > 0 and region.bottom <= 24 and region.right <= 80, widget


# -- chat or completion ------------------------------------------------------------------------


async def test_a_model_without_a_chat_template_opens_in_completion_and_ctrl_t_switches() -> None:
    app, backend = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await open_prompt(pilot, "gemma-3-270m")  # loaded with the fallback:gemma template
        assert mode_shown(app) == ("completion · gemma-3-270m",
                                   "completion mode: gemma-3-270m has no chat template of its own · ^t: chat")
        await send(pilot, "Once upon a time")  # typing t in the box does not switch
        await wait_for(pilot, lambda: len(transcript(app)) == 3)
        [request] = sent(backend)
        assert (request.kind, request.prompt) == ("completion", "Once upon a time")

        await pilot.press("ctrl+t")
        assert mode_shown(app) == ("chat · gemma-3-270m", "chat mode (a fallback template: gemma-3-270m has "
                                   "none of its own) · ^t: completion")
        await send(pilot, "And then?")
        await wait_for(pilot, lambda: len(transcript(app)) == 6)
        request = sent(backend)[-1]
        assert [(m.role, m.content) for m in request.messages] == [
            ("user", "Once upon a time"), ("assistant", "Once upon a time"), ("user", "And then?")]
        # the choice stays with the model's conversation: back to the dashboard and in again
        await pilot.press("escape")
        await wait_for(pilot, lambda: isinstance(app.screen, DashboardScreen))
        await pilot.press("enter")
        await wait_for(pilot, lambda: isinstance(app.screen, PromptScreen))
        assert mode_shown(app)[0] == "chat · gemma-3-270m"


async def test_a_model_with_a_chat_template_opens_in_chat_and_can_complete() -> None:
    app, backend = make_app(keymap={"corral.prompt.mode": "f6"})
    async with app.run_test(size=SIZE) as pilot:
        await open_prompt(pilot, "qwen2.5-0.5b-instruct")  # loaded with its GGUF's template
        assert mode_shown(app) == ("chat · qwen2.5-0.5b-instruct", "chat mode · f6: completion")
        await pilot.press("f6")
        assert mode_shown(app) == ("completion · qwen2.5-0.5b-instruct", "completion mode: the text is "
                                   "continued as it is, without the chat template · f6: chat")
        await send(pilot, "The sky is")
        await wait_for(pilot, lambda: len(transcript(app)) == 3)
        assert [(r.kind, r.prompt) for r in sent(backend)] == [("completion", "The sky is")]


@pytest.mark.parametrize("has_template, mode", [(False, "completion"), (True, "chat"), (None, "chat")])
async def test_before_a_load_the_catalog_decides(has_template: bool | None, mode: str) -> None:
    """Not loaded yet, the template in use is unknown: a GGUF the catalog found without one opens
    in completion; with one, or when nobody knows, in chat."""
    backend = FakeBackend([model_info("m", has_chat_template=has_template)])
    app, _ = make_app(backend)
    async with app.run_test(size=SIZE) as pilot:
        await open_prompt(pilot, "m")
        assert mode_shown(app)[0] == f"{mode} · m"
        await send(pilot, "hi")
        await wait_for(pilot, lambda: len(transcript(app)) == 3)
        assert sent(backend)[0].kind == mode


async def test_a_reasoning_model_is_shown_thinking_and_its_thoughts_stay_out_of_the_answer() -> None:
    app, backend = make_app()
    backend.thinking = "Let me see."
    async with app.run_test(size=SIZE) as pilot:
        await open_prompt(pilot, "qwen2.5-0.5b-instruct")
        said: list[str] = []
        status = app.screen._status
        app.screen._status = lambda text: (said.append(text), status(text))[-1]
        await send(pilot, "hello")
        await wait_for(pilot, lambda: len(transcript(app)) == 3)
        assert any(text.startswith("thinking… 11 characters of reasoning") for text in said), said
        assert transcript(app)[1] == "Once upon a time"
