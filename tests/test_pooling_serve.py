"""Embedding-only models through a real `corral serve`: embeddings pooled as each GGUF declares
(mean, CLS, last, and an encoder's mean) through the official `openai` client, a reranker's
/v1/rerank through httpx, both checked against llama.cpp's own pooling computed here; what
each model is said to serve; chat requests to them refused in every dialect; and a file that
fails in the middle of its load answered as the file's fault.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import ollama
import openai
import pytest

from corral.backend.config import settings_from_dict
from corral.backend.errors import BadRequest
from corral.backend.generation import Reranking
from corral.backend.local import LocalBackend
from corral.backend.remote import RemoteBackend
from corral.backend.weights import ModelWeights
from ggufs import RERANKER, write_fails_mid_load, write_tiny_llama, write_wrong_shape
from reference import llama_cpp_pooled, llama_cpp_rank_scores
from support import HELLO, Server, assert_error, replayed_events, start_server, tiny_settings, write_config

EMBEDDERS = {  # model: (write_tiny_llama's arguments, llama.cpp's pooling type it must agree with)
    "embed-mean": ({"pooling": "mean"}, 1),
    "embed-cls": ({"pooling": "cls"}, 2),
    "embed-last": ({"pooling": "last"}, 3),
    "encoder": ({"causal": False}, 1),  # bidirectional, no pooling declared: the mean
}
TEXT = "the little girl went to the park with her dog and saw a big tree"
QUERY = "a girl and her dog"
DOCUMENTS = ["the sun is red", "she went to the park with her dog", "hello", "one day he said hello to the cat"]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("pooling-models")
    for name, (shape, _) in EMBEDDERS.items():
        write_tiny_llama(directory / f"{name}.gguf", name=name, **shape)
    write_tiny_llama(directory / "rerank.gguf", name="rerank", **RERANKER)  # type: ignore[arg-type]
    write_tiny_llama(directory / "chat.gguf", name="chat")
    return directory


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, files: Path) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("pooling-server")
    broken = [write_fails_mid_load(files / "chat.gguf", root / "half.gguf"),
              write_wrong_shape(files / "chat.gguf", root / "bent.gguf", "blk.0.ffn_up.weight")]
    settings = tiny_settings(files, budgets={"max_loaded": 8},
                             models=[{"name": path.stem, "path": str(path)} for path in broken])
    running = start_server(root, write_config(root / "corral.toml", settings), extra=("--ollama-port", "0"))
    yield running
    assert running.stop() == 0, running.log()
    assert "Traceback" not in running.log()


@pytest.fixture
def http(served: Server) -> Iterator[httpx.Client]:
    with served.http() as client:
        yield client


def tokens_of(path: Path, text: str) -> list[int]:
    weights = ModelWeights(str(path))
    try:
        return weights.tokenize(text, add_special=True)
    finally:
        weights.release()


@pytest.mark.parametrize("model", list(EMBEDDERS))
def test_embeddings_pool_as_the_gguf_declares(served: Server, files: Path, model: str) -> None:
    path = files / f"{model}.gguf"
    result = served.openai().embeddings.create(model=model, input=[TEXT, "hello"])
    reference = llama_cpp_pooled(path, tokens_of(path, TEXT), EMBEDDERS[model][1])
    assert result.data[0].embedding == pytest.approx(reference, abs=1e-4)
    assert result.usage.prompt_tokens == len(tokens_of(path, TEXT)) + len(tokens_of(path, "hello"))


def rerank_reference(path: Path) -> list[float]:
    """llama.cpp's RANK pooling over each pair's prompt as llama-server builds it where the GGUF
    has no rerank template: BOS, the query, the document (this vocabulary adds no EOS or SEP)."""
    weights = ModelWeights(str(path))
    try:
        query = weights.tokenize(QUERY, add_special=False)
        prompts = [[weights.bos, *query, *weights.tokenize(d, add_special=False)] for d in DOCUMENTS]
    finally:
        weights.release()
    return llama_cpp_rank_scores(path, prompts)


@pytest.mark.parametrize("route", ["/v1/rerank", "/rerank", "/v1/reranking"])
def test_rerank_orders_documents_by_llama_cpps_scores(http: httpx.Client, files: Path, route: str) -> None:
    reference = rerank_reference(files / "rerank.gguf")
    expected = sorted(range(len(DOCUMENTS)), key=lambda i: -reference[i])
    reply = http.post(route, json={"model": "rerank", "query": QUERY, "documents": DOCUMENTS, "top_n": 3,
                                   "return_documents": True})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert (body["model"], body["object"]) == ("rerank", "list")
    assert [r["index"] for r in body["results"]] == expected[:3]
    assert [r["relevance_score"] for r in body["results"]] == pytest.approx([reference[i] for i in expected[:3]],
                                                                            abs=1e-4)
    assert [r["document"]["text"] for r in body["results"]] == [DOCUMENTS[i] for i in expected[:3]]
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > 4 * len(DOCUMENTS)
    whole = http.post(route, json={"model": "rerank", "query": QUERY, "documents": DOCUMENTS}).json()
    assert [r["index"] for r in whole["results"]] == expected and "document" not in whole["results"][0]


def test_the_python_api_reranks_in_process_and_over_http_alike(served: Server, files: Path) -> None:
    """`sync.rerank` on a LocalBackend and on a RemoteBackend of the server: the same ranking."""
    with LocalBackend(settings_from_dict(tiny_settings(files))) as local:
        here = local.sync.rerank("rerank", QUERY, DOCUMENTS, top_n=2)
        with pytest.raises(BadRequest, match="model 'chat' is a chat model"):
            local.sync.rerank("chat", QUERY, DOCUMENTS)
    with RemoteBackend(served.url) as remote:
        there = remote.sync.rerank("rerank", QUERY, DOCUMENTS, top_n=2)
    assert isinstance(here, Reranking) and len(here.results) == 2
    assert [r.index for r in there.results] == [r.index for r in here.results]
    assert [r.relevance_score for r in there.results] == pytest.approx([r.relevance_score for r in here.results])
    assert there.prompt_tokens == here.prompt_tokens


def test_rerank_is_announced_and_counted_like_embeddings(http: httpx.Client) -> None:
    reply = http.post("/v1/rerank", json={"model": "rerank", "query": QUERY, "documents": DOCUMENTS[:2]},
                      headers={"x-request-id": "rerank-counted"})
    assert reply.status_code == 200, reply.text
    finished = [e for e in replayed_events(http) if e.get("request_id") == "rerank-counted"]
    assert [(e["type"], e["finish_reason"], e["prompt_tokens"]) for e in finished] == [
        ("request_finished", "rerank", reply.json()["usage"]["prompt_tokens"])]
    metrics = http.get("/metrics").text
    assert 'corral_rerank_duration_seconds_count{model="rerank"}' in metrics
    assert 'corral_requests_total{api="openai",model="rerank",status="rerank"}' in metrics


BAD_RERANKS = [  # (body, what the message must say)
    ({"model": "embed-mean", "query": QUERY, "documents": DOCUMENTS},
     "model 'embed-mean' is an embedding model"),
    ({"model": "chat", "query": QUERY, "documents": DOCUMENTS}, "model 'chat' is a chat model"),
    ({"model": "rerank", "query": QUERY, "documents": ["short", "the cat sat " * 200]},
     "documents[1] with the query is"),
    ({"model": "rerank", "query": QUERY, "documents": []}, "documents"),
    ({"model": "rerank", "query": QUERY, "documents": [1, 2]}, "documents"),
    ({"model": "rerank", "documents": DOCUMENTS}, "query"),
    ({"model": "rerank", "query": QUERY, "documents": DOCUMENTS, "top_n": 0}, "top_n"),
]


@pytest.mark.parametrize(("body", "mentions"), BAD_RERANKS)
def test_bad_reranks_are_400s_that_say_why(http: httpx.Client, body: dict[str, Any], mentions: str) -> None:
    assert_error(http.post("/v1/rerank", json=body), 400, "invalid_request", mentions)


def test_a_reranker_makes_no_embeddings_and_says_where_to_go(served: Server) -> None:
    with pytest.raises(openai.BadRequestError, match=r"model 'rerank' is a reranker.*POST /v1/rerank") as caught:
        served.openai().embeddings.create(model="rerank", input="hello")
    assert caught.value.status_code == 400


def test_models_say_what_they_serve(http: httpx.Client, served: Server) -> None:
    kinds = {m["name"]: m["kind"] for m in http.get("/api/ps").json()["models"]}
    assert kinds == {"embed-mean": "embedding", "embed-cls": "embedding", "embed-last": "embedding",
                     "encoder": "embedding", "rerank": "rerank", "chat": "chat", "half": "chat", "bent": "chat"}
    assert http.get("/api/models/rerank").json()["kind"] == "rerank"
    cards = {m.id: m.model_extra["kind"] for m in served.openai().models.list().data}
    assert cards["encoder"] == "embedding" and cards["chat"] == "chat"
    assert served.ollama().show("embed-cls").capabilities == ["embedding"]


@pytest.mark.parametrize("model", ["embed-cls", "rerank"])
def test_chat_to_an_embedding_only_model_is_a_400_in_every_dialect(served: Server, model: str) -> None:
    serves = "an embedding model" if model == "embed-cls" else "a reranker"
    said = f"model '{model}' is {serves}"
    client = served.openai()
    for call in (lambda: client.chat.completions.create(model=model, messages=HELLO, max_tokens=2),  # type: ignore[arg-type]
                 lambda: client.completions.create(model=model, prompt="hi", max_tokens=2),
                 lambda: client.responses.create(model=model, input="hi", max_output_tokens=2)):
        with pytest.raises(openai.BadRequestError, match=said):
            call()
    claude = anthropic.Anthropic(base_url=served.url, api_key="none", max_retries=0,
                                 http_client=anthropic.DefaultHttpxClient(trust_env=False))
    with pytest.raises(anthropic.BadRequestError, match=said):
        claude.messages.create(model=model, max_tokens=2, messages=HELLO)  # type: ignore[arg-type]
    with pytest.raises(ollama.ResponseError, match=said) as caught:
        served.ollama().chat(model=model, messages=HELLO)
    assert caught.value.status_code == 400
    with httpx.Client(trust_env=False) as plain:  # refused before any load: the model stays unloaded
        state = next(m for m in plain.get(f"{served.url}/api/ps").json()["models"] if m["name"] == model)
    assert state["state"] in ("available", "ready")


@pytest.mark.parametrize(("model", "mentions"), [("half", "blk.2"), ("bent", "blk.0.ffn_up.weight")])
def test_a_file_that_fails_mid_load_is_the_files_fault(http: httpx.Client, model: str, mentions: str) -> None:
    """The header reads well; llama.cpp refuses a tensor while loading: 422, led by the model's name."""
    for reply in (http.post(f"/api/models/{model}/load"),
                  http.post("/v1/chat/completions", json={"model": model, "messages": HELLO, "max_tokens": 2})):
        error = assert_error(reply, 422, "model_file_rejected", mentions)
        assert error["message"].startswith(f"model '{model}': "), error["message"]
    state = next(m for m in http.get("/api/ps").json()["models"] if m["name"] == model)
    assert state["state"] == "failed" and state["error"].startswith(f"model '{model}': ")
    assert f'corral_load_failures_total{{model="{model}",reason="file"}}' in http.get("/metrics").text
