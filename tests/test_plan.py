"""The dry run of a load (`corral plan`, GET /api/models/{name}/plan, the details view): it
agrees with what the load then does, changes nothing, explains a refusal, and its suggestions
really fit."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from corral.backend.errors import BadRequest
from corral.backend.remote import RemoteBackend
from corral.console.screens import DetailsScreen
from console_support import SIZE, details_text, make_app, ready, select, wait_for
from fake_backend import FakeBackend, model_info
from support import clean_env, start_server, tiny_settings, write_config
from managers import kv_heavy_dir, make_settings, state

GiB = 2**30


async def test_the_plan_names_the_eviction_the_load_then_makes(model_dir: Path, running: Any) -> None:
    manager, _ = await running(make_settings(model_dir, budgets={"max_loaded": 2}))
    await manager.load("tiny-a")
    await manager.load("tiny-b")
    plan = await manager.plan("tiny-c")
    assert plan.fits and [e.model for e in plan.evictions] == ["tiny-a"]
    assert "max_loaded" in plan.evictions[0].reason and plan.loaded == 2 and plan.max_loaded == 2
    assert plan.suggestions == ()  # no setting of its own avoids a count limit
    assert [state(manager, n) for n in ("tiny-a", "tiny-b", "tiny-c")] == ["ready", "ready", "available"]
    await manager.load("tiny-c")
    assert [state(manager, n) for n in ("tiny-a", "tiny-b", "tiny-c")] == ["available", "ready", "ready"]


async def test_a_refusal_says_why_and_what_would_make_it_fit(tmp_path: Path, running: Any) -> None:
    models = kv_heavy_dir(tmp_path / "models")  # KV cache 64 MiB at n_ctx 16384, 16 MiB at 4096
    probe, _ = await running(make_settings(models, defaults={"n_ctx": 4096}))
    small = (await probe.plan("big-a")).estimate["total"]
    manager, _ = await running(make_settings(models, defaults={"n_ctx": 16384},
                                             budgets={"ram_bytes": small + 2**20}))
    plan = await manager.plan("big-a")
    assert not plan.fits and "whole RAM budget" in (plan.refusal or "")
    assert plan.estimate["kv_cache"] == 64 * 2**20 and plan.settings["n_ctx"] == 16384
    assert "n_ctx = 4096" in plan.suggestions and any(s.startswith("budgets.ram_bytes >=") for s in plan.suggestions)
    # a suggestion is the largest value that fits, and really fits
    assert (await manager.plan("big-a", {"n_ctx": 4096})).fits
    assert not (await manager.plan("big-a", {"n_ctx": 8192})).fits
    for kv in ("q8_0", "q4_0"):
        if f'type_k = type_v = "{kv}"' in plan.suggestions:
            assert (await manager.plan("big-a", {"type_k": kv, "type_v": kv})).fits


async def test_a_pinned_and_a_busy_model_block_and_the_plan_says_so(model_dir: Path, running: Any) -> None:
    manager, _ = await running(make_settings(model_dir, budgets={"max_loaded": 2}))
    await manager.load("tiny-a")
    await manager.pin("tiny-a")
    lease = await manager.acquire("tiny-b")
    try:
        plan = await manager.plan("tiny-c")
        assert not plan.fits and plan.evictions == ()
        assert "max_loaded = 2 reached" in (plan.refusal or "") and "tiny-a (pinned)" in (plan.refusal or "")
        assert "max_loaded = 3" in plan.suggestions and any("unpin or evict tiny-a" in s for s in plan.suggestions)
    finally:
        await manager.release(lease)
    assert [e.model for e in (await manager.plan("tiny-c")).evictions] == ["tiny-b"]


async def test_settings_a_plan_cannot_use_are_refused(model_dir: Path, running: Any) -> None:
    manager, _ = await running(make_settings(model_dir))
    with pytest.raises(BadRequest, match="needs flash_attn = true"):
        await manager.plan("tiny-a", {"type_v": "q8_0", "flash_attn": False})
    with pytest.raises(BadRequest, match="the settings a plan can change are"):
        await manager.plan("tiny-a", {"keep_alive": 3})
    with pytest.raises(BadRequest, match="n_ctx"):
        await manager.plan("tiny-a", {"n_ctx": "lots"})


def test_plan_over_http_the_client_and_the_command(tmp_path: Path, model_dir: Path) -> None:
    config = write_config(tmp_path / "config.toml", tiny_settings(model_dir, budgets={"max_loaded": 1}))
    server = start_server(tmp_path, config)
    try:
        with server.http() as http:
            http.post("/api/models/tiny-a/load").raise_for_status()
            body = http.get("/api/models/tiny-b/plan", params={"n_ctx": 128}).json()
            assert body["fits"] and body["settings"]["n_ctx"] == 128 and body["evictions"][0]["model"] == "tiny-a"
            refused = http.get("/api/models/tiny-b/plan", params={"type_k": "q5_1"})
            assert refused.status_code == 400 and "type_k" in refused.json()["error"]["message"]
            assert http.get("/api/models/nope/plan").status_code == 404
        with RemoteBackend(server.url) as remote:
            plan = remote.sync.plan("tiny-b", n_ctx=128)
            assert plan.fits and plan.evictions[0].model == "tiny-a"
        command = [sys.executable, "-m", "corral.console.cli", "plan", "tiny-b", "--url", server.url, "--n-ctx", "128"]
        shown = subprocess.run(command, capture_output=True, text=True, env=clean_env(), timeout=60)
        assert shown.returncode == 0, shown.stderr
        assert "evicts tiny-a" in shown.stdout and "fits after evicting tiny-a" in shown.stdout
    finally:
        server.stop()


async def test_the_details_view_shows_the_plan() -> None:
    fake = FakeBackend([model_info("huge", estimate_bytes=12 * GiB), model_info("small", estimate_bytes=GiB)])
    app, _ = make_app(fake)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await select(pilot, "huge")
        await pilot.press("d")
        await wait_for(pilot, lambda: isinstance(app.screen, DetailsScreen) and "does not fit" in details_text(app))
        assert "would fit with n_ctx = 2048" in details_text(app)
        await pilot.press("escape")
        await select(pilot, "small")
        await pilot.press("d")
        await wait_for(pilot, lambda: isinstance(app.screen, DetailsScreen) and "fits without" in details_text(app))
        assert ("plan", "small", {}) in fake.calls
