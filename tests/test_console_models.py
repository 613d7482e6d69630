"""Acting on the selected model: load (with its progress bar), evict, pin, unload all, and
the details screen."""

from __future__ import annotations

from typing import Any

from corral.console.screens import ConfirmScreen, DashboardScreen, DetailsScreen
from console_support import (SIZE, details_text, log_text, make_app, notifications, ready, select, state,
                             table, wait_for)
from fake_backend import FakeBackend


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


async def test_a_progress_bar_shows_while_a_model_loads() -> None:
    """What the bar showed at each update is recorded, not sampled: Pilot's key press may
    return only after a short fake load has finished."""
    app, backend = make_app(FakeBackend(step_delay=0.05))
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        bar = app.screen.query_one("#loading")
        assert not bar.display
        shown: list[tuple[bool, float, str]] = []
        show = bar.show

        def recording(models: Any) -> None:
            show(models)
            shown.append((bool(bar.display), app.screen.query_one("#load-progress").progress or 0,
                          str(app.screen.query_one("#load-label").render())))

        bar.show = recording
        await select(pilot, "tiny-llama")
        await pilot.press("l")
        await wait_for(pilot, lambda: state(app, "tiny-llama") == "ready")
        await wait_for(pilot, lambda: not bar.display)
        assert any(display and progress >= 25 and "loading tiny-llama" in label
                   for display, progress, label in shown), shown


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


async def test_unload_all_asks_then_unloads_every_loaded_model() -> None:
    app, backend = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await pilot.press("u")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.press("y")
        await wait_for(pilot, lambda: all(state(app, m.name) == "available" for m in table(app).models))
        assert ("unload_all",) in backend.calls


async def test_details_say_what_an_embedding_only_model_serves() -> None:
    backend = FakeBackend()
    backend._set("gemma-3-270m", kind="rerank")
    app, _ = make_app(backend)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await pilot.press("d")
        await wait_for(pilot, lambda: isinstance(app.screen, DetailsScreen))
        assert "serves reranking only: POST /v1/rerank" in details_text(app)


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
