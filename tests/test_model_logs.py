"""A model's llama.cpp lines (Backend.logs, GET /api/models/{name}/logs): what its loads and
runs logged, kept per model in a bounded ring that outlives a failed load."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from corral.backend.config import settings_from_dict
from corral.backend.errors import CorralError, ModelNotFound
from corral.backend.local import LocalBackend
from corral.backend.modellog import LogLine, ModelLog
from corral.backend.remote import RemoteBackend
from ggufs import write_tiny_llama
from support import Server, tiny_settings


def write_missing_tensor(path: Path) -> Path:
    """A GGUF whose header reads fine but that lacks a tensor llama.cpp needs: only llama.cpp's
    own lines say what is wrong with it."""
    good = write_tiny_llama(path.with_suffix(".good"), name="odd")
    path.write_bytes(good.read_bytes().replace(b"blk.0.attn_q.weight", b"blk.0.attn_x.weight"))
    return path


@pytest.fixture
def backend(model_dir: Path) -> Iterator[LocalBackend]:
    write_missing_tensor(model_dir.parent / "odd.gguf")
    settings = tiny_settings(model_dir, models=[{"name": "odd", "path": str(model_dir.parent / "odd.gguf")}],
                             aliases=[{"name": "helper", "model": "tiny-b"}])
    with LocalBackend(settings_from_dict(settings)) as local:
        yield local


def test_a_failed_load_keeps_llama_cpps_reason_in_the_models_log(backend: LocalBackend) -> None:
    assert backend.sync.logs("odd") == []
    with pytest.raises(CorralError):
        backend.sync.load("odd")
    lines = backend.sync.logs("odd")
    assert lines[0].level == "corral" and lines[0].text.startswith("loading ") and "odd.gguf" in lines[0].text
    errors = [line.text for line in lines if line.level == "error"]
    assert any("blk.0.attn_q.weight" in text for text in errors), errors
    assert lines[-1].level == "corral" and lines[-1].text.startswith("load failed: ")
    with pytest.raises(CorralError):  # a retry adds its own lines after the first try's
        backend.sync.load("odd")
    again = backend.sync.logs("odd")
    assert again[:len(lines)] == lines and len(again) == 2 * len(lines)


def test_a_load_and_its_runs_log_into_that_model_alone(backend: LocalBackend) -> None:
    backend.sync.load("tiny-a")
    backend.sync.text("tiny-a", "hello", max_tokens=4, temperature=0)
    lines = backend.sync.logs("tiny-a")
    assert [line.level for line in lines].count("corral") == 1
    assert any("llama_model_loader" in line.text for line in lines)  # the loader's own lines
    assert any(line.text.startswith("llama_context") for line in lines)  # the context's
    assert all(line.text == line.text.rstrip() and "\n" not in line.text for line in lines)
    assert backend.sync.logs("tiny-c") == []
    assert backend.sync.logs("helper") == backend.sync.logs("tiny-b") == []  # an alias shows its base model's


def test_an_unknown_model_has_no_log(backend: LocalBackend) -> None:
    with pytest.raises(ModelNotFound):
        backend.sync.logs("nope")


def test_the_ring_keeps_the_newest_lines() -> None:
    ring = ModelLog(size=3)
    for i in range(5):
        ring.add("info", f"line {i}")
    assert [line.text for line in ring.lines()] == ["line 2", "line 3", "line 4"]
    line = ring.lines()[0]
    assert LogLine.from_dict(line.to_dict()) == line


async def test_the_log_over_http_is_the_same(tiny_server: Server) -> None:
    with tiny_server.http() as http:
        assert http.post("/api/models/tiny-a/load").status_code == 200
        body = http.get("/api/models/tiny-a/logs").json()
        missing = http.get("/api/models/nope/logs")
    assert body["model"] == "tiny-a" and body["lines"][0]["level"] == "corral"
    assert missing.status_code == 404 and "nope" in missing.text
    async with RemoteBackend(tiny_server.url) as remote:
        lines = await remote.logs("tiny-a")
    assert [line.to_dict() for line in lines] == body["lines"]
    assert any("llama_model_loader" in line.text for line in lines)

