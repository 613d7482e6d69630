"""ollama's API through the unchanged official `ollama` client against a real `corral serve` on
the default model (a base model with no chat template), on its ollama port and under `/ollama`
on its own: the model list, running models, show, chat and generate whole and streamed, embed,
a JSON schema format, tools, loading and unloading by keep_alive, and ollama's error shape.
A base model cannot be judged on what it says, so these tests check structure.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import httpx
import ollama
import pytest

from corral.backend.catalog import DEFAULT_MODEL_NAME, default_model_path
from support import WEATHER_PARAMETERS, Person, Server, check_weather, wait_for

pytestmark = pytest.mark.e2e
MODEL = DEFAULT_MODEL_NAME
TAGGED = f"{MODEL}:latest"
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                            "parameters": WEATHER_PARAMETERS}}
ASK = [{"role": "user", "content": "What is the weather in Paris right now?"}]
GREEDY = {"temperature": 0, "num_predict": 24}


@pytest.fixture(scope="module")
def client(default_server: Server) -> ollama.Client:
    return default_server.ollama()


def test_the_model_list_names_sizes_and_digests(default_server: Server, client: ollama.Client) -> None:
    listed = {m.model: m for m in client.list().models}
    assert {TAGGED, "tiny-side:latest"} <= set(listed)
    model = listed[TAGGED]
    path = default_model_path()
    assert model.size == path.stat().st_size
    assert model.digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert model.details and model.details.format == "gguf" and model.details.family == "gemma3"
    assert model.details.parameter_size == "268M" and model.details.quantization_level
    assert model.modified_at is not None
    # the same list under /ollama on corral's own port
    assert {m.model for m in default_server.ollama(f"{default_server.url}/ollama").list().models} == set(listed)


def test_show_and_version(client: ollama.Client) -> None:
    shown = client.show(MODEL)
    assert shown.details and shown.details.family == "gemma3"
    assert shown.modelinfo and shown.modelinfo["general.architecture"] == "gemma3"
    assert shown.capabilities == ["completion", "tools"]
    assert client.show(TAGGED).modelinfo == shown.modelinfo
    with pytest.raises(ollama.ResponseError) as missing:
        client.show("no-such-model")
    assert missing.value.status_code == 404 and "no-such-model" in missing.value.error


def test_chat_whole_and_streamed(client: ollama.Client) -> None:
    hello = [{"role": "user", "content": "Say hello."}]
    parts = list(client.chat(model=MODEL, messages=hello, options=GREEDY, stream=True))
    assert len(parts) > 2 and parts[-1].done and not any(p.done for p in parts[:-1])
    whole = client.chat(model=TAGGED, messages=hello, options=GREEDY, stream=False)  # replayed from the cache
    assert whole.done and whole.done_reason in ("stop", "length") and whole.message.role == "assistant"
    assert whole.message.content and whole.model == TAGGED
    assert "".join(p.message.content or "" for p in parts) == whole.message.content
    last = parts[-1]
    assert last.eval_count == whole.eval_count and last.eval_count and last.eval_count <= 24
    assert last.prompt_eval_count and last.total_duration and last.eval_duration and last.prompt_eval_duration
    assert last.total_duration >= last.eval_duration + last.prompt_eval_duration


def test_generate_raw_templated_and_with_a_system_prompt(client: ollama.Client) -> None:
    raw = client.generate(model=MODEL, prompt="The capital of France is", raw=True, options=GREEDY)
    assert raw.done and raw.response and raw.prompt_eval_count == 6  # <bos> and five words: no template
    chat_like = client.generate(model=MODEL, prompt="The capital of France is", system="Answer briefly.",
                                options=GREEDY)
    assert chat_like.prompt_eval_count and chat_like.prompt_eval_count > raw.prompt_eval_count
    templated = client.generate(model=MODEL, prompt="France", system="Capitals.", options=GREEDY,
                                template="{{ if .System }}{{ .System }} {{ end }}The capital of {{ .Prompt }} is"
                                         "{{ .Response }}<end>")
    rendered = client.generate(model=MODEL, prompt="Capitals. The capital of France is", raw=True, options=GREEDY)
    assert (templated.prompt_eval_count, templated.response) == (rendered.prompt_eval_count, rendered.response)
    streamed = list(client.generate(model=MODEL, prompt="The capital of France is", raw=True, options=GREEDY,
                                    stream=True))
    assert "".join(p.response for p in streamed) == raw.response and streamed[-1].done


def test_embed_and_the_older_embeddings(client: ollama.Client) -> None:
    two = client.embed(model=MODEL, input=["a cat", "a dog"])
    assert len(two.embeddings) == 2 and len(two.embeddings[0]) == 640 and two.prompt_eval_count
    one = client.embeddings(model=MODEL, prompt="a cat")
    assert one.embedding == pytest.approx(two.embeddings[0], abs=1e-5)


def test_format_with_a_json_schema(client: ollama.Client) -> None:
    answer = client.chat(model=MODEL, messages=[{"role": "user", "content": "Invent a person."}],
                         format=Person.model_json_schema(), options={"temperature": 0, "num_predict": 80})
    Person.model_validate_json(answer.message.content or "")
    plain = client.generate(model=MODEL, prompt="A JSON object:", format="json", options={"num_predict": 40,
                                                                                           "temperature": 0})
    if plain.done_reason == "stop":
        assert isinstance(json.loads(plain.response), dict)


def test_tools_and_a_tool_round_trip(client: ollama.Client) -> None:
    answer = client.chat(model=MODEL, messages=ASK, tools=[WEATHER], options={"temperature": 0, "num_predict": 80})
    calls = answer.message.tool_calls or []
    for call in calls:  # the model may call or answer; a call fits its schema
        assert call.function.name == "get_weather"
        check_weather(dict(call.function.arguments))
    if not calls:
        assert answer.message.content and "tool_call" not in answer.message.content
    called = {"role": "assistant", "content": "",
              "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}}]}
    result = {"role": "tool", "tool_name": "get_weather", "content": '{"temperature": 21, "sky": "clear"}'}
    after = client.chat(model=MODEL, messages=[*ASK, called, result], options=GREEDY)
    before = client.chat(model=MODEL, messages=[*ASK, called], options={"num_predict": 1})
    assert after.message.content and after.prompt_eval_count and before.prompt_eval_count
    assert after.prompt_eval_count > before.prompt_eval_count + 10  # the result reached the prompt
    with pytest.raises(ollama.ResponseError) as orphan:
        client.chat(model=MODEL, messages=[*ASK, result])
    assert orphan.value.status_code == 400 and "tool message" in orphan.value.error


def test_an_empty_request_loads_and_keep_alive_zero_unloads(client: ollama.Client) -> None:
    loaded = client.chat(model="tiny-side", messages=[], keep_alive="10m")
    assert loaded.done and loaded.done_reason == "load"
    [running] = [m for m in client.ps().models if m.model == "tiny-side:latest"]
    assert running.size and running.expires_at and running.context_length
    assert running.details and running.details.family == "llama"
    unloaded = client.generate(model="tiny-side", prompt="", keep_alive=0)
    assert unloaded.done_reason == "unload"
    assert "tiny-side:latest" not in {m.model for m in client.ps().models}
    client.generate(model="tiny-side", prompt="Hello", options={"num_predict": 2}, keep_alive=0)
    wait_for(lambda: "tiny-side:latest" not in {m.model for m in client.ps().models},
             what="tiny-side to unload after a request with keep_alive 0")


def test_errors_come_in_ollamas_shape(default_server: Server, client: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError) as unknown:
        client.chat(model="no-such-model", messages=ASK)
    assert unknown.value.status_code == 404
    cases: list[tuple[str, dict[str, Any], int, str]] = [
        ("/api/chat", {"model": MODEL, "messages": "hi"}, 400, "messages"),
        ("/api/chat", {"model": MODEL, "messages": ASK, "options": {"temperature": "hot"}}, 400, "options.temperature"),
        ("/api/chat", {"model": MODEL, "messages": ASK, "options": {"num_gpu": 99}}, 400, "n_gpu_layers"),
        ("/api/chat", {"model": MODEL, "messages": ASK, "options": {"mirostat": 2}}, 400, "mirostat"),
        ("/api/chat", {"model": MODEL, "messages": ASK, "options": {"no_such": 1}}, 400, "options.no_such"),
        ("/api/chat", {"model": MODEL, "messages": ASK, "options": {"num_ctx": 1 << 20}}, 400, "num_ctx"),
        ("/api/chat", {"model": MODEL, "messages": [{"role": "user", "content": "x", "images": ["aGk="]}]}, 400,
         "images are not supported"),
        ("/api/generate", {"model": MODEL, "prompt": "x", "template": "{{ range .Messages }}{{ end }}"}, 400,
         "range"),
        ("/api/generate", {"model": MODEL, "prompt": "x", "keep_alive": "soon"}, 400, "keep_alive"),
        ("/api/pull", {"model": "llama3"}, 400, "hf.co/owner/repo:QUANT"),
        ("/api/copy", {"source": MODEL, "destination": "x"}, 501, "[[alias]]"),
    ]
    assert default_server.ollama_url
    with httpx.Client(base_url=default_server.ollama_url, trust_env=False, timeout=30) as http:
        for path, body, status, mentions in cases:
            response = http.post(path, json=body)
            assert response.status_code == status, (path, body, response.text)
            assert set(response.json()) == {"error"} and mentions in response.json()["error"], response.text
        assert http.get("/").status_code == 200 and http.head("/").status_code == 200
        assert http.get("/api/version").json()["version"]
        assert http.get("/v1/models").json()["data"]  # ollama's port serves OpenAI's API too, as ollama does
        assert "corral_requests_total{api=\"ollama\"" in http.get("/metrics").text


def test_num_ctx_within_the_loaded_context_is_accepted(client: ollama.Client) -> None:
    answer = client.generate(model=MODEL, prompt="Hi", raw=True, options={"num_ctx": 512, "num_predict": 2})
    assert answer.done


def test_the_admin_api_keeps_its_own_ps_on_corrals_port(default_server: Server) -> None:
    with default_server.http() as http:
        assert "host" in http.get("/api/ps").json()  # corral's status, not ollama's
        assert "models" in http.get("/ollama/api/ps").json()
        assert http.post("/ollama/api/show", json={}).json() == {"error": "model is required: the name of the model "
                                                                          "to show"}
