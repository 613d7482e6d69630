"""Other tools' stores read in place: where each is found, how its models are named, what an
ollama manifest gives, broken manifests, the clash rule, short names and the `[stores]` config.

The stores are built as the tools lay them out (tests/fixture_stores.py); loading and
answering through a real server is in test_stores_serve.py."""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from corral.backend.catalog import Catalog, CatalogEntry
from corral.backend.config import load_settings, settings_from_dict
from corral.backend.errors import ConfigError
from corral.backend.generation import MAX_TOKENS
from corral.backend.snapshot import ModelInfo, NameClash
from corral.backend.stores import ollama_name, scan_stores, store_folder
from corral.console import cli
from fixture_stores import sha256, write_hf_file, write_lmstudio_file, write_ollama_model
from ggufs import write_tiny_llama
from support import write_config

LLAMA_TEMPLATE = "{{ if .System }}<s>{{ .System }}</s>{{ end }}<u>{{ .Prompt }}</u><a>{{ .Response }}</a>"


def catalog(*, ollama: Path | bool = False, huggingface: Path | bool = False, lmstudio: Path | bool = False,
            dirs: tuple[Path, ...] = (), explicit: dict[str, Path] | None = None) -> Catalog:
    switches = {"ollama": ollama, "huggingface": huggingface, "lmstudio": lmstudio}
    return Catalog(dirs, explicit or {}, include_default=False, stores=functools.partial(scan_stores, switches, {}))


def by_name(entries: list[CatalogEntry]) -> dict[str, CatalogEntry]:
    return {e.name: e for e in entries}


@pytest.fixture
def gguf(tiny_gguf: Callable[..., Path]) -> Callable[[str], Path]:
    """A distinct tiny GGUF per name (distinct bytes, so distinct blobs)."""
    return lambda name: tiny_gguf(name, seed=sum(map(ord, name)))


# -- ollama --------------------------------------------------------------------------------------


def test_ollama_models_are_listed_under_ollamas_names(tmp_path: Path, gguf: Callable[[str], Path]) -> None:
    store = tmp_path / "ollama"
    write_ollama_model(store, gguf("llama"), "llama3.2")  # tag latest
    write_ollama_model(store, gguf("llama"), "llama3.2", "3b")  # the same blob, another tag
    write_ollama_model(store, gguf("custom"), "custom", "v1", namespace="jdoe")
    write_ollama_model(store, gguf("hf"), "Tiny-GGUF", "Q4_K_M", registry="hf.co", namespace="bartowski")
    entries = by_name(catalog(ollama=store).refresh())
    assert set(entries) == {"llama3.2", "llama3.2:3b", "jdoe/custom:v1", "hf.co/bartowski/Tiny-GGUF:Q4_K_M"}
    digest = sha256(gguf("llama").read_bytes())
    for name in ("llama3.2", "llama3.2:3b"):  # ollama's tags share one blob; each is a model of its own
        entry = entries[name]
        assert entry.usable and entry.source == "ollama" and entry.digest == digest
        assert entry.path == store / "blobs" / f"sha256-{digest}"
    assert entries["llama3.2:3b"].store is not None
    assert entries["llama3.2:3b"].store.manifest == str(store / "manifests/registry.ollama.ai/library/llama3.2/3b")


def test_ollama_names() -> None:
    assert ollama_name("registry.ollama.ai", "library", "qwen3", "latest") == "qwen3"
    assert ollama_name("registry.ollama.ai", "library", "qwen3", "0.6b") == "qwen3:0.6b"
    assert ollama_name("registry.ollama.ai", "jdoe", "mine", "latest") == "jdoe/mine"
    assert ollama_name("hf.co", "unsloth", "Qwen3-GGUF", "Q4_K_M") == "hf.co/unsloth/Qwen3-GGUF:Q4_K_M"
    assert ollama_name("localhost:5000", "team", "m", "latest") == "localhost:5000/team/m"


def test_a_manifests_params_system_and_template(tmp_path: Path, gguf: Callable[[str], Path],
                                                caplog: pytest.LogCaptureFixture) -> None:
    store = tmp_path / "ollama"
    params = {"stop": ["<|eot|>", "</a>"], "temperature": 0.2, "top_k": "many", "num_ctx": 1024,
              "num_predict": -1, "mirostat": 0, "repeat_last_n": 64}
    write_ollama_model(store, gguf("chat"), "chat", params=params, system="You are terse.", template=LLAMA_TEMPLATE,
                       extra_layers=(("license", b"MIT"),))
    with caplog.at_level(logging.WARNING, logger="corral.stores"):
        entry = catalog(ollama=store).get("chat")
    assert entry.usable and entry.store is not None
    assert entry.store.params == params  # shown as ollama wrote it
    assert entry.store.defaults == {"stop": ["<|eot|>", "</a>"], "temperature": 0.2, "n_ctx": 1024,
                                    "max_tokens": MAX_TOKENS}  # applied, by corral's names
    assert "params top_k = 'many' left out" in caplog.text
    assert entry.store.system == "You are terse." and entry.store.template == LLAMA_TEMPLATE


@pytest.mark.parametrize("damage, reason", [
    ("not json", "not a readable JSON manifest"),
    ("no layers", "the manifest has no list of layers"),
    ("no digest", "layer 0 lacks a mediaType, a sha256 digest or a size"),
    ("no model layer", "0 model layers (application/vnd.ollama.image.model) where one GGUF was expected"),
    ("adapter", "it applies a LoRA adapter layer, which corral does not; run its base model"),
    ("blob missing", "is missing; pull the model again with ollama"),
    ("blob short", "an unfinished or damaged download; pull the model again with ollama"),
])
def test_a_manifest_corral_cannot_run_is_listed_unusable_with_the_reason(
        tmp_path: Path, gguf: Callable[[str], Path], damage: str, reason: str) -> None:
    store = tmp_path / "ollama"
    write_ollama_model(store, gguf("fine"), "fine")
    manifest = write_ollama_model(store, gguf("hurt"), "hurt", "q8",
                                  extra_layers=(("adapter", b"lora"),) if damage == "adapter" else ())
    data = json.loads(manifest.read_text())
    blob = store / "blobs" / f"sha256-{sha256(gguf('hurt').read_bytes())}"
    if damage == "not json":
        manifest.write_text("{not json")
    elif damage == "no layers":
        manifest.write_text(json.dumps({"schemaVersion": 2}))
    elif damage == "no digest":
        del data["layers"][0]["digest"]
        manifest.write_text(json.dumps(data))
    elif damage == "no model layer":
        data["layers"][0]["mediaType"] = "application/vnd.ollama.image.projector"
        manifest.write_text(json.dumps(data))
    elif damage == "blob missing":
        blob.unlink()
    elif damage == "blob short":
        blob.write_bytes(blob.read_bytes()[:1000])
    entries = by_name(catalog(ollama=store).refresh())
    assert entries["fine"].usable
    hurt = entries["hurt:q8"]
    assert not hurt.usable and hurt.source == "ollama" and hurt.path is None
    assert hurt.error is not None and hurt.error.startswith(f"{manifest}: ") and reason in hurt.error
    assert hurt.reread() is hurt  # nothing to re-read: a load reports the manifest's problem


# -- the Hugging Face cache and LM Studio ----------------------------------------------------------


def test_hugging_face_cache(tmp_path: Path, gguf: Callable[[str], Path]) -> None:
    cache = tmp_path / "hub"
    old, main = "0" * 40, "1" * 40
    write_hf_file(cache, "TheOwner/Tiny-GGUF", old, "Tiny-Q4_K_M.gguf", gguf("old q4"), main=False)
    write_hf_file(cache, "TheOwner/Tiny-GGUF", old, "Tiny-Q2_K.gguf", gguf("only old"), main=False)
    current = write_hf_file(cache, "TheOwner/Tiny-GGUF", main, "Tiny-Q4_K_M.gguf", gguf("q4"))
    write_hf_file(cache, "TheOwner/Tiny-GGUF", main, "mmproj-Tiny-F16.gguf", gguf("projector"))
    split = write_tiny_llama(tmp_path / "split" / "Tiny-Q8_0.gguf", split_max_tensors=12)
    for shard in sorted(split.parent.iterdir()):
        write_hf_file(cache, "TheOwner/Tiny-GGUF", main, f"Q8_0/{shard.name}", shard)
    write_hf_file(cache, "gpt2", main, "gpt2.gguf", gguf("no owner"))
    (cache / "datasets--someone--data" / "snapshots" / main).mkdir(parents=True)
    entries = by_name(catalog(huggingface=cache).refresh())
    assert set(entries) == {"theowner/tiny-gguf/tiny-q4_k_m", "theowner/tiny-gguf/tiny-q2_k",
                            "theowner/tiny-gguf/tiny-q8_0", "gpt2/gpt2"}
    q4 = entries["theowner/tiny-gguf/tiny-q4_k_m"]  # from refs/main's revision, listed once
    assert q4.path == current and q4.digest == sha256(gguf("q4").read_bytes()) and q4.source == "huggingface"
    assert entries["theowner/tiny-gguf/tiny-q2_k"].path.parent.name == old  # only in the old revision
    q8 = entries["theowner/tiny-gguf/tiny-q8_0"]  # a split GGUF is one model: its first shard
    assert q8.usable and q8.path.name == "Tiny-Q8_0-00001-of-00002.gguf"
    assert all(e.usable for e in entries.values())


def test_lm_studio(tmp_path: Path, gguf: Callable[[str], Path]) -> None:
    root = tmp_path / "lms"
    path = write_lmstudio_file(root, "lmstudio-community", "Tiny-GGUF", "Tiny-Q4_K_M.gguf", gguf("lms"))
    write_lmstudio_file(root, "lmstudio-community", "Tiny-GGUF", "mmproj-model-f16.gguf", gguf("proj"))
    clip = write_tiny_llama(tmp_path / "vision.gguf", arch="clip")  # a projector by architecture
    write_lmstudio_file(root, "lmstudio-community", "Tiny-GGUF", "vision-adapter.gguf", clip)
    write_lmstudio_file(root, "lmstudio-community", "Tiny-GGUF", "README.md", gguf("lms"))
    entries = by_name(catalog(lmstudio=root).refresh())
    assert list(entries) == ["lmstudio-community/tiny-gguf/tiny-q4_k_m"]
    entry = entries["lmstudio-community/tiny-gguf/tiny-q4_k_m"]
    assert entry.usable and entry.path == path and entry.source == "lmstudio"


def test_projector_files_in_model_folders_are_not_models(model_dir: Path) -> None:
    write_tiny_llama(model_dir / "mmproj-tiny.gguf")
    write_tiny_llama(model_dir / "eyes.gguf", arch="clip")
    assert Catalog([model_dir], include_default=False).names() == ["tiny-a", "tiny-b", "tiny-c"]


# -- where the stores are ----------------------------------------------------------------------------


def test_where_each_store_is_looked_for(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    home = tmp_path / "home"
    env = {"HOME": str(home)}
    assert store_folder("ollama", "auto", env) is None  # nothing there: off, quietly
    (home / ".ollama" / "models").mkdir(parents=True)
    assert store_folder("ollama", "auto", env) == home / ".ollama" / "models"
    elsewhere = tmp_path / "srv-ollama"
    elsewhere.mkdir()
    assert store_folder("ollama", "auto", {**env, "OLLAMA_MODELS": str(elsewhere)}) == elsewhere
    assert store_folder("ollama", "auto", {**env, "OLLAMA_MODELS": str(tmp_path / "gone")}) is None  # only there
    assert store_folder("ollama", False, env) is None
    assert store_folder("ollama", elsewhere, env) == elsewhere

    hub = home / ".cache" / "huggingface" / "hub"
    hub.mkdir(parents=True)
    assert store_folder("huggingface", "auto", env) == hub
    (tmp_path / "hf-home" / "hub").mkdir(parents=True)
    assert store_folder("huggingface", "auto", {**env, "HF_HOME": str(tmp_path / "hf-home")}) == \
        tmp_path / "hf-home" / "hub"
    assert store_folder("huggingface", "auto", {**env, "HF_HOME": str(tmp_path / "hf-home"),
                                                "HF_HUB_CACHE": str(elsewhere)}) == elsewhere
    (tmp_path / "xdg" / "huggingface" / "hub").mkdir(parents=True)
    assert store_folder("huggingface", "auto", {**env, "XDG_CACHE_HOME": str(tmp_path / "xdg")}) == \
        tmp_path / "xdg" / "huggingface" / "hub"

    (home / ".cache" / "lm-studio" / "models").mkdir(parents=True)
    assert store_folder("lmstudio", "auto", env) == home / ".cache" / "lm-studio" / "models"  # the older home
    (home / ".lmstudio" / "models").mkdir(parents=True)
    assert store_folder("lmstudio", "auto", env) == home / ".lmstudio" / "models"
    (tmp_path / "big-disk" / "models").mkdir(parents=True)
    (home / ".lmstudio-home-pointer").write_text(str(tmp_path / "big-disk"))  # LM Studio moved its home
    assert store_folder("lmstudio", "auto", env) == tmp_path / "big-disk" / "models"

    with caplog.at_level(logging.WARNING, logger="corral.stores"):
        assert store_folder("ollama", True, {"HOME": str(tmp_path / "empty")}) is None
        assert store_folder("huggingface", tmp_path / "nope", env) is None
    assert "the ollama store is on but no folder exists at " in caplog.text
    assert f"the huggingface store is on but no folder exists at {tmp_path / 'nope'}" in caplog.text


def test_stores_that_are_off_are_not_read(tmp_path: Path, gguf: Callable[[str], Path]) -> None:
    home = tmp_path / "home"
    write_ollama_model(home / ".ollama" / "models", gguf("x"), "x")
    write_lmstudio_file(home / ".lmstudio" / "models", "p", "r", "y.gguf", gguf("y"))
    env = {"HOME": str(home)}
    on = scan_stores({"ollama": "auto", "huggingface": "auto", "lmstudio": True}, env)
    assert [e.name for e in on] == ["x", "p/r/y"]
    assert scan_stores({"ollama": False, "huggingface": "auto", "lmstudio": False}, env) == []


# -- names across sources --------------------------------------------------------------------------


def test_a_name_clash_is_won_by_the_earlier_source_and_shown(tmp_path: Path, gguf: Callable[[str], Path]) -> None:
    """config, the default, folders, then ollama, the Hugging Face cache, LM Studio."""
    folder = tmp_path / "models"
    write_tiny_llama(folder / "qwen3.gguf", seed=3)
    store, cache, lms = tmp_path / "ollama", tmp_path / "hub", tmp_path / "lms"
    write_ollama_model(store, gguf("qwen"), "qwen3")
    write_hf_file(cache, "acme/tiny-gguf", "a" * 40, "tiny.gguf", gguf("hf tiny"))
    write_lmstudio_file(lms, "acme", "tiny-gguf", "tiny.gguf", gguf("lms tiny"))
    cat = catalog(ollama=store, huggingface=cache, lmstudio=lms, dirs=(folder,))
    assert cat.get("qwen3").source == "dir"
    loser = [e for e in cat.entries() if e.name == "qwen3"][1]
    assert loser.source == "ollama" and not loser.usable
    assert loser.error is not None and "already used by the dir model" in loser.error
    assert cat.get("acme/tiny-gguf/tiny").source == "huggingface"
    [lms_loser] = [e for e in cat.entries() if e.source == "lmstudio"]
    assert not lms_loser.usable and "already used by the huggingface model" in (lms_loser.error or "")


def test_corral_models_lists_the_loser_of_a_clash_with_the_reason(tmp_path: Path, gguf: Callable[[str], Path],
                                                                 capsys: pytest.CaptureFixture[str],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))  # a pull folder of its own
    folder, store = tmp_path / "models", tmp_path / "ollama"
    write_tiny_llama(folder / "qwen3.gguf", seed=3)
    write_ollama_model(store, gguf("qwen"), "qwen3")
    blob = store / "blobs" / f"sha256-{sha256(gguf('qwen').read_bytes())}"
    config = write_config(tmp_path / "corral.toml", {
        "include_default_model": False, "model_dirs": [str(folder)],
        "stores": {"ollama": str(store), "huggingface": False, "lmstudio": False}})
    assert cli.main(["--config", str(config), "models"]) == 0
    header, winner, loser = capsys.readouterr().out.splitlines()
    assert winner.split()[:2] == ["qwen3", "dir"] and winner.endswith("available")
    assert loser.split()[:2] == ["qwen3", "ollama"] and str(blob) in loser
    reason = (f"name 'qwen3' is already used by the dir model ({folder / 'qwen3.gguf'}); give this file a distinct "
              "name with a [[models]] entry in the config")
    assert loser.endswith(f"unusable: {reason}")
    assert cli.main(["--config", str(config), "models", "--json"]) == 0
    [model] = json.loads(capsys.readouterr().out)
    assert model["clashes"] == [{"source": "ollama", "path": str(blob), "reason": reason}]
    assert ModelInfo.from_dict(model).clashes == (NameClash("ollama", str(blob), reason),)


def test_the_same_file_in_two_places_is_one_model(tmp_path: Path, gguf: Callable[[str], Path]) -> None:
    cache, lms = tmp_path / "hub", tmp_path / "lms"
    link = write_hf_file(cache, "acme/tiny-gguf", "a" * 40, "tiny.gguf", gguf("shared"))
    (lms / "acme" / "tiny").mkdir(parents=True)
    (lms / "acme" / "tiny" / "tiny-q4.gguf").symlink_to(link.resolve())  # LM Studio pointed at the cache
    entries = catalog(huggingface=cache, lmstudio=lms, explicit={"mine": link}).refresh()
    assert [(e.name, e.source) for e in entries] == [("mine", "config")]


def test_short_names_where_they_are_unique(tmp_path: Path, gguf: Callable[[str], Path]) -> None:
    cache, lms, folder = tmp_path / "hub", tmp_path / "lms", tmp_path / "models"
    write_hf_file(cache, "acme/one-gguf", "a" * 40, "One-Q4.gguf", gguf("one"))
    write_hf_file(cache, "acme/two-gguf", "a" * 40, "Two-Q4.gguf", gguf("two hf"))
    write_lmstudio_file(lms, "other", "two-gguf", "Two-Q4.gguf", gguf("two lms"))
    write_hf_file(cache, "acme/three-gguf", "a" * 40, "three.gguf", gguf("three"))
    write_tiny_llama(folder / "three.gguf")
    cat = catalog(huggingface=cache, lmstudio=lms, dirs=(folder,))
    cat.refresh()
    assert cat.canonical("one-q4") == "acme/one-gguf/one-q4" and cat.get("one-q4").name == "acme/one-gguf/one-q4"
    assert cat.short_name("acme/one-gguf/one-q4") == "one-q4"
    assert cat.canonical("two-q4") == "two-q4" and cat.short_name("acme/two-gguf/two-q4") is None  # two models
    assert cat.get("three").source == "dir" and cat.short_name("acme/three-gguf/three") is None  # a name already
    assert "one-q4" not in cat.names()  # a way to reach a model, not another model


# -- the [stores] config -----------------------------------------------------------------------------


def test_stores_config_and_its_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    assert settings_from_dict({}).stores.model_dump() == {"ollama": "auto", "huggingface": "auto",
                                                          "lmstudio": "auto"}
    stores = settings_from_dict({"stores": {"ollama": False, "huggingface": "~/hub", "lmstudio": "on"}}).stores
    assert (stores.ollama, stores.huggingface, stores.lmstudio) == (False, tmp_path / "hub", True)
    for bad in ("of", 3, "relative/hub", ""):
        with pytest.raises(ConfigError) as caught:
            settings_from_dict({"stores": {"huggingface": bad}}, source="c.toml")
        assert str(caught.value) == (f"c.toml: stores.huggingface = {bad!r}: must be true (on), false (off), "
                                     '"auto" (on where its folder exists) or the absolute path of its folder, '
                                     'e.g. "~/.ollama/models"')
    with pytest.raises(ConfigError, match=r"stores.olama: unknown key \(did you mean 'ollama'\?\)"):
        settings_from_dict({"stores": {"olama": True}})


def test_stores_from_the_environment(tmp_path: Path) -> None:
    env: dict[str, Any] = {"HOME": str(tmp_path), "CORRAL_STORES_OLLAMA": "off",
                           "CORRAL_STORES_HUGGINGFACE": str(tmp_path / "hub"), "CORRAL_STORES_LMSTUDIO": "auto"}
    stores = load_settings(None, env=env).stores
    assert (stores.ollama, stores.huggingface, stores.lmstudio) == (False, tmp_path / "hub", "auto")
    with pytest.raises(ConfigError) as caught:
        load_settings(None, env={**env, "CORRAL_STORES_OLLAMA": "sometimes"})
    assert str(caught.value).startswith("environment CORRAL_STORES_OLLAMA='sometimes': stores.ollama = "
                                        "'sometimes': must be true (on), false (off)")


def test_the_suite_never_sees_a_real_store(tmp_path_factory: pytest.TempPathFactory) -> None:
    """conftest's private home: no developer's ollama, Hugging Face or LM Studio models."""
    assert Path.home().is_relative_to(tmp_path_factory.getbasetemp())
    assert not Path(os.environ["OLLAMA_MODELS"]).exists() and not Path(os.environ["HF_HUB_CACHE"]).exists()
    assert scan_stores({"ollama": True, "huggingface": True, "lmstudio": True}) == []
