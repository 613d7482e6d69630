"""Security (issue 8): the key guards every route but /health and is compared in constant
time; `corral serve` listens on loopback unless told otherwise and warns when it listens
beyond it without a key; nothing outside the configured model folders can be loaded through
the API; the key never shows where it could leak (config versions, diffs, events, the console).

Covered in test_server.py and not repeated: the request body limit
(test_oversized_body_is_a_413), the 401 answers of a real keyed server
(test_auth_needs_the_key_everywhere_but_health), which hosts count as loopback
(test_exposure_warning).
"""

from __future__ import annotations

import hmac
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.openapi.utils import get_openapi
from starlette.testclient import TestClient

from corral.backend.config import ServerSettings
from corral.backend.remote import RemoteBackend
from corral.backend.server import create_app, middleware
from ggufs import write_tiny_llama
from support import (HELLO, TINY, WRAPPER, Server, StubBackend, assert_error, replayed_events, slow_config,
                     start_server)

KEY = "k3y-for-the-security-tests"
PATH_PARAMS = {"name": "tiny-a", "number": "1", "response_id": "resp_unknown", "digest": "sha256-0",
               "pull_id": "0123456789ab", "request_id": "req-unknown"}


def guarded_routes() -> list[tuple[str, str]]:
    """Every (method, path) the app serves, path parameters filled in. Found from the app's own
    routes (through FastAPI's OpenAPI walk, which follows included routers), so a route added
    later is checked without editing this test."""
    app = create_app(StubBackend(), api_key=KEY)  # type: ignore[arg-type]
    paths = get_openapi(title="corral", version="test", routes=app.routes)["paths"]
    return [(method.upper(), re.sub(r"\{(\w+)\}", lambda m: PATH_PARAMS[m.group(1)], path))
            for path, operations in paths.items() for method in operations]


def started_stub() -> StubBackend:
    """A backend that is ready at once (a stub left starting would hold the app's shutdown)."""
    stub = StubBackend()
    stub.started.set()
    return stub


ROUTES = guarded_routes()


def test_the_route_walk_finds_the_api() -> None:
    paths = {path for _, path in ROUTES}
    assert {"/health", "/v1/chat/completions", "/v1/models", "/api/ps", "/api/models/tiny-a/load",
            "/api/config/rollback/1", "/metrics", "/api/events"} <= paths
    assert len(ROUTES) >= 18


@pytest.mark.parametrize("method, path", [r for r in ROUTES if r[1] != "/health"], ids=lambda v: v)
def test_every_route_but_health_needs_the_key(method: str, path: str) -> None:
    with TestClient(create_app(started_stub(), api_key=KEY)) as client:  # type: ignore[arg-type]
        for headers in ({}, {"authorization": f"Bearer {KEY}x"}, {"authorization": f"Basic {KEY}"},
                        {"authorization": KEY}):
            response = client.request(method, path, headers=headers)
            assert response.status_code == 401, (headers, response.text)
            if method == "HEAD":  # no body
                continue
            error = response.json()["error"]  # ollama's routes answer with the message alone
            assert "Authorization: Bearer" in (error if isinstance(error, str) else error["message"])
        assert client.get("/health").status_code == 200  # probes carry no key


def test_the_key_is_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    compared: list[tuple[bytes, bytes]] = []
    compare = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return compare(a, b)

    monkeypatch.setattr(middleware.hmac, "compare_digest", spy)
    with TestClient(create_app(started_stub(), api_key=KEY)) as client:  # type: ignore[arg-type]
        assert client.get("/api/ps", headers={"authorization": "Bearer nearly-the-key"}).status_code == 401
    assert compared == [(b"nearly-the-key", KEY.encode())]


def test_serve_listens_on_loopback_unless_told_otherwise() -> None:
    assert ServerSettings().host == "127.0.0.1"


def test_serve_warns_when_it_listens_beyond_loopback_without_a_key(tmp_path: Path,
                                                                   models: tuple[Path, Path]) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
    env["CORRAL_STATE_FILE"] = str(tmp_path / "state.json")
    command = [sys.executable, "-c", WRAPPER, "serve", "--config", str(slow_config(tmp_path, *models)),
               "--host", "0.0.0.0", "--port", "0"]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) as proc:
        try:
            assert proc.stdout is not None and proc.stderr is not None
            assert re.match(r"corral serve: listening on http://0\.0\.0\.0:\d+", proc.stdout.readline())
        finally:
            proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        log = proc.stderr.read()
    assert "corral serve: warning: listening on 0.0.0.0 without an API key" in log, log


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory, models: tuple[Path, Path]) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("guarded")
    outside = root / "outside"
    write_tiny_llama(outside / "evil.gguf", name="evil")  # a valid model, in no configured folder
    config = slow_config(root, *models)
    config.write_text(config.read_text() + f'[server]\napi_key = "{KEY}"\n')  # the key in the file
    running = start_server(root, config)
    running.api_key = KEY
    yield running
    assert running.stop() == 0, running.log()


def test_no_model_outside_the_configured_folders_can_be_loaded(guarded: Server) -> None:
    evil = guarded.stdout.parent / "outside" / "evil.gguf"
    model_dir = Path(guarded.stdout.parent.parent)  # any folder: the names below go nowhere real
    names = [str(evil), f"../outside/{evil.name}", "../../../../../../etc/passwd", "tiny-a/../../outside/evil",
             "%2e%2e%2foutside%2fevil", "..%2f..%2fetc%2fpasswd", "evil", f"file://{evil}", "~/evil.gguf",
             f"{model_dir}/../evil"]
    with guarded.http() as http:
        before = http.get("/v1/models").json()
        for name in names:
            loaded = http.post(f"/api/models/{name}/load")  # no such model, or (%2f, //) no such route
            assert loaded.status_code == 404 and loaded.json()["error"]["code"] in ("model_not_found", "not_found")
            body = {"model": name, "messages": HELLO, "max_tokens": 2}
            assert_error(http.post("/v1/chat/completions", json=body), 404, "model_not_found", "known models")
        assert http.get("/v1/models").json() == before
        states = {m["name"]: m["state"] for m in http.get("/api/ps").json()["models"]}
        assert set(states) == {"slow", *TINY}


def test_the_key_is_not_in_config_versions_or_events(guarded: Server) -> None:
    """Versions carry the settings, the file's text and a diff, and config events the diff: the
    key, set by the environment or written in the file, is in none of them."""
    config = guarded.stdout.parent / "corral.toml"
    original = config.read_text()
    written = "a-new-key-written-in-the-file"
    try:
        config.write_text(original.replace(KEY, written))
        with guarded.http() as http:
            applied = http.post("/api/config/reload")
            assert applied.status_code == 200, applied.text
            assert "server.api_key: changed (hidden)" in applied.json()["diff"]
            number = applied.json()["number"]
            answers = [applied, http.get("/api/config/versions"), http.get("/api/config/versions/1"),
                       http.get(f"/api/config/versions/{number}")]
            assert 'api_key = "(hidden)"' in answers[-1].json()["text"]
            assert answers[-1].json()["settings"]["server"]["api_key"] == "(hidden)"
            events = list(replayed_events(http))
            assert any(e["type"] == "config_applied" for e in events)
    finally:
        config.write_text(original)
    for text in [a.text for a in answers] + [json.dumps(events)]:
        assert KEY not in text and written not in text


async def test_the_console_never_shows_the_key(guarded: Server) -> None:
    from corral.console.app import create_app as console_app
    from console_support import ready, wait_for

    backend = RemoteBackend(guarded.url, api_key=KEY)
    app = console_app(backend)
    try:
        async with app.run_test(size=(160, 50)) as pilot:
            await ready(pilot)
            screens = []
            for key in ("d", "escape", "question_mark", "escape", "c", "escape"):
                await pilot.press(key)
                await pilot.pause()
                screens.append(app.export_screenshot())
            await wait_for(pilot, lambda: True)
    finally:
        await backend.aclose()
    assert all(KEY not in screen for screen in screens)
