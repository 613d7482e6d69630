"""Pictures of the console (pytest-textual-snapshot): the SVGs under
__snapshots__/test_console_snapshots/ are what each screen must look like."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from textual.pilot import Pilot

from corral.console.screens import HelpScreen
from console_support import (make_app, open_config, open_prompt, ready, reload_once, select, send, state,
                             table, transcript, wait_for)


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


SNAPSHOTS = {"dashboard": _dashboard_after_a_load, "prompt": _prompt_after_an_answer, "help": _help,
             "config": _config_after_a_reload}


@pytest.mark.parametrize("size", [(80, 24), (120, 40)], ids=["80x24", "120x40"])
@pytest.mark.parametrize("screen", list(SNAPSHOTS))
def test_console_snapshots(screen: str, size: tuple[int, int], snap_compare: Callable[..., bool],
                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Dashboard, prompt, help and config screens at both sizes: fixed models, host stats,
    clock and time zone."""
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    app, _ = make_app()
    try:
        assert snap_compare(app, terminal_size=size, run_before=SNAPSHOTS[screen])
    finally:
        monkeypatch.undo()
        time.tzset()
