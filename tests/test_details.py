"""Backend.details: one model file's header facts and sha256, hashed once per file version."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral.backend.config import settings_from_dict
from corral.backend.digests import Digests
from corral.backend.errors import ModelNotFound
from corral.backend.local import LocalBackend
from corral.backend.snapshot import ModelDetails
from ggufs import write_tiny_llama
from support import tiny_settings

TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def state_file(tmp_path: Path) -> Path:
    return tmp_path / "state" / "state.json"


@pytest.fixture
def backend(model_dir: Path, state_file: Path) -> Iterator[LocalBackend]:
    write_tiny_llama(model_dir / "templated.gguf", name="templated", seed=7, chat_template=TEMPLATE)
    settings = tiny_settings(model_dir, aliases=[{"name": "helper", "model": "tiny-b", "system": "Be brief."}],
                             models=[{"name": "configured", "path": str(model_dir / "tiny-c.gguf"),
                                      "chat_template": "config: {{ messages }}"}])
    with LocalBackend(settings_from_dict(settings), state_file=state_file) as local:
        yield local


def test_details_describe_the_file(backend: LocalBackend, model_dir: Path) -> None:
    file = model_dir / "tiny-a.gguf"
    details = backend.sync.details("tiny-a")
    assert details.name == "tiny-a" and details.path == str(file) and details.alias_of is None
    assert details.digest == sha256(file)
    assert details.file_size == file.stat().st_size and details.modified_at == file.stat().st_mtime
    assert details.architecture == "llama" and details.quantization and details.parameters
    assert details.context_length == 512 and details.n_ctx == 256
    assert details.metadata["general.architecture"] == "llama"
    assert details.chat_template is None  # the tiny GGUFs carry none: chats use a fallback
    assert ModelDetails.from_dict(json.loads(json.dumps(details.to_dict()))) == details


def test_the_template_is_the_one_chats_take(backend: LocalBackend) -> None:
    templated = backend.sync.details("templated")
    assert templated.chat_template == TEMPLATE and "tokenizer.chat_template" not in templated.metadata
    assert backend.sync.details("configured").chat_template == "config: {{ messages }}"


def test_an_alias_describes_its_base_models_file(backend: LocalBackend, model_dir: Path) -> None:
    details = backend.sync.details("helper")
    assert details.name == "helper" and details.alias_of == "tiny-b"
    assert details.digest == sha256(model_dir / "tiny-b.gguf") == backend.sync.details("tiny-b").digest


def test_unknown_model(backend: LocalBackend) -> None:
    with pytest.raises(ModelNotFound) as caught:
        backend.sync.details("nope")
    assert "tiny-a" in caught.value.known


def test_digests_persist_beside_the_state_file(backend: LocalBackend, model_dir: Path, state_file: Path) -> None:
    file = model_dir / "tiny-a.gguf"
    digest = backend.sync.details("tiny-a").digest
    saved = json.loads((state_file.parent / "digests.json").read_text())
    assert saved[str(file.resolve())]["sha256"] == digest
    # A later process trusts the saved digest while the file is unchanged: it does not hash again...
    saved[str(file.resolve())]["sha256"] = "0" * 64
    (state_file.parent / "digests.json").write_text(json.dumps(saved))
    later = Digests(state_file.parent / "digests.json")
    assert later.sha256(file) == "0" * 64
    # ...and hashes a file whose mtime changed.
    st = file.stat()
    os.utime(file, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert later.sha256(file) == digest == sha256(file)
    assert json.loads((state_file.parent / "digests.json").read_text())[str(file.resolve())]["sha256"] == digest


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '{"/x": {"sha256": 5}}'])
def test_a_corrupt_digest_cache_is_ignored(tmp_path: Path, model_dir: Path, text: str) -> None:
    cache = tmp_path / "digests.json"
    cache.write_text(text)
    file = model_dir / "tiny-b.gguf"
    assert Digests(cache).sha256(file) == sha256(file)
    assert json.loads(cache.read_text()) == {str(file.resolve()): {
        "size": file.stat().st_size, "mtime_ns": file.stat().st_mtime_ns, "sha256": sha256(file)}}


def test_without_a_state_file_digests_stay_in_memory(model_dir: Path, tmp_path: Path) -> None:
    file = model_dir / "tiny-c.gguf"
    digests = Digests(None)
    assert digests.sha256(file) == digests.sha256(file) == sha256(file)
    assert not list(tmp_path.rglob("digests.json"))
