"""Console tests: Pilot drives the real app over FakeBackend (tests/fake_backend.py)."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from textual.pilot import Pilot
from textual.widgets import DataTable

from corral.backend.events import ConfigApplied, ConfigRejected, LoadProgress, Notice, RequestFinished
from corral.backend.telemetry import GPUStats
from corral.console.app import CorralApp, create_app
from corral.console.commands import COMMANDS, bindings_for
from corral.backend.errors import ConfigError
from corral.console.screens import (
    ConfigScreen,
    ConfirmScreen,
    DashboardScreen,
    DetailsScreen,
    HelpScreen,
    PromptScreen,
)
from corral.console.widgets import EventLog, ModelsTable
from corral.themes import THEMES
from fake_backend import FIXED_NOW, GiB, FakeBackend, default_models, fixed_host, model_info

SIZE = (120, 40)


def make_app(backend: FakeBackend | None = None, **kw: object) -> tuple[CorralApp, FakeBackend]:
    backend = backend if backend is not None else FakeBackend()
    return create_app(backend, clock=backend.clock, **kw), backend  # type: ignore[arg-type]


async def wait_for(pilot: Pilot, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Let the app run until `predicate()` holds (the backend works in workers)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for the console")
        await pilot.pause(0.01)


def table(app: CorralApp) -> ModelsTable:
    return app.screen.query_one(ModelsTable)


def state(app: CorralApp, name: str) -> str:
    return table(app).cell_text(name, "state")


async def ready(pilot: Pilot) -> CorralApp:
    """Wait for the dashboard to show the first status."""
    app = pilot.app
    assert isinstance(app, CorralApp)
    await wait_for(pilot, lambda: isinstance(app.screen, DashboardScreen) and table(app).row_count > 0)
    return app


async def press_to_row(pilot: Pilot, rows: DataTable, key: str) -> None:
    """Move the cursor of `rows` to the row keyed `key` with the arrow keys, as an operator would."""
    target = rows.get_row_index(key)
    while rows.cursor_row != target:
        await pilot.press("down" if rows.cursor_row < target else "up")


async def select(pilot: Pilot, name: str) -> None:
    """Move the models table's cursor to `name`."""
    app = pilot.app
    assert isinstance(app, CorralApp)
    await press_to_row(pilot, table(app), name)
    assert table(app).selected is not None and table(app).selected.name == name


def log_text(app: CorralApp) -> str:
    return "\n".join(strip.text for strip in app.screen.query_one(EventLog).lines)


def notifications(app: CorralApp) -> list[str]:
    return [f"{n.title}: {n.message}" for n in app._notifications]


# -- the table ------------------------------------------------------------------------------


async def test_table_shows_the_fake_models() -> None:
    app, backend = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        t = table(app)
        assert [m.name for m in t.models] == ["gemma-3-270m", "qwen2.5-0.5b-instruct", "tiny-llama", "broken"]
        assert state(app, "gemma-3-270m") == "ready"
        assert state(app, "tiny-llama") == "available"
        assert t.cell_text("gemma-3-270m", "quant") == "Q4_K_M"
        assert t.cell_text("gemma-3-270m", "memory") == "372.0/390.0 MiB"
        assert t.cell_text("tiny-llama", "memory") == "~3.1 MiB"
        assert t.cell_text("gemma-3-270m", "pinned") == "●"
        assert t.cell_text("qwen2.5-0.5b-instruct", "ttl") == "3m07s"
        assert t.cell_text("gemma-3-270m", "tps") == "61.3"
        assert t.cell_text("gemma-3-270m", "last_used") == "42s ago"
        assert t.cell_text("tiny-llama", "last_used") == "never"
        assert app.sub_title == "embedded"
        assert str(app.screen.query_one("#gpu-note").render()) == "no GPU (test)"


async def test_header_shows_a_remote_url() -> None:
    app, _ = make_app(FakeBackend(label="http://10.0.0.5:8000"))
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        assert (app.title, app.sub_title) == ("corral", "http://10.0.0.5:8000")


async def test_load_moves_the_selected_model_to_ready() -> None:
    app, backend = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await select(pilot, "tiny-llama")
        await pilot.press("l")
        await wait_for(pilot, lambda: state(app, "tiny-llama") == "ready")
        assert backend.calls == [("load", "tiny-llama")]
        assert table(app).selected.name == "tiny-llama"  # the cursor stayed on its model
        # the state came with its event; the measured memory comes with the next poll
        await wait_for(pilot, lambda: table(app).cell_text("tiny-llama", "memory") == "3.1/3.3 MiB")
        log = log_text(app)
        assert "tiny-llama  available → loading" in log
        assert "loading → ready" in log
        assert "loaded in 1.25 s memory est. 3.1 MiB, measured 3.3 MiB" in " ".join(log.split())
        # progress arrives every 5 %; the log keeps 0/25/50/75/100 only
        shown = [p for p in range(0, 101, 5) if f"loading {p}%" in log]
        assert shown == [0, 25, 50, 75, 100]


async def test_evict_asks_first_n_keeps_y_evicts() -> None:
    app, backend = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await select(pilot, "qwen2.5-0.5b-instruct")
        await pilot.press("e")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.press("n")
        await wait_for(pilot, lambda: isinstance(app.screen, DashboardScreen))
        await pilot.pause(0.05)
        assert backend.calls == []
        assert state(app, "qwen2.5-0.5b-instruct") == "ready"

        await pilot.press("e")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.press("y")
        await wait_for(pilot, lambda: state(app, "qwen2.5-0.5b-instruct") == "available")
        assert backend.calls == [("evict", "qwen2.5-0.5b-instruct", False)]
        assert "ready → unloading  (evicted by operator)" in log_text(app)


async def test_evicting_a_pinned_model_says_so_and_forces() -> None:
    app, backend = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await select(pilot, "gemma-3-270m")
        await pilot.press("e")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        assert "pinned" in str(app.screen.query_one("#confirm-detail").render())
        await pilot.press("y")
        await wait_for(pilot, lambda: state(app, "gemma-3-270m") == "available")
        assert backend.calls == [("evict", "gemma-3-270m", True)]


async def test_evict_of_a_model_that_is_not_loaded_only_warns() -> None:
    app, backend = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await select(pilot, "tiny-llama")
        await pilot.press("e")
        await pilot.pause(0.05)
        assert isinstance(app.screen, DashboardScreen)
        assert backend.calls == []
        assert any("tiny-llama is not loaded" in n for n in notifications(app))


async def test_p_toggles_pin() -> None:
    app, backend = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await select(pilot, "qwen2.5-0.5b-instruct")
        await pilot.press("p")
        await wait_for(pilot, lambda: table(app).cell_text("qwen2.5-0.5b-instruct", "pinned") == "●")
        assert backend.info("qwen2.5-0.5b-instruct").pinned
        assert table(app).cell_text("qwen2.5-0.5b-instruct", "ttl") == "∞"
        await pilot.press("p")
        await wait_for(pilot, lambda: table(app).cell_text("qwen2.5-0.5b-instruct", "pinned") == "")
        assert backend.calls == [("pin", "qwen2.5-0.5b-instruct", True),
                                 ("pin", "qwen2.5-0.5b-instruct", False)]
        assert "qwen2.5-0.5b-instruct  pinned" in log_text(app)
        assert "qwen2.5-0.5b-instruct  unpinned" in log_text(app)


async def test_failed_load_notifies_with_the_reason_and_shows_failed() -> None:
    app, backend = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await select(pilot, "broken")
        await pilot.press("l")
        await wait_for(pilot, lambda: state(app, "broken") == "failed")
        await wait_for(pilot, lambda: any("load broken failed" in n for n in notifications(app)))
        [note] = [n for n in notifications(app) if "load broken failed" in n]
        assert backend.failures["broken"] in note
        assert backend.info("broken").error == backend.failures["broken"]
        assert "loading → failed  (llama_model_load: error loading model" in log_text(app)
        # evict on a failed model clears it without asking (nothing is lost)
        await pilot.press("e")
        await wait_for(pilot, lambda: state(app, "broken") == "available")
        assert backend.calls[-1] == ("evict", "broken", False)


async def test_unload_all_asks_then_unloads_every_loaded_model() -> None:
    app, backend = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await pilot.press("u")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.press("y")
        await wait_for(pilot, lambda: all(state(app, m.name) == "available" for m in table(app).models))
        assert ("unload_all",) in backend.calls


async def test_t_cycles_the_themes() -> None:
    app, _ = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        names = [theme.name for theme in THEMES]
        assert app.theme == "corral-dark" == names[0]
        seen = []
        for _ in names:
            await pilot.press("t")
            await pilot.pause()
            seen.append(app.theme)
        assert seen == names[1:] + names[:1]


async def test_a_theme_switch_recolours_the_table() -> None:
    app, _ = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        before = table(app)._cells["gemma-3-270m"]["state"].style
        await pilot.press("t")
        await wait_for(pilot, lambda: table(app)._cells["gemma-3-270m"]["state"].style != before)


def test_unknown_theme_is_a_config_error_naming_the_key() -> None:
    with pytest.raises(ConfigError, match="console.theme = 'nope': unknown theme; available themes: .*corral-contrast"):
        create_app(FakeBackend(), theme="nope")  # type: ignore[arg-type]


async def test_app_starts_with_the_theme_asked_for() -> None:
    app, _ = make_app(theme="corral-light")
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        assert app.theme == "corral-light"


async def test_help_lists_the_command_table() -> None:
    app, _ = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await pilot.press("question_mark")
        await wait_for(pilot, lambda: isinstance(app.screen, HelpScreen))
        help_table = app.screen.query_one("#help-table")
        rows = [help_table.get_row(command.id) for command in COMMANDS]
        assert [str(row[2]).rstrip("…") for row in rows] == [c.description for c in COMMANDS]
        assert [str(row[0]) for row in rows] == ["l", "e", "p", "⏎", "d", "/", "s", "u", "r", "t", "?", "q",
                                                 "c", "^c", "esc", "^l", "r", "b", "esc"]
        assert [str(row[1]) for row in rows] == ["dashboard"] * 13 + ["prompt"] * 3 + ["config"] * 3
        assert str(help_table.get_row("corral.evict")[2]) == "Evict…"  # it asks first
        assert str(help_table.get_row("corral.load")[2]) == "Load"
        await pilot.press("escape")
        await wait_for(pilot, lambda: isinstance(app.screen, DashboardScreen))


async def test_keymap_remaps_a_command_by_id() -> None:
    app, backend = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        app.set_keymap({"corral.load": "L"})
        await select(pilot, "tiny-llama")
        await pilot.press("l")
        await pilot.pause(0.05)
        assert backend.calls == []
        await pilot.press("L")
        await wait_for(pilot, lambda: state(app, "tiny-llama") == "ready")
        await pilot.press("question_mark")
        await wait_for(pilot, lambda: isinstance(app.screen, HelpScreen))
        assert str(app.screen.query_one("#help-table").get_row("corral.load")[0]) == "L"


def test_one_command_table_feeds_the_bindings() -> None:
    for scope in ("dashboard", "prompt", "config"):
        ids = [binding.id for binding in bindings_for(scope)]
        assert ids == [command.id for command in COMMANDS if command.scope == scope]
    assert DashboardScreen.BINDINGS == bindings_for("dashboard")
    assert PromptScreen.BINDINGS == bindings_for("prompt")
    assert ConfigScreen.BINDINGS == bindings_for("config")
    keys = {command.id: command.key for command in COMMANDS}
    assert keys == {
        "corral.load": "l", "corral.evict": "e", "corral.pin": "p", "corral.unload_all": "u",
        "corral.prompt": "enter", "corral.details": "d", "corral.filter": "/",
        "corral.refresh": "r", "corral.help": "question_mark", "corral.quit": "q",
        "corral.theme": "t", "corral.prompt.stop": "ctrl+c", "corral.prompt.back": "escape",
        "corral.prompt.clear": "ctrl+l", "corral.session": "s", "corral.config": "c",
        "corral.config.reload": "r", "corral.config.rollback": "b", "corral.config.back": "escape",
    }
    [stop] = [b for b in bindings_for("prompt") if b.id == "corral.prompt.stop"]
    assert stop.priority  # Input binds ctrl+c to copy; stop must win
    assert CorralApp.BINDINGS == []  # no single-letter key at app level: screens scope them


async def test_quit_without_requests_exits_at_once() -> None:
    app, _ = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await pilot.press("q")
        await wait_for(pilot, lambda: not app.is_running)


async def test_quit_with_a_request_in_flight_asks_first() -> None:
    app, backend = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        backend.set_in_flight("gemma-3-270m", 2)
        await wait_for(pilot, lambda: state(app, "gemma-3-270m") == "busy")
        await pilot.press("q")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        assert "2 request(s) in flight (gemma-3-270m)" in str(app.screen.query_one("#confirm-question").render())
        await pilot.press("n")
        await wait_for(pilot, lambda: isinstance(app.screen, DashboardScreen))
        assert app.is_running
        await pilot.press("q")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.press("y")
        await wait_for(pilot, lambda: not app.is_running)


async def test_streamed_requests_show_in_the_log() -> None:
    app, backend = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        text = "".join([c.text async for c in backend.complete("gemma-3-270m", "hi", request_id="req-7")])
        assert text == "Once upon a time"
        await wait_for(pilot, lambda: "request req-7 length" in log_text(app))
        assert "4+4 tokens, 33.3 tok/s, 0.10 s" in log_text(app)
        backend.publish(Notice(model="gemma-3-270m", level="warning", message="queue is filling up"))
        await wait_for(pilot, lambda: "queue is filling up" in log_text(app))


async def test_progress_that_jumps_is_logged_at_each_quarter_crossed() -> None:
    app, _ = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        log = app.screen.query_one(EventLog)
        written = [log.add_event(LoadProgress(model="m", percent=p)) for p in (0, 3, 60, 61, 74, 75, 100)]
        assert written == [True, False, True, False, False, True, True]
        assert log.add_event(LoadProgress(model="m", percent=0))  # a new load starts over


async def test_gpu_panel_shows_each_gpu() -> None:
    gpu = GPUStats(index=0, name="NVIDIA H100 80GB HBM3", uuid="GPU-1", util_percent=37.0,
                   mem_used=12 * GiB, mem_total=80 * GiB, temperature_c=46.0, power_w=182.0,
                   power_limit_w=700.0)
    app, _ = make_app(FakeBackend(host=fixed_host(gpus=(gpu,))))
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await wait_for(pilot, lambda: bool(app.screen.query(".gpu-row")))
        row = app.screen.query_one(".gpu-row")
        # the row's widgets fill in as the first status arrives: wait for that, not a fixed time
        await wait_for(pilot, lambda: row.query_one(".gpu-vram").value_text == "12.0/80.0 GiB")
        assert "GPU0 NVIDIA H100 80GB HBM3" in str(row.query_one(".gpu-name").render())
        assert row.query_one(".gpu-vram").value_text == "12.0/80.0 GiB"
        assert row.query_one(".gpu-util").value_text == "37%"
        assert "46°C" in str(row.query_one(".gpu-extra").render())
        assert not app.screen.query_one("#gpu-note").display


async def test_a_failing_status_poll_is_reported_once_and_recovers() -> None:
    backend = FakeBackend()
    real_status = backend.status
    failures = {"left": 3}

    async def flaky_status():
        if failures["left"]:
            failures["left"] -= 1
            raise ConnectionError("server at http://x:8000 is not answering")
        return await real_status()

    backend.status = flaky_status  # type: ignore[method-assign]
    app, _ = make_app(backend, poll_interval=0.01)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        errors = [n for n in notifications(app) if "status unavailable" in n]
        assert errors == ["status unavailable: ConnectionError: server at http://x:8000 is not answering"]


async def test_a_broken_event_stream_is_reported_and_resubscribed() -> None:
    backend = FakeBackend()
    real_events = backend.events
    calls: list[int | None] = []

    def flaky_events(after_seq: int | None = None):
        calls.append(after_seq)
        if len(calls) == 1:
            async def broken():
                raise ConnectionError("SSE stream closed by peer")
                yield  # pragma: no cover - makes this an async generator
            return broken()
        return real_events(after_seq)

    backend.events = flaky_events  # type: ignore[method-assign]
    app, _ = make_app(backend)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await wait_for(pilot, lambda: backend.subscribers == 1)
        assert calls == [0, 0]
        assert "event stream lost: ConnectionError: SSE stream closed by peer" in notifications(app)
        await select(pilot, "tiny-llama")
        await pilot.press("l")
        await wait_for(pilot, lambda: "loading → ready" in log_text(app))


async def test_works_at_80x24() -> None:
    app, backend = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        await ready(pilot)
        # the table's header and all four models fit, inside its border
        await wait_for(pilot, lambda: table(app).region.height >= 7)
        screen = app.screen
        for widget in ("#host", "#models", "#events", "Footer"):
            region = screen.query_one(widget).region
            assert region.height > 0 and region.bottom <= 24 and region.right <= 80, widget
        assert screen.query_one("#events").region.height >= 5
        await select(pilot, "tiny-llama")
        await pilot.press("l")
        await wait_for(pilot, lambda: state(app, "tiny-llama") == "ready")
        await pilot.press("question_mark")
        await wait_for(pilot, lambda: isinstance(app.screen, HelpScreen))
        box = app.screen.query_one("#help-box").region
        assert box.right <= 80 and box.bottom <= 24


# -- live configuration, sessions, aliases and waiting loads ----------------------------------


def versions_shown(app: CorralApp) -> list[tuple[str, ...]]:
    """The config screen's rows: (number, applied, source, changes)."""
    versions = app.screen.query_one("#versions")
    return [tuple(str(cell) for cell in versions.get_row_at(i)) for i in range(versions.row_count)]


def version_detail(app: CorralApp) -> str:
    return str(app.screen.query_one("#version-detail").render())


async def open_config(pilot: Pilot) -> ConfigScreen:
    app = await ready(pilot)
    await pilot.press("c")
    await wait_for(pilot, lambda: isinstance(app.screen, ConfigScreen) and bool(app.screen.versions))
    assert isinstance(app.screen, ConfigScreen)
    return app.screen


async def test_config_screen_lists_versions_and_r_reloads_a_new_one() -> None:
    app, backend = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await open_config(pilot)
        assert versions_shown(app) == [("1", "--:--:--", "start", "no changes")]
        assert "version 1" in version_detail(app) and "(running)" in version_detail(app)
        await reload_once(pilot)
        number, _, source, changes = versions_shown(app)[0]
        assert (number, source, changes) == ("2", "console", "defaults.keep_alive: 300.0 → 60.0")
        # the cursor was on the newest version, so it follows the new newest and shows its diff
        assert "version 2" in version_detail(app)
        assert "defaults.keep_alive: 300.0 → 60.0" in version_detail(app)
        backend.reload_diff = ("budgets.max_loaded: 3 → 2", "models[qwen]: added")
        await select_version(pilot, "1")
        await pilot.press("r")
        await wait_for(pilot, lambda: len(versions_shown(app)) == 3)
        assert versions_shown(app)[0][3] == "budgets.max_loaded: 3 → 2; +1 more"
        assert "version 1" in version_detail(app)  # off the newest, the cursor stays put
        assert "config v3 applied, from console budgets.max_loaded: 3 → 2; models[qwen]: added" in log_words(app)
        await pilot.press("escape")
        await wait_for(pilot, lambda: isinstance(app.screen, DashboardScreen))
        assert "config v3 applied, from console" in log_text(app)


def log_words(app: CorralApp) -> str:
    """The event log's text with whitespace folded (lines wrap), from whichever screen is open."""
    [dashboard] = [screen for screen in app.screen_stack if isinstance(screen, DashboardScreen)]
    log = dashboard.query_one(EventLog)
    return " ".join(" ".join(strip.text for strip in log.lines).split())


async def select_version(pilot: Pilot, number: str) -> None:
    await press_to_row(pilot, pilot.app.screen.query_one("#versions", DataTable), number)


async def reload_once(pilot: Pilot) -> None:
    """`r` on the config screen, and wait for the second version to show."""
    await pilot.press("r")
    await wait_for(pilot, lambda: len(versions_shown(pilot.app)) == 2)


async def ask_rollback(pilot: Pilot, number: str) -> None:
    """Select version `number` and press `b`: the confirm dialog opens."""
    await select_version(pilot, number)
    await pilot.press("b")
    await wait_for(pilot, lambda: isinstance(pilot.app.screen, ConfirmScreen))


async def test_config_screen_follows_a_change_made_elsewhere() -> None:
    """A reload from anywhere (the file watcher, corral reload, the API) shows up by itself."""
    app, backend = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await open_config(pilot)
        await backend.reload_config("file change")
        await wait_for(pilot, lambda: len(versions_shown(app)) == 2)
        assert versions_shown(app)[0][2] == "file change"


async def test_a_rejected_reload_notifies_once_and_is_logged() -> None:
    app, backend = make_app()
    backend.reload_error = "defaults.n_ctx = 'lots': expected an integer"
    async with app.run_test(size=SIZE) as pilot:
        await open_config(pilot)
        await pilot.press("r")
        rejected = "config rejected: nothing changed: defaults.n_ctx = 'lots': expected an integer"
        await wait_for(pilot, lambda: rejected in notifications(app))
        await wait_for(pilot, lambda: "config rejected, from console: defaults.n_ctx = 'lots'" in log_words(app))
        await pilot.pause(0.1)
        # the worker's ConfigError and the config_rejected event are one notification
        assert notifications(app).count(rejected) == 1
        assert len(versions_shown(app)) == 1


async def test_an_invalid_file_edit_is_notified_on_the_dashboard() -> None:
    app, backend = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        backend.publish(ConfigRejected(source="file change", error="unknown key 'budget'; did you mean 'budgets'?"))
        await wait_for(pilot, lambda: "config rejected, from file change: unknown key 'budget'" in log_text(app))
        assert ("config rejected: nothing changed: unknown key 'budget'; did you mean 'budgets'?"
                in notifications(app))


async def test_rollback_asks_then_applies_the_selected_version() -> None:
    app, backend = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await open_config(pilot)
        await reload_once(pilot)
        await pilot.press("b")  # the newest is the running one: nothing to roll back to
        await wait_for(pilot, lambda: any("Version 2 is the running configuration" in n for n in notifications(app)))
        assert isinstance(app.screen, ConfigScreen)
        await ask_rollback(pilot, "1")
        assert "Roll back to version 1?" in str(app.screen.query_one("#confirm-question").render())
        await pilot.press("n")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfigScreen))
        await pilot.pause(0.05)
        assert len(versions_shown(app)) == 2
        await pilot.press("b")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.press("y")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfigScreen) and len(versions_shown(app)) == 3)
        number, _, source, _ = versions_shown(app)[0]
        assert (number, source) == ("3", "console (rollback to 1)")


async def test_rollback_to_a_version_no_longer_kept_says_so() -> None:
    app, backend = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await open_config(pilot)
        await reload_once(pilot)
        del backend._versions[0]  # the backend dropped it meanwhile
        await ask_rollback(pilot, "1")
        await pilot.press("y")
        await wait_for(pilot, lambda: "rollback to version 1 failed: config version 1 does not exist"
                       in notifications(app))


async def test_session_filter_shows_only_that_sessions_lines() -> None:
    app, backend = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        for request, session in (("req-1", "chat-42"), ("req-2", "batch-7"), ("req-3", None)):
            backend.publish(RequestFinished(model="gemma-3-270m", request_id=request, session_id=session,
                                            finish_reason="stop", prompt_tokens=4, completion_tokens=8,
                                            ttft_s=0.01, duration_s=0.2, tokens_per_s=40.0))
        await wait_for(pilot, lambda: "request req-3 stop" in log_text(app))
        assert "session chat-42" in log_text(app) and "session batch-7" in log_text(app)
        await pilot.press("s")
        await wait_for(pilot, lambda: app.focused is not None and app.focused.id == "session")
        await pilot.press(*"chat")  # typed into the box: c does not open the config screen
        await wait_for(pilot, lambda: "req-2" not in log_text(app))
        assert "request req-1 stop" in log_text(app) and "req-3" not in log_text(app)
        assert "loading" not in log_text(app) and isinstance(app.screen, DashboardScreen)
        assert app.screen.query_one(EventLog).border_title == "events · session “chat”"
        await pilot.press("enter")
        await wait_for(pilot, lambda: app.focused is table(app))
        backend.publish(RequestFinished(model="gemma-3-270m", request_id="req-4", session_id="batch-7",
                                        finish_reason="stop", prompt_tokens=1, completion_tokens=1,
                                        ttft_s=0.01, duration_s=0.1, tokens_per_s=10.0))
        backend.publish(RequestFinished(model="gemma-3-270m", request_id="req-5", session_id="chat-42",
                                        finish_reason="stop", prompt_tokens=1, completion_tokens=1,
                                        ttft_s=0.01, duration_s=0.1, tokens_per_s=10.0))
        await wait_for(pilot, lambda: "req-5" in log_text(app))
        assert "req-4" not in log_text(app)
        await pilot.press("s", "escape")  # esc clears the filter: every line is back
        await wait_for(pilot, lambda: "req-4" in log_text(app))
        assert "req-2" in log_text(app) and app.screen.query_one(EventLog).border_title == "events"


def queue_lines(app: CorralApp) -> list[str]:
    return [" ".join(line.split()) for line in str(app.screen.query_one("#queues").render()).splitlines()]


async def test_aliases_and_waiting_loads_show_in_the_table_and_queue_panel() -> None:
    models = default_models()
    models.append(model_info("terse", state="ready", source="alias", alias_of="gemma-3-270m",
                             in_flight=2, active=2))
    backend = FakeBackend(models)
    backend._set("tiny-llama", load_position=2)
    backend._set("broken", load_position=1)
    app, _ = make_app(backend)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        assert table(app).cell_text("terse", "name") == "terse → gemma-3-270m"
        assert state(app, "tiny-llama") == "waiting #2" and state(app, "broken") == "waiting #1"
        await wait_for(pilot, lambda: len(queue_lines(app)) == 5)
        assert queue_lines(app)[1:] == ["gemma-3-270m 0 0/8 –", "qwen2.5-0.5b-inst… 0 0/4 –",
                                        "broken load waiting #1", "tiny-llama load waiting #2"]
        # the alias is not a second loaded model, and an event about its base patches it too
        assert app.screen.query_one("#host").border_subtitle == "2/3 models loaded"
        table(app).patch("gemma-3-270m", state="loading", load_percent=40)
        assert state(app, "terse") == "loading 40%"
        await pilot.press("slash", *"gemma")  # the filter finds an alias by its base's name
        await wait_for(pilot, lambda: [m.name for m in table(app).models] == ["gemma-3-270m", "terse"])


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


def test_importing_the_console_does_not_import_llama_cpp() -> None:
    code = (
        "import sys\n"
        "import corral.console.app\n"
        "bad = sorted(m for m in sys.modules if m == 'llama_cpp' or m.startswith('llama_cpp.')"
        " or m in ('corral.backend.engine', 'corral.backend.manager', 'corral.backend.llamalog'))\n"
        "print(','.join(bad))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""


def test_fake_backend_is_deterministic() -> None:
    import asyncio

    async def run() -> list[tuple[str, int, float]]:
        backend = FakeBackend()
        stream = backend.events(after_seq=0)
        await backend.load("tiny-llama")
        events = []
        async for event in stream:
            events.append((event.type, event.seq, event.ts))
            if event.type == "state" and event.new == "ready":
                break
        await backend.aclose()
        return events

    from corral.backend.api import Backend

    assert isinstance(FakeBackend(), Backend)
    first, second = asyncio.run(run()), asyncio.run(run())
    assert first == second
    assert {ts for _, _, ts in first} == {FIXED_NOW}


# -- the prompt screen ----------------------------------------------------------------------


def transcript(app: CorralApp) -> list[str]:
    return [str(widget.render()) for widget in app.screen.query("#transcript Static")]


async def open_prompt(pilot: Pilot, model: str) -> PromptScreen:
    app = await ready(pilot)
    await select(pilot, model)
    await pilot.press("enter")
    await wait_for(pilot, lambda: isinstance(app.screen, PromptScreen))
    assert isinstance(app.screen, PromptScreen) and app.screen.model == model
    return app.screen


async def send(pilot: Pilot, text: str) -> None:
    await pilot.press(*text)
    await pilot.press("enter")


async def test_prompt_streams_the_answer_and_shows_ttft_and_speed() -> None:
    app, backend = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await open_prompt(pilot, "qwen2.5-0.5b-instruct")
        await send(pilot, "hello")
        await wait_for(pilot, lambda: "TTFT 10 ms · 33.3 tok/s · 4 tokens · length" in transcript(app))
        assert transcript(app) == ["hello", "Once upon a time", "TTFT 10 ms · 33.3 tok/s · 4 tokens · length"]
        assert "TTFT 10 ms" in str(app.screen.query_one("#prompt-status").render())
        [(_, model, prompt, options)] = [c for c in backend.calls if c[0] == "complete"]
        assert (model, prompt) == ("qwen2.5-0.5b-instruct", "hello")
        assert options["max_tokens"] == 256 and options["temperature"] == 0.7
        assert options["session_id"].startswith("console-")


async def test_prompt_parameters_and_history_go_with_the_next_question() -> None:
    app, backend = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await open_prompt(pilot, "gemma-3-270m")
        await send(pilot, "one")
        await wait_for(pilot, lambda: len(transcript(app)) == 3)
        app.screen.query_one("#param-temperature").value = "0"
        app.screen.query_one("#param-max-tokens").value = "32"
        app.screen.query_one("#param-system").value = "Be brief."
        app.screen.query_one("#param-max-tokens").value = "not a number"  # invalid: the last valid value stays
        app.screen.query_one("#prompt-input").focus()
        await send(pilot, "two")
        await wait_for(pilot, lambda: len(transcript(app)) == 6)
        _, _, prompt, options = [c for c in backend.calls if c[0] == "complete"][-1]
        assert prompt == "Be brief.\none\nOnce upon a time\ntwo"
        assert (options["temperature"], options["max_tokens"]) == (0.0, 32)
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


# -- details, filter, queue panel, progress bar, palette, config --------------------------------


def details_text(app: CorralApp) -> str:
    """The details screen's text, whitespace folded."""
    import io

    from rich.console import Console

    console = Console(width=100, file=io.StringIO(), color_system=None)
    console.print(app.screen.query_one("#details-body").content)
    return " ".join(console.file.getvalue().split())


async def test_details_show_metadata_memory_and_latency_percentiles() -> None:
    from corral.backend.snapshot import RequestPercentiles

    stats = RequestPercentiles(count=12, ttft_p50=0.048, ttft_p90=0.07, ttft_p99=0.2, latency_p50=0.9,
                               latency_p90=1.4, latency_p99=2.5, tokens_per_s_p50=61.2)
    backend = FakeBackend()
    backend._set("gemma-3-270m", requests=stats)
    app, _ = make_app(backend)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await pilot.press("d")
        await wait_for(pilot, lambda: isinstance(app.screen, DetailsScreen))
        body = details_text(app)
        for expected in ("architecture gemma3", "parameters 268M", "chat template fallback:gemma",
                         "estimate 372.0 MiB", "measured 390.0 MiB", "load time 840 ms",
                         "requests last 12", "TTFT p50 48 ms p90 70 ms p99 200 ms",
                         "latency p50 900 ms p90 1.40 s p99 2.50 s", "speed 61.2 tok/s (median)"):
            assert expected in body, expected
        await pilot.press("escape")
        await wait_for(pilot, lambda: isinstance(app.screen, DashboardScreen))
        await select(pilot, "tiny-llama")
        await pilot.press("d")
        await wait_for(pilot, lambda: isinstance(app.screen, DetailsScreen))
        assert "requests none yet" in details_text(app)
        # it follows the model while open: a load shows its measured memory and load time
        app.run_backend("load tiny-llama", lambda: backend.load("tiny-llama"))
        await wait_for(pilot, lambda: "load time 1.25 s" in details_text(app))


async def test_slash_filters_the_models_table() -> None:
    app, backend = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await pilot.press("slash")
        await wait_for(pilot, lambda: app.focused is not None and app.focused.id == "filter")
        await pilot.press("q", "w", "e")  # typed into the filter: q does not quit
        await wait_for(pilot, lambda: [m.name for m in table(app).models] == ["qwen2.5-0.5b-instruct"])
        assert app.is_running and "filter" in str(table(app).border_title)
        await pilot.press("enter")
        await wait_for(pilot, lambda: app.focused is table(app))
        assert [m.name for m in table(app).models] == ["qwen2.5-0.5b-instruct"]
        await pilot.press("l")  # keys act on the filtered table's selection
        await pilot.pause(0.05)
        await pilot.press("slash")
        for _ in range(3):
            await pilot.press("backspace")
        await pilot.press(*"available")  # state matches too
        await wait_for(pilot, lambda: [m.name for m in table(app).models] == ["tiny-llama", "broken"])
        await pilot.press("escape")  # clears the filter
        await wait_for(pilot, lambda: len(table(app).models) == 4)
        assert table(app).border_title == "models"
        assert ("load", "qwen2.5-0.5b-instruct") in backend.calls


async def test_queue_panel_shows_waiting_active_and_oldest_wait() -> None:
    app, backend = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        panel = app.screen.query_one("#queues")
        lines = lambda: [" ".join(line.split()) for line in str(panel.render()).splitlines()]  # noqa: E731
        await wait_for(pilot, lambda: len(lines()) == 3)
        assert lines() == ["model wait slots oldest", "gemma-3-270m 0 0/8 –", "qwen2.5-0.5b-inst… 0 0/4 –"]
        backend.set_in_flight("gemma-3-270m", 11)
        backend._set("gemma-3-270m", oldest_wait_s=4.25)
        app.action_refresh_status()
        await wait_for(pilot, lambda: "gemma-3-270m 3 8/8 4.2s" in lines())
        await backend.unload_all()
        await wait_for(pilot, lambda: lines() == ["model wait slots oldest", "no model loaded"])


async def test_a_progress_bar_shows_while_a_model_loads() -> None:
    app, backend = make_app(FakeBackend(step_delay=0.05))
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        bar = app.screen.query_one("#loading")
        assert not bar.display
        await select(pilot, "tiny-llama")
        await pilot.press("l")
        await wait_for(pilot, lambda: bar.display and (app.screen.query_one("#load-progress").progress or 0) >= 25)
        assert "loading tiny-llama" in str(app.screen.query_one("#load-label").render())
        await wait_for(pilot, lambda: state(app, "tiny-llama") == "ready")
        await wait_for(pilot, lambda: not bar.display)


async def test_sparklines_take_one_sample_per_telemetry_timestamp() -> None:
    from dataclasses import replace

    app, backend = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        cpu = app.screen.query_one("#trend-cpu")
        app.action_refresh_status()
        await pilot.pause(0.2)
        assert list(cpu.samples) == [0.23]  # the same sample polled again is not a new point
        backend.host = replace(backend.host, ts=backend.host.ts + 1, cpu_percent=100.0)
        app.action_refresh_status()
        await wait_for(pilot, lambda: list(cpu.samples) == [0.23, 1.0])
        assert str(cpu.render()).endswith("▃█")


def test_a_trend_squeezes_its_history_keeping_peaks() -> None:
    from corral.console.widgets import Trend

    trend = Trend("x")
    for value in [0.0] * 7 + [1.0] + [0.0] * 2:
        trend.samples.append(value)
    assert trend.columns(20) == [0.0] * 7 + [1.0, 0.0, 0.0]
    assert trend.columns(5) == [0.0, 0.0, 0.0, 1.0, 0.0]
    assert trend.columns(3) == [0.0, 1.0]  # 10 samples in stretches of 4: whole ones only


async def test_command_palette_lists_the_command_table_and_runs_a_command() -> None:
    from textual.command import CommandPalette

    app, backend = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await select(pilot, "tiny-llama")
        await pilot.press("ctrl+p")
        await wait_for(pilot, lambda: isinstance(app.screen, CommandPalette))
        await pilot.press(*"load")
        await pilot.pause(0.3)
        await pilot.press("enter")
        await wait_for(pilot, lambda: state(app, "tiny-llama") == "ready")
        assert backend.calls == [("load", "tiny-llama")]


async def test_palette_offers_the_commands_of_the_screen_it_opened_over() -> None:
    from corral.console.palette import CommandTableProvider

    app, _ = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await open_prompt(pilot, "gemma-3-270m")
        provider = CommandTableProvider(app.screen)
        titles = [hit.text async for hit in provider.discover()]
        assert "Stop (^c)" in titles and "Theme (t)" in titles and "Quit (q)" in titles
        assert not any(title.startswith("Load") for title in titles)  # dashboard-only


async def test_keymap_from_config_is_applied_at_start_and_checked() -> None:
    app, backend = make_app(keymap={"corral.load": "L", "corral.details": "i, f3"})
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await select(pilot, "tiny-llama")
        await pilot.press("l")
        await pilot.pause(0.05)
        assert backend.calls == []
        await pilot.press("L")
        await wait_for(pilot, lambda: state(app, "tiny-llama") == "ready")
        await pilot.press("f3")
        await wait_for(pilot, lambda: isinstance(app.screen, DetailsScreen))
    with pytest.raises(ConfigError, match="console.keymap: unknown command id 'corral.lod'"):
        make_app(keymap={"corral.lod": "L"})


def test_cli_refuses_a_bad_console_config_naming_the_key(tmp_path: Path) -> None:
    config = tmp_path / "corral.toml"
    config.write_text('include_default_model = false\n[console]\ntheme = "neon"\n', encoding="utf-8")
    result = subprocess.run([sys.executable, "-m", "corral.console.cli", "--config", str(config)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "console.theme = 'neon': unknown theme" in result.stderr
