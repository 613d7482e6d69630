"""`corral attach`: the console over a real `corral serve` subprocess (RemoteBackend over HTTP
and SSE), driven by Pilot with the same keys as against the embedded backend."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from corral.backend.remote import RemoteBackend
from corral.console.app import create_app
from corral.console.screens import ConfirmScreen, DashboardScreen, DetailsScreen, PromptScreen
from console_support import details_text, log_text, ready, select, send, state, transcript, wait_for
from support import Server, start_server, write_config

API_KEY = "attach-test-key"
TIMEOUT = 30.0


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    from ggufs import write_tiny_llama

    root = tmp_path_factory.mktemp("attach")
    models = root / "models"
    for seed, name in enumerate(("tiny-a", "tiny-b")):
        write_tiny_llama(models / f"{name}.gguf", name=name, seed=seed)
    config = write_config(root / "corral.toml", {"include_default_model": False, "model_dirs": [str(models)],
                                                  "defaults": {"n_ctx": 256, "n_parallel": 2, "n_threads": 1}})
    running = start_server(root / "run", config, api_key=API_KEY)
    yield running
    assert running.stop() == 0, running.log()


async def test_the_console_drives_a_real_server(server: Server) -> None:
    backend = RemoteBackend(server.url, api_key=API_KEY)
    app = create_app(backend)
    try:
        async with app.run_test(size=(120, 40)) as pilot:
            await ready(pilot)
            assert app.sub_title == f"attached to {server.url}"
            assert [m.name for m in app.models] == ["tiny-a", "tiny-b"]

            await select(pilot, "tiny-a")
            await pilot.press("l")
            await wait_for(pilot, lambda: state(app, "tiny-a") == "ready", TIMEOUT)
            await wait_for(pilot, lambda: "tiny-a  loading → ready" in log_text(app), TIMEOUT)

            await pilot.press("enter")
            await wait_for(pilot, lambda: isinstance(app.screen, PromptScreen))
            await send(pilot, "Once upon a time")
            await wait_for(pilot, lambda: any(line.startswith("TTFT") for line in transcript(app)), TIMEOUT)
            assert transcript(app)[0] == "Once upon a time" and transcript(app)[1].strip()
            await pilot.press("escape")
            await wait_for(pilot, lambda: isinstance(app.screen, DashboardScreen))

            # the server's request timings reach the details view through /api/ps
            await pilot.press("d")
            await wait_for(pilot, lambda: isinstance(app.screen, DetailsScreen))
            await wait_for(pilot, lambda: "requests last 1" in details_text(app), TIMEOUT)
            assert "TTFT p50" in details_text(app)
            await pilot.press("escape")

            await pilot.press("e")
            await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen))
            await pilot.press("y")
            await wait_for(pilot, lambda: state(app, "tiny-a") == "available", TIMEOUT)
            await wait_for(pilot, lambda: "evicted by operator" in log_text(app), TIMEOUT)
    finally:
        await backend.aclose()


def test_attach_reads_the_local_console_config(tmp_path: Path, server: Server,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """`corral attach` applies this machine's [console] theme and keymap."""
    from corral.console import cli

    config = tmp_path / "corral.toml"
    config.write_text('[console]\ntheme = "corral-contrast"\nkeymap = { "corral.load" = "L" }\n', encoding="utf-8")
    seen: dict[str, object] = {}

    def run(self: object) -> None:
        seen.update(theme=getattr(self, "theme"), keymap=dict(getattr(self, "keymap")))

    monkeypatch.setattr("corral.console.app.CorralApp.run", run)
    assert cli.main(["--config", str(config), "attach", server.url, "--api-key", API_KEY]) == 0
    assert seen == {"theme": "corral-contrast", "keymap": {"corral.load": "L"}}
