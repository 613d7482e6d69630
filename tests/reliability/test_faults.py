"""The fault catalogue (issue 8): each fault gets a clear error, the server stays up, and a
stream on another model that is running while the fault happens ends normally.

Covered elsewhere and not repeated here: a client leaving one stream (test_server.py
test_a_client_leaving_a_stream_frees_its_slot), SIGTERM during a stream (test_server.py
test_sigterm_ends_streams_and_exits_0), the oversized body (test_server.py
test_oversized_body_is_a_413), and the whole table of bad request bodies (test_server.py
BAD_REQUESTS); this module repeats a sample of each kind with a stream in flight.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from ggufs import write_corrupt_header, write_fails_mid_load, write_truncated, write_unknown_arch
from reliability.support import model_entry, stream_survives
from support import HELLO, SLOW, Server, assert_error, assert_idle, model_state, slow_config, start_server, wait_for

WIDE = "wide"  # the slow model's file with four slots and a deep queue: room for 100 clients
RAM_BUDGET = 1 << 30  # room for every good model here; the "huge" entry's KV cache alone is 2 GiB


@pytest.fixture(scope="module")
def faulty(tmp_path_factory: pytest.TempPathFactory, models: tuple[Path, Path]) -> Iterator[Server]:
    """A server whose catalog also holds one broken model per kind of bad file."""
    root = tmp_path_factory.mktemp("faults")
    model_dir, slow = models
    bad = root / "bad"
    bad.mkdir()
    good = model_dir / "tiny-a.gguf"
    entries = [
        model_entry("missing", bad / "gone.gguf"),
        model_entry("truncated", write_truncated(good, bad / "truncated.gguf")),
        model_entry("corrupt", write_corrupt_header(good, bad / "corrupt.gguf")),
        model_entry("alien", write_unknown_arch(bad / "alien.gguf")),
        model_entry("half", write_fails_mid_load(good, bad / "half.gguf")),
        model_entry("huge", slow, n_ctx=65536),
        model_entry(WIDE, slow, n_ctx=4096, n_parallel=4, max_queue=128),
    ]
    config = slow_config(root, model_dir, slow)
    text = config.read_text().replace("[budgets]\n", f"[budgets]\nram_bytes = {RAM_BUDGET}\n")
    config.write_text(text + "".join(entries))
    running = start_server(root, config)
    yield running
    assert running.stop() == 0, running.log()
    assert "Traceback" not in running.log()


@pytest.fixture
def http(faulty: Server) -> Iterator[httpx.Client]:
    with faulty.http() as client:
        yield client


BAD_FILES = [  # (model, status, code, what the message must say)
    ("missing", 422, "model_unusable", "file not found"),
    ("truncated", 422, "model_unusable", "truncated"),
    ("corrupt", 422, "model_unusable", "corrupt"),
    ("alien", 422, "model_unusable", "architecture 'notanarch'"),
    ("half", 422, "model_file_rejected", "blk.2"),
    ("huge", 507, "insufficient_memory", "GiB"),
]


def test_bad_model_files_fail_clearly_while_another_model_streams(faulty: Server, http: httpx.Client) -> None:
    with stream_survives(faulty):
        for name, status, code, mentions in BAD_FILES:
            error = assert_error(http.post(f"/api/models/{name}/load"), status, code, mentions)
            assert name in error["message"], error["message"]
            # a request that would auto-load it gets the same clear answer
            body = {"model": name, "messages": HELLO, "max_tokens": 2}
            assert_error(http.post("/v1/chat/completions", json=body), status, code, mentions)
            assert http.get("/health").json() == {"status": "ok"}
        assert model_state(http, SLOW)["active"] == 1
    states = {m["name"]: m for m in http.get("/api/ps").json()["models"]}
    assert {name: states[name]["state"] for name, *_ in BAD_FILES} == {
        "missing": "failed", "truncated": "failed", "corrupt": "failed", "alien": "failed", "half": "failed",
        "huge": "available"}  # refused before loading: nothing about the file is wrong
    reply = http.post("/v1/chat/completions", json={"model": "tiny-b", "messages": HELLO, "max_tokens": 3})
    assert reply.status_code == 200 and reply.json()["choices"][0]["finish_reason"] in ("length", "stop")


LONG_PROMPT = "the cat sat on the mat " * 200  # ~1,200 tokens: far over tiny-a's 256-token context

BAD_BODIES = [  # (path, body, what the message must say)
    ("/v1/chat/completions", b'{"model": "tiny-a", "messages": [', "not valid JSON"),
    ("/v1/chat/completions", {"model": "tiny-a", "messages": HELLO, "max_tokens": "10"}, "max_tokens"),
    ("/v1/chat/completions", {"model": ["tiny-a"], "messages": HELLO}, "model"),
    ("/v1/completions", {"model": "tiny-a", "prompt": "x", "temperature": "hot"}, "temperature"),
    ("/v1/completions", {"model": "tiny-a", "prompt": "x", "max_tokens": 1 << 40}, "max_tokens"),
    ("/v1/completions", {"model": "tiny-a", "prompt": LONG_PROMPT, "max_tokens": 4}, "context holds 256"),
    ("/v1/chat/completions", {"model": "tiny-a", "messages": [{"role": "user", "content": LONG_PROMPT}]},
     "context holds 256"),
    ("/v1/chat/completions", {"model": "tiny-a", "messages": []}, "messages"),
    ("/v1/chat/completions", {"model": "tiny-a", "messages": [{}]}, "messages[0]"),
    ("/v1/chat/completions", {"model": "tiny-a", "messages": [42, "hi", None]}, "messages[0]"),
    ("/v1/chat/completions", {"model": "tiny-a", "messages": {"role": "user"}}, "messages"),
    ("/v1/embeddings", {"model": "tiny-a", "input": {"text": 1}}, "input"),
]


def test_bad_requests_are_400s_while_another_model_streams(faulty: Server, http: httpx.Client) -> None:
    with stream_survives(faulty):
        for path, body, mentions in BAD_BODIES:
            if isinstance(body, bytes):
                response = http.post(path, content=body, headers={"content-type": "application/json"})
            else:
                response = http.post(path, json=body)
            assert_error(response, 400, "invalid_request", mentions)
        assert_error(http.post("/v1/chat/completions", json={"model": "nope", "messages": HELLO}), 404,
                     "model_not_found", "'nope'")
        streamed = {"model": "tiny-a", "prompt": LONG_PROMPT, "stream": True}  # refused before any chunk
        assert_error(http.post("/v1/completions", json=streamed), 400, "invalid_request", "context holds 256")
    assert http.post("/v1/completions", json={"model": "tiny-a", "prompt": "x", "max_tokens": 2}).status_code == 200


def test_config_faults_are_refused_while_another_model_streams(faulty: Server, http: httpx.Client,
                                                               tmp_path: Path) -> None:
    config = Path(faulty.stdout.parent / "corral.toml")
    original = config.read_text()
    before = http.get("/api/config/versions").json()
    try:
        with stream_survives(faulty):
            config.write_text(original.replace("n_parallel = 2", "n_parallel = -3"))
            assert_error(http.post("/api/config/reload"), 400, "invalid_config", "n_parallel")
            config.write_text(original + "[[[broken toml\n")
            assert_error(http.post("/api/config/reload"), 400, "invalid_config")
            assert_error(http.post("/api/config/rollback/999"), 404, "not_found", "version 999")
            assert_error(http.post("/api/config/rollback/0"), 404, "not_found")
            assert_error(http.get("/api/config/versions/abc"), 400, "invalid_request", "number")
    finally:
        config.write_text(original)
    assert http.get("/api/config/versions").json() == before  # nothing was applied


async def test_a_hundred_clients_leaving_at_once_free_every_slot(faulty: Server) -> None:
    body = {"model": WIDE, "prompt": "Once", "stream": True, "max_tokens": 4000, "ignore_eos": True}
    limits = httpx.Limits(max_connections=128)
    with faulty.http() as http:
        assert http.post(f"/api/models/{WIDE}/load").status_code == 200
        with stream_survives(faulty):
            async with httpx.AsyncClient(base_url=faulty.url, trust_env=False, limits=limits,
                                         timeout=httpx.Timeout(30, read=120)) as client:

                async def hold() -> None:
                    async with client.stream("POST", "/v1/completions", json=body) as response:
                        assert response.status_code == 200
                        async for _ in response.aiter_lines():
                            pass

                clients = [asyncio.ensure_future(hold()) for _ in range(100)]
                await asyncio.to_thread(wait_for, lambda: (lambda m: m["active"] == 4 and m["queued"] == 96)(
                    model_state(http, WIDE)), 60, "100 requests running or queued")
                for task in clients:  # every connection closes in the same instant
                    task.cancel()
                await asyncio.gather(*clients, return_exceptions=True)
            await asyncio.to_thread(assert_idle, http, WIDE)
        reply = http.post("/v1/completions", json={**body, "stream": False, "max_tokens": 3})
        assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 3


def test_sigkill_during_state_writes_then_restart(tmp_path: Path, models: tuple[Path, Path]) -> None:
    """A crash in the middle of saving state leaves the old file or the new one, never a torn
    one (writes go through a temporary file and a rename), and the restart comes back up."""
    config = slow_config(tmp_path, *models)
    root = tmp_path / "srv"
    server = start_server(root, config)
    state_file = server.state_file
    with server.http() as http:
        assert http.post("/api/models/tiny-c/pin").status_code == 200

        def churn() -> None:  # every load and evict rewrites the state file
            for name in ("tiny-a", "tiny-b") * 20:
                try:
                    http.post(f"/api/models/{name}/load")
                    http.post(f"/api/models/{name}/evict")
                except httpx.TransportError:
                    return

        worker = threading.Thread(target=churn)
        worker.start()
        wait_for(state_file.exists, what="a first state file")
        server.proc.kill()
        server.proc.wait()
        worker.join(60)
    saved = json.loads(state_file.read_text())  # parses: never half written
    assert isinstance(saved, dict)
    restarted = start_server(root, config)  # waits for health 200
    try:
        with restarted.http() as http:
            infos = {m["name"]: m for m in http.get("/api/ps").json()["models"]}
            assert infos["tiny-c"]["pinned"]
            assert http.post("/v1/completions", json={"model": "tiny-a", "prompt": "x", "max_tokens": 2}
                             ).status_code == 200
    finally:
        assert restarted.stop() == 0
