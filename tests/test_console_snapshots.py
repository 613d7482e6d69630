"""Pictures of the console (pytest-textual-snapshot): the SVGs under
__snapshots__/test_console_snapshots/ are what each screen must look like."""

from __future__ import annotations

import time
from dataclasses import replace
from collections.abc import Callable
from pathlib import Path

import pytest
from textual.pilot import Pilot

from corral.backend.events import Notice
from corral.backend.liveconfig import welcome_message
from corral.console.screens import DetailsScreen, HelpScreen, LogScreen
from corral.console.screens.logs import ModelLogView
from corral.console.widgets.models_table import KEPT_VISIBLE
from console_support import (log_text, make_app, open_config, open_prompt, ready, reload_once, select, send, state,
                             table, transcript, wait_for)
from fake_backend import FakeBackend, default_models, model_info


async def _dashboard_after_a_load(pilot: Pilot) -> None:
    """One load, and the poll after it (measured memory), so the picture never catches it
    half-way."""
    app = await ready(pilot)
    await select(pilot, "tiny-llama")
    await pilot.press("l")
    await wait_for(pilot, lambda: state(app, "tiny-llama") == "ready")
    await wait_for(pilot, lambda: table(app).cell_text("tiny-llama", "memory") == "3.1/3.3 MiB")
    await wait_for(pilot, lambda: not app.screen.query_one("#loading").display)
    await pilot.press("up", "up")
    await pilot.pause()


async def _prompt_after_an_answer(pilot: Pilot) -> None:
    app = pilot.app
    await open_prompt(pilot, "gemma-3-270m")
    app.screen.query_one("#prompt-input").cursor_blink = False
    await send(pilot, "Tell me a story")
    await wait_for(pilot, lambda: any(line.startswith("TTFT") for line in transcript(app)))
    await pilot.pause()


async def _help(pilot: Pilot) -> None:
    app = await ready(pilot)
    await pilot.press("question_mark")
    await wait_for(pilot, lambda: isinstance(app.screen, HelpScreen))
    await pilot.pause()


async def _config_after_a_reload(pilot: Pilot) -> None:
    """Two versions, the newest with a change and an action, the screen's cursor on it."""
    app = await ready(pilot)
    backend = app.backend
    backend.reload_diff = ("defaults.keep_alive: 300.0 → 60.0", "models[qwen].priority: 0 → 10")
    await open_config(pilot)
    await reload_once(pilot)
    await pilot.pause()


async def _requests_in_flight(pilot: Pilot) -> None:
    """Two models' requests, running and queued, from four dialects; the cursor on the second."""
    app = await ready(pilot)
    backend = app.backend
    backend.add_request("chatcmpl-7f3a9c2e41d8", "gemma-3-270m", api="openai", session_id="notebook-3",
                        age_s=12.4, prompt_tokens=18, tokens=231, tokens_per_s=19.6)
    backend.add_request("msg-b81f05", "gemma-3-270m", api="anthropic", age_s=4.2, tokens=37, tokens_per_s=18.9)
    backend.add_request("0d9e4c7a55b34f0e9a1d2c3b4a5f6e7d", "gemma-3-270m", state="queued", api="ollama",
                        age_s=1.1)
    backend.add_request("console-2", "qwen2.5-0.5b-instruct", api="console", session_id="console-1",
                        age_s=75.0, tokens=1, tokens_per_s=None)
    await pilot.press("w")
    await wait_for(pilot, lambda: len(getattr(app.screen, "requests", ())) == 4)
    await pilot.press("down")
    await pilot.pause()


async def _log_after_a_failed_load(pilot: Pilot) -> None:
    """The model that fails to load, its details, and `l`: llama.cpp's lines, the error last."""
    app = await ready(pilot)
    await select(pilot, "broken")
    await pilot.press("l")
    await wait_for(pilot, lambda: state(app, "broken") == "failed")
    await pilot.press("d")
    await wait_for(pilot, lambda: isinstance(app.screen, DetailsScreen))
    await pilot.press("l")
    await wait_for(pilot, lambda: isinstance(app.screen, LogScreen) and bool(app.screen.query_one(ModelLogView).shown))
    app.clear_notifications()  # the failure's toast would cover the log's last lines
    await pilot.pause()


async def _first_run(pilot: Pilot) -> None:
    """A fresh machine: the default model alone, and the welcome line as the only event."""
    app = await ready(pilot)
    await wait_for(pilot, lambda: "Welcome: no config file yet" in log_text(app))
    await pilot.pause()


def _crowded_app() -> FakeBackend:
    """Names from other tools' stores far longer than 80 columns allow, beside a load at 100 %."""
    long = [model_info("hf.co/bartowski/Meta-Llama-3.1-8B-Instruct-GGUF:Q4_K_M", source="huggingface",
                       state="loading", load_percent=100),
            model_info("qwen2.5-coder:32b-instruct-q4_K_M-with-a-long-tag", source="ollama", state="loading",
                       load_percent=7),
            model_info("a-rather-long-alias-name-for-a-model", alias_of="hf.co/bartowski/Meta-Llama-3.1-8B-"
                       "Instruct-GGUF:Q4_K_M", state="loading", load_percent=100)]
    return FakeBackend([*default_models()[:2], *long])


async def _crowded(pilot: Pilot) -> None:
    app = await ready(pilot)
    await pilot.pause()
    models = table(app)
    shown = sum(models.columns[key].get_render_width(models) for key in ("name", *KEPT_VISIBLE))
    assert shown <= models.scrollable_content_region.width


def _first_run_app() -> FakeBackend:
    backend = FakeBackend([replace(default_models()[0], state="available", pinned=False, measured_bytes=None,
                                   load_seconds=None, last_used=None, tokens_per_s=0.0, chat_template=None)])
    backend.publish(Notice(level="info", message=welcome_message(
        Path("/home/operator/.config/corral/config.toml"), folder_exists=False)))
    return backend


SNAPSHOTS = {"dashboard": _dashboard_after_a_load, "prompt": _prompt_after_an_answer, "help": _help,
             "config": _config_after_a_reload, "requests": _requests_in_flight, "logs": _log_after_a_failed_load,
             "first_run": _first_run}
BACKENDS: dict[str, Callable[[], FakeBackend]] = {"first_run": _first_run_app}


@pytest.mark.parametrize("size", [(80, 24), (120, 40)], ids=["80x24", "120x40"])
@pytest.mark.parametrize("screen", list(SNAPSHOTS))
def test_console_snapshots(screen: str, size: tuple[int, int], snap_compare: Callable[..., bool],
                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Dashboard, prompt, help, config, requests, log view and first run at both sizes: fixed
    models, host stats, clock and time zone."""
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    app, _ = make_app(BACKENDS.get(screen, FakeBackend)())
    try:
        assert snap_compare(app, terminal_size=size, run_before=SNAPSHOTS[screen])
    finally:
        monkeypatch.undo()
        time.tzset()


def test_at_80_columns_long_names_give_way_to_the_state(snap_compare: Callable[..., bool]) -> None:
    """Store-qualified names and an alias of one are cut with "…" (a short store name kept);
    "loading 100%" stays whole; the footer leads with the prompt key and keeps the help key."""
    app, _ = make_app(_crowded_app())
    assert snap_compare(app, terminal_size=(80, 24), run_before=_crowded)
