"""Models run in place from ollama's store, the Hugging Face cache and LM Studio's folder,
through a real `corral serve` (and `corral models`, `corral run` and the attached console).

The stores are laid out as the tools lay them out (tests/fixture_stores.py) and found the way
a user's are: OLLAMA_MODELS and HF_HUB_CACHE point at them, and LM Studio's folder is in the
server's home. Every model is listed under its store's name, loads and answers; every route
that takes a model name takes these names, with their `/` and `:`; and nothing is written
into the stores.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from corral.backend.remote import RemoteBackend
from corral.console.app import create_app
from corral.console.screens import DetailsScreen
from console_support import details_text, ready, select, state, table, wait_for
from fixture_stores import sha256, tree, write_hf_file, write_lmstudio_file, write_ollama_model
from ggufs import write_tiny_llama
from support import HELLO, Server, assert_error, clean_env, model_state, start_server, write_config

PARAMS = {"num_predict": 5, "temperature": 0.7, "num_ctx": 384, "stop": ["<|never|>"], "mirostat": 0}
SYSTEM = "Answer briefly."
OLLAMA = ("tiny-ollama", "tiny-ollama:q8", "hf.co/acme/Tiny-GGUF:Q4_K_M")
HUGGINGFACE = ("acme/tiny-gguf/tiny-q4_k_m", "acme/tiny-gguf/tiny-q8_0")
LMSTUDIO = ("lmstudio-community/tiny-gguf/tiny-f32",)
BROKEN = "broken:v1"


@dataclass
class Stores:
    server: Server
    env: dict[str, str]  # where `corral` finds the stores: the server's own environment
    config: Path
    ollama: Path
    hub: Path
    lmstudio: Path
    before: dict[str, Any]  # every file of the stores before corral read them


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stores]:
    root = tmp_path_factory.mktemp("stores")
    src = root / "src"
    ollama, hub, home = root / "ollama", root / "hub", root / "run"
    lmstudio = home / ".lmstudio" / "models"
    first = write_tiny_llama(src / "ollama.gguf", seed=1)
    write_ollama_model(ollama, first, "tiny-ollama", params=PARAMS, system=SYSTEM,
                       template="{{ .System }} {{ .Prompt }} {{ .Response }}")
    write_ollama_model(ollama, first, "tiny-ollama", "q8")  # ollama's second tag over the same blob
    write_ollama_model(ollama, write_tiny_llama(src / "hf-in-ollama.gguf", seed=2), "Tiny-GGUF", "Q4_K_M",
                       registry="hf.co", namespace="acme")
    gone = write_tiny_llama(src / "gone.gguf", seed=3)
    write_ollama_model(ollama, gone, "broken", "v1")
    (ollama / "blobs" / f"sha256-{sha256(gone.read_bytes())}").unlink()  # a pull that never finished
    revision = "9" * 40
    write_hf_file(hub, "acme/Tiny-GGUF", revision, "Tiny-Q4_K_M.gguf", write_tiny_llama(src / "hf.gguf", seed=4))
    split = write_tiny_llama(src / "split" / "Tiny-Q8_0.gguf", seed=5, split_max_tensors=12)
    for shard in sorted(split.parent.iterdir()):
        write_hf_file(hub, "acme/Tiny-GGUF", revision, f"Q8_0/{shard.name}", shard)
    write_lmstudio_file(lmstudio, "lmstudio-community", "Tiny-GGUF", "Tiny-F32.gguf",
                        write_tiny_llama(src / "lms.gguf", seed=6))
    write_lmstudio_file(lmstudio, "lmstudio-community", "Tiny-GGUF", "mmproj-Tiny-F16.gguf", src / "lms.gguf")
    before = {str(folder): tree(folder) for folder in (ollama, hub, lmstudio)}
    config = write_config(root / "corral.toml", {
        "include_default_model": False, "budgets": {"max_loaded": 8},
        "defaults": {"n_ctx": 256, "n_parallel": 2, "n_threads": 1, "keep_alive": -1}})
    env = {"OLLAMA_MODELS": str(ollama), "HF_HUB_CACHE": str(hub),
           "XDG_DATA_HOME": str(root / "data")}  # a pull folder of its own: other tests' pulls stay out
    running = start_server(home, config, env=env)
    yield Stores(running, {**env, "HOME": str(home)}, config, ollama, hub, lmstudio, before)
    assert running.stop() == 0, running.log()


def _corral(stores: Stores, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "corral.console.cli", "--config", str(stores.config), *args],
                          env=clean_env(**stores.env), capture_output=True, text=True, timeout=120)


def test_corral_models_lists_every_model_under_its_stores_name(stores: Stores) -> None:
    listed = _corral(stores, "models", "--json")
    assert listed.returncode == 0, listed.stderr
    models = {m["name"]: m for m in json.loads(listed.stdout)}
    assert set(models) == {*OLLAMA, BROKEN, *HUGGINGFACE, *LMSTUDIO}
    assert {name: models[name]["source"] for name in models} == {
        **dict.fromkeys((*OLLAMA, BROKEN), "ollama"), **dict.fromkeys(HUGGINGFACE, "huggingface"),
        **dict.fromkeys(LMSTUDIO, "lmstudio")}
    blob = Path(models["tiny-ollama"]["path"])  # two tags, one blob named by its sha256
    assert models["tiny-ollama:q8"]["path"] == str(blob) and blob.parent == stores.ollama / "blobs"
    assert blob.name == f"sha256-{sha256(blob.read_bytes())}"
    snapshot = stores.hub / "models--acme--Tiny-GGUF" / "snapshots" / ("9" * 40)
    assert models["acme/tiny-gguf/tiny-q8_0"]["path"] == str(snapshot / "Q8_0" / "Tiny-Q8_0-00001-of-00002.gguf")
    assert models["lmstudio-community/tiny-gguf/tiny-f32"]["path"] == str(
        stores.lmstudio / "lmstudio-community" / "Tiny-GGUF" / "Tiny-F32.gguf")
    assert models["acme/tiny-gguf/tiny-q4_k_m"]["short_name"] == "tiny-q4_k_m"
    assert models["tiny-ollama"]["n_ctx"] == 384 and models["tiny-ollama"]["store"]["system"] == SYSTEM
    assert all(m["usable"] for name, m in models.items() if name != BROKEN)
    assert "is missing; pull the model again with ollama" in models[BROKEN]["error"]

    text = _corral(stores, "models").stdout.splitlines()
    assert text[0].split()[:3] == ["NAME", "SOURCE", "ARCH"] and "PATH" in text[0]
    row = next(line for line in text if line.startswith("hf.co/acme/Tiny-GGUF:Q4_K_M "))
    assert row.split()[1] == "ollama" and models["hf.co/acme/Tiny-GGUF:Q4_K_M"]["path"] in row


@pytest.mark.parametrize("name", [*OLLAMA, *HUGGINGFACE, *LMSTUDIO])
def test_each_model_loads_and_answers(stores: Stores, name: str) -> None:
    with stores.server.http() as http:
        answer = http.post("/v1/chat/completions", json={"model": name, "messages": HELLO, "max_tokens": 4})
        assert answer.status_code == 200, answer.text
        assert answer.json()["model"] == name and answer.json()["usage"]["completion_tokens"] >= 1
        shown = model_state(http, name)
        assert shown["state"] == "ready" and shown["source"] in ("ollama", "huggingface", "lmstudio")


def test_a_broken_manifest_is_an_error_naming_it(stores: Stores) -> None:
    with stores.server.http() as http:
        manifest = stores.ollama / "manifests" / "registry.ollama.ai" / "library" / "broken" / "v1"
        error = assert_error(http.post("/v1/chat/completions", json={"model": BROKEN, "messages": HELLO}),
                             422, "model_unusable", f"model 'broken:v1': {manifest}: its model blob")
        assert "(None)" not in error["message"]


def test_an_ollama_manifests_defaults_apply(stores: Stores) -> None:
    with stores.server.http() as http:
        assert model_state(http, "tiny-ollama")["n_ctx"] == 384  # num_ctx
        assert model_state(http, "tiny-ollama:q8")["n_ctx"] == 256  # [defaults]: its manifest has no params
        answer = http.post("/v1/chat/completions", json={"model": "tiny-ollama", "messages": HELLO,
                                                          "ignore_eos": True}).json()
        assert answer["usage"]["completion_tokens"] == 5 and answer["choices"][0]["finish_reason"] == "length"
        longer = http.post("/v1/chat/completions", json={"model": "tiny-ollama", "messages": HELLO,
                                                          "ignore_eos": True, "max_tokens": 7}).json()
        assert longer["usage"]["completion_tokens"] == 7  # the request's own value wins
        counts = [http.post("/v1/messages/count_tokens", json={"model": name, "messages": HELLO}).json()
                  for name in ("tiny-ollama", "tiny-ollama:q8")]
        assert counts[0]["input_tokens"] > counts[1]["input_tokens"]  # its system prompt leads the chat


def test_admin_routes_take_names_with_slashes_and_colons(stores: Stores) -> None:
    name = "hf.co/acme/Tiny-GGUF:Q4_K_M"
    with stores.server.http() as http:
        for path in (f"/api/models/{name}", f"/api/models/{quote(name, safe='')}"):
            assert http.post(f"{path}/load").json()["state"] == "ready"
            assert http.post(f"{path}/pin").json()["pinned"] is True
            assert http.post(f"{path}/unpin").json()["pinned"] is False
            assert http.post(f"{path}/evict").json()["state"] == "available"
        details = http.get(f"/api/models/{quote(name, safe='')}").json()
        blob = Path(details["path"])
        assert details["name"] == name and details["source"] == "ollama"
        assert details["digest"] == blob.name.removeprefix("sha256-") == sha256(blob.read_bytes())
        assert details["store"]["manifest"].endswith("manifests/hf.co/acme/Tiny-GGUF/Q4_K_M")
        split = http.get("/api/models/acme/tiny-gguf/tiny-q8_0").json()
        assert split["source"] == "huggingface" and split["digest"] == Path(split["path"]).resolve().name
        assert http.get("/api/models/tiny-ollama").json()["store"]["defaults"]["max_tokens"] == 5
        assert_error(http.get("/api/models/hf.co/nobody/none:Q4"), 404, "model_not_found", "tiny-ollama:q8")
        ids = [card["id"] for card in http.get("/v1/models").json()["data"]]
        assert set(ids) == {*OLLAMA, *HUGGINGFACE, *LMSTUDIO}
        assert http.get(f"/v1/models/{name}").json()["id"] == name
        assert http.get("/v1/models/tiny-q8_0").json()["id"] == "tiny-q8_0"  # a short name


def test_short_names_reach_their_model(stores: Stores) -> None:
    with stores.server.http() as http:
        answer = http.post("/v1/completions", json={"model": "tiny-f32", "prompt": "Once", "max_tokens": 2})
        assert answer.status_code == 200, answer.text
        assert http.post("/api/models/tiny-f32/pin").json()["name"] == "lmstudio-community/tiny-gguf/tiny-f32"
        assert model_state(http, "lmstudio-community/tiny-gguf/tiny-f32")["pinned"] is True
        http.post("/api/models/tiny-f32/unpin")


def test_the_ollama_api_on_store_models(stores: Stores) -> None:
    with stores.server.http() as http:
        tags = {m["name"]: m for m in http.get("/ollama/api/tags").json()["models"]}
        assert set(tags) == {"tiny-ollama:latest", "tiny-ollama:q8", "hf.co/acme/Tiny-GGUF:Q4_K_M",
                             "acme/tiny-gguf/tiny-q4_k_m:latest", "acme/tiny-gguf/tiny-q8_0:latest",
                             "lmstudio-community/tiny-gguf/tiny-f32:latest"}
        for tag in tags.values():
            assert tag["corral"]["source"] in ("ollama", "huggingface", "lmstudio")
            assert tag["digest"] == sha256(Path(tag["corral"]["path"]).read_bytes())
        shown = http.post("/ollama/api/show", json={"model": "tiny-ollama:latest"}).json()
        assert shown["system"] == SYSTEM
        assert 'stop                           "<|never|>"' in shown["parameters"]
        assert "num_predict                    5" in shown["parameters"]
    client = stores.server.ollama(f"{stores.server.url}/ollama")
    for name in ("tiny-ollama", "hf.co/acme/Tiny-GGUF:Q4_K_M", "acme/tiny-gguf/tiny-q4_k_m:latest"):
        answer = client.chat(model=name, messages=HELLO, options={"num_predict": 3})
        assert answer.done and answer.eval_count >= 1
    assert {m.model for m in client.list().models} == set(tags)


def test_remote_backend_quotes_names(stores: Stores) -> None:
    with RemoteBackend(stores.server.url) as remote:
        for name in ("hf.co/acme/Tiny-GGUF:Q4_K_M", "acme/tiny-gguf/tiny-q8_0"):
            assert remote.sync.load(name).state == "ready"
            assert remote.sync.pin(name).pinned and not remote.sync.pin(name, False).pinned
            assert remote.sync.details(name).source in ("ollama", "huggingface")
            chunks = list(remote.sync.complete(name, "Once", max_tokens=2, temperature=0.0, ignore_eos=True))
            assert chunks[-1].stats is not None and chunks[-1].stats.completion_tokens == 2  # a random model's
            # tokens may render as no text: the count says it answered
            assert remote.sync.evict(name).state == "available"
        [info] = [m for m in remote.sync.models() if m.name == "tiny-ollama"]
        assert info.store is not None and info.store.system == SYSTEM and info.source == "ollama"


def test_corral_run_takes_a_store_models_name(stores: Stores) -> None:
    ran = _corral(stores, "run", "tiny-ollama:q8", "Once upon a time", "--max-tokens", "3", "--stats")
    assert ran.returncode == 0, ran.stderr
    assert "generated tokens" in ran.stderr


async def test_the_console_shows_where_models_come_from(stores: Stores) -> None:
    backend = RemoteBackend(stores.server.url)
    app = create_app(backend)
    name = "hf.co/acme/Tiny-GGUF:Q4_K_M"
    try:
        async with app.run_test(size=(160, 40)) as pilot:
            await ready(pilot)
            assert table(app).cell_text(name, "name") == f"{name} · ollama"
            assert table(app).cell_text("acme/tiny-gguf/tiny-q8_0", "name") == "acme/tiny-gguf/tiny-q8_0 · huggingface"
            await select(pilot, name)
            await pilot.press("l")
            await wait_for(pilot, lambda: state(app, name) == "ready", 30)
            await select(pilot, "tiny-ollama")
            await pilot.press("d")
            await wait_for(pilot, lambda: isinstance(app.screen, DetailsScreen))
            shown = details_text(app)
            assert "source ollama" in shown and str(stores.ollama / "blobs") in shown
            assert "manifest " + str(stores.ollama / "manifests") in shown
            assert f"system prompt {SYSTEM}" in shown and "max_tokens 5" in shown
    finally:
        await backend.aclose()


def test_rm_refuses_a_store_model_and_names_its_tools_way(stores: Stores) -> None:
    with stores.server.http() as http:
        assert_error(http.delete("/api/models/tiny-ollama"), 409, "not_pulled", "ollama rm tiny-ollama")
        assert_error(http.delete("/api/models/acme/tiny-gguf/tiny-q8_0"), 409, "not_pulled", "huggingface-cli")


def test_nothing_was_written_into_the_stores(stores: Stores) -> None:
    """Last in this module: after every listing, load, request and eviction above."""
    assert {folder: tree(Path(folder)) for folder in stores.before} == stores.before
