"""The console on models from other tools' stores: the source beside the name, a filter by
store, the details of an ollama manifest, a name clash, and the verbs on names with `/` and `:`."""

from __future__ import annotations

from corral.backend.snapshot import NameClash, StoreInfo
from corral.console.screens import DetailsScreen
from console_support import SIZE, details_text, make_app, ready, select, state, table, wait_for
from fake_backend import FakeBackend, model_info

OLLAMA = "hf.co/acme/Tiny-GGUF:Q4_K_M"
HF = "acme/tiny-gguf/tiny-q8_0"
STORE = StoreInfo(manifest="/srv/ollama/manifests/hf.co/acme/Tiny-GGUF/Q4_K_M",
                  params={"temperature": 0.6, "stop": ["<|eot_id|>"], "mirostat": 0},
                  defaults={"temperature": 0.6, "stop": ["<|eot_id|>"]}, system="Answer briefly.",
                  template="{{ .System }} {{ .Prompt }}")
CLASH = ("name 'qwen3' is already used by the dir model (/models/qwen3.gguf); give this file a distinct name with a "
         "[[models]] entry in the config")


def backend() -> FakeBackend:
    return FakeBackend([
        model_info(OLLAMA, source="ollama", path="/srv/ollama/blobs/sha256-" + "a" * 64, store=STORE),
        model_info(HF, source="huggingface", short_name="tiny-q8_0",
                   path="/hub/models--acme--Tiny-GGUF/snapshots/" + "1" * 40 + "/Tiny-Q8_0-00001-of-00002.gguf"),
        model_info("qwen3", clashes=(NameClash("ollama", "/srv/ollama/blobs/sha256-bbbb", CLASH),)),
    ])


async def test_the_table_names_each_models_store_and_filters_by_it() -> None:
    app, fake = make_app(backend())
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        assert table(app).cell_text(OLLAMA, "name") == f"{OLLAMA} · ollama"
        assert table(app).cell_text(HF, "name") == f"{HF} · huggingface"
        assert table(app).cell_text("qwen3", "name") == "qwen3"  # a folder's model: no store to name
        await pilot.press("slash", *"ollama", "enter")
        await wait_for(pilot, lambda: [m.name for m in table(app).models] == [OLLAMA])
        await pilot.press("l")
        await wait_for(pilot, lambda: state(app, OLLAMA) == "ready")
        await pilot.press("p")
        await wait_for(pilot, lambda: ("pin", OLLAMA, True) in fake.calls)
        assert ("load", OLLAMA) in fake.calls


async def test_details_show_the_store_the_short_name_and_a_clash() -> None:
    app, _ = make_app(backend())
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await select(pilot, OLLAMA)
        await pilot.press("d")
        await wait_for(pilot, lambda: isinstance(app.screen, DetailsScreen))
        shown = details_text(app)
        assert "source ollama" in shown and "file /srv/ollama/blobs/sha256-" in shown
        assert f"manifest {STORE.manifest}" in shown
        assert "params temperature 0.6, stop ['<|eot_id|>'], mirostat 0" in shown
        assert "defaults temperature 0.6, stop ['<|eot_id|>']" in shown
        assert "system prompt Answer briefly." in shown and "template {{ .System }} {{ .Prompt }}" in shown
        await pilot.press("escape")
        await select(pilot, HF)
        await pilot.press("d")
        await wait_for(pilot, lambda: isinstance(app.screen, DetailsScreen))
        assert "short name tiny-q8_0" in details_text(app) and "manifest" not in details_text(app)
        await pilot.press("escape")
        await select(pilot, "qwen3")
        await pilot.press("d")
        await wait_for(pilot, lambda: isinstance(app.screen, DetailsScreen))
        assert ("not used ollama /srv/ollama/blobs/sha256-bbbb: name 'qwen3' is already used by the dir model"
                in details_text(app))
