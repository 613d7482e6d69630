"""The console's pull dialog over an embedded LocalBackend, pulling from a real HTTP server on
127.0.0.1 (tests/fileserver.py): progress while the host holds the second half, the dialog
closed and opened again while the pull goes on, a cancel that keeps the partial file, and the
same pull again, resumed, ending with the model in the table."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from textual.widgets import Input, ProgressBar, Static

from corral.backend.config import settings_from_dict
from corral.backend.local import LocalBackend
from corral.console.app import create_app
from corral.console.screens import ConfirmScreen, DashboardScreen, PullScreen
from console_support import log_text, ready, table, wait_for
from fileserver import FileServer
from ggufs import write_tiny_llama
from support import tiny_settings

MODEL = "pulled-tiny"
TIMEOUT = 30.0


@pytest.fixture
def backend(tmp_path: Path) -> Iterator[LocalBackend]:
    models = tmp_path / "models"
    write_tiny_llama(models / "tiny-a.gguf", name="tiny-a")
    with LocalBackend(settings_from_dict(tiny_settings(models)), pulled_file=tmp_path / "pulled.json") as local:
        yield local


def shown(app: object) -> str:
    return str(app.screen.query_one("#pull-state", Static).render())  # type: ignore[attr-defined]


async def test_a_pull_from_the_console_shows_progress_cancels_and_resumes(
        backend: LocalBackend, file_server: FileServer, tmp_path: Path) -> None:
    data = write_tiny_llama(tmp_path / "source" / f"{MODEL}.gguf", name=MODEL).read_bytes()
    file_server.files.add(f"{MODEL}.gguf", data)
    source = f"{file_server.url}/held/{MODEL}.gguf"
    app = create_app(backend)
    async with app.run_test(size=(120, 40)) as pilot:
        await ready(pilot)
        await pilot.press("g")
        await wait_for(pilot, lambda: isinstance(app.screen, PullScreen))
        app.screen.query_one("#pull-source", Input).value = source
        await pilot.press("enter")
        # the host sends half and waits: the dialog shows the bytes so far
        await wait_for(pilot, lambda: app.pull_status is not None and app.pull_status.completed > 0, TIMEOUT)
        await wait_for(pilot, lambda: f"{MODEL}:" in shown(app) and "KiB of" in shown(app), TIMEOUT)
        assert app.screen.query_one("#pull-bar", ProgressBar).percentage is not None

        await pilot.press("escape")  # closing the dialog leaves the pull running
        await wait_for(pilot, lambda: isinstance(app.screen, DashboardScreen))
        assert app.pull_status is not None
        await pilot.press("g")
        await wait_for(pilot, lambda: isinstance(app.screen, PullScreen) and f"{MODEL}:" in shown(app))

        await pilot.press("ctrl+x")  # asks first
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.press("y")
        await wait_for(pilot, lambda: app.pull_status is None, TIMEOUT)
        await pilot.press("escape")
        await wait_for(pilot, lambda: isinstance(app.screen, DashboardScreen))
        await wait_for(pilot, lambda: f"{MODEL}  pull cancelled" in log_text(app), TIMEOUT)
        folder = tmp_path / "models"  # the first model folder: where pulls go
        assert [p for p in folder.iterdir() if p.name.endswith(".partial")]  # kept for a resume
        assert MODEL not in [m.name for m in app.models]

        file_server.files.release.set()  # the host now sends everything
        await pilot.press("g")
        await wait_for(pilot, lambda: isinstance(app.screen, PullScreen))
        app.screen.query_one("#pull-source", Input).value = source
        await pilot.press("enter")
        await wait_for(pilot, lambda: MODEL in [m.name for m in app.models], TIMEOUT)
        await pilot.press("escape")
        await wait_for(pilot, lambda: isinstance(app.screen, DashboardScreen) and table(app).row_count == 2)
        assert f"{MODEL}  pulled" in log_text(app) and f"{MODEL}  pulling 50%" in log_text(app)
    assert not [p for p in (tmp_path / "models").iterdir() if p.name.endswith(".partial")]
    resumed = [r for r in file_server.files.gets(f"{MODEL}.gguf") if r.range]
    assert resumed, "the second pull resumed with Range"
