"""The dashboard: the models table, the host and GPU panels, the event log and its
session filter, the table filter, the queue panel and the trends."""

from __future__ import annotations

from typing import Any

import pytest

from corral.backend.events import LoadProgress, Notice, RequestFinished
from corral.backend.telemetry import GPUStats
from corral.console.app import CorralApp
from corral.console.screens import DashboardScreen, HelpScreen
from corral.console.widgets import EventLog
from console_support import SIZE, log_text, make_app, ready, select, state, table, wait_for
from fake_backend import FakeBackend, GiB, default_models, fixed_host, model_info


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


async def test_a_poll_repaints_only_what_it_changed(monkeypatch: pytest.MonkeyPatch) -> None:
    """An idle console polls every second: a poll that changes nothing shown repaints
    nothing (the GPU note's and the host bar's same text used to lay the whole screen out
    again), and one that changes a figure repaints only the widget that shows it."""
    from dataclasses import replace

    from textual.widget import Widget

    app, backend = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        repainted: set[str] = set()
        real_refresh = Widget.refresh

        def refresh(self: Widget, *regions: Any, **kwargs: Any) -> Widget:
            repainted.add(f"{type(self).__name__}#{self.id}")
            return real_refresh(self, *regions, **kwargs)

        async def poll() -> set[str]:
            repainted.clear()
            before = app.status
            app.action_refresh_status()
            await wait_for(pilot, lambda: app.status is not before)
            await pilot.pause()
            return set(repainted)

        await poll()  # the first status's own repaints (the table's second pass) are over after one more
        monkeypatch.setattr(Widget, "refresh", refresh)
        host = backend.host  # the same sample time: no new sparkline point
        backend.host = replace(host, ram_used=host.ram_used + 4096, process_rss=host.process_rss + 4096)
        assert await poll() == set()  # a few KiB moves neither a bar nor a figure
        backend.host = replace(host, cpu_percent=55.0)
        backend._set("qwen2.5-0.5b-instruct", ttl_left_s=186.0)  # counts down; its queue line is the same
        assert await poll() == {"Gauge#gauge-cpu", "ModelsTable#models"}
        backend._set("qwen2.5-0.5b-instruct", queued=2)
        assert "QueuePanel#queues" in await poll()


async def test_a_trend_repaints_when_its_line_changes_not_on_every_sample() -> None:
    from textual.app import App, ComposeResult

    from corral.console.widgets import Trend

    class OneTrend(App[None]):
        def compose(self) -> ComposeResult:
            yield Trend("x", history=40)

    app = OneTrend()
    async with app.run_test(size=(12, 1)) as pilot:  # 10 columns for the line
        trend = app.query_one(Trend)
        for value in [0.0] * 40:
            trend.push(value)
        await pilot.pause()
        repaints = 0
        real_refresh = trend.refresh

        def refresh(*args: Any, **kwargs: Any) -> Trend:
            nonlocal repaints
            repaints += 1
            return real_refresh(*args, **kwargs)

        trend.refresh = refresh  # type: ignore[method-assign]
        for value in [0.01] * 20:  # full history, squeezed 4 to a column: the same line
            trend.push(value)
        assert repaints == 0
        trend.push(1.0)
        assert repaints == 1
        await pilot.pause()
        assert str(trend.render()) == "x ▁▁▁▁▁▁▁▁▁█"


def test_a_trend_squeezes_its_history_keeping_peaks() -> None:
    from corral.console.widgets import Trend

    trend = Trend("x")
    for value in [0.0] * 7 + [1.0] + [0.0] * 2:
        trend.samples.append(value)
    assert trend.columns(20) == [0.0] * 7 + [1.0, 0.0, 0.0]
    assert trend.columns(5) == [0.0, 0.0, 0.0, 1.0, 0.0]
    assert trend.columns(3) == [0.0, 1.0]  # 10 samples in stretches of 4: whole ones only


# -- the event log ----------------------------------------------------------------------------


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


# -- the table filter and the queue panel ------------------------------------------------------


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
