"""LocalBackend: the in-process Backend, from plain code and from inside a running loop."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral.backend.local import LocalBackend
from corral.backend.protocol import Backend
from corral.backend.config import settings_from_dict
from corral.backend.errors import BadRequest, ModelNotFound
from corral.backend.events import StateChanged
from ggufs import write_tiny_llama
from support import tiny_settings, wait_for


@pytest.fixture
def backend(model_dir: Path) -> Iterator[LocalBackend]:
    with LocalBackend(settings_from_dict(tiny_settings(model_dir))) as local:
        yield local


def test_it_implements_the_protocol(backend: LocalBackend) -> None:
    assert isinstance(backend, Backend) and backend.kind == "local"


def test_sync_use_from_a_plain_script(backend: LocalBackend) -> None:
    assert [m.name for m in backend.sync.models()] == ["tiny-a", "tiny-b", "tiny-c"]
    text = backend.sync.text("tiny-a", "Once upon a time", max_tokens=6, temperature=0.0, ignore_eos=True)
    assert text and backend.sync.text("tiny-a", "Once upon a time", max_tokens=6, temperature=0.0,
                                      ignore_eos=True) == text
    chunks = list(backend.sync.chat("tiny-a", [{"role": "user", "content": "hi"}], max_tokens=4,
                                    temperature=0.0, ignore_eos=True))
    assert chunks[-1].finish_reason == "length" and chunks[-1].stats.completion_tokens == 4
    status = backend.sync.status()
    assert status.host.ram_total > 0 and status.host.gpu_note
    assert {m.name: m.state for m in status.models}["tiny-a"] == "ready"
    assert status.ram_reserved > 0 and status.ram_budget > status.ram_reserved


async def test_async_use_inside_a_running_loop(backend: LocalBackend) -> None:
    """What a notebook does: await from the loop that is already running."""
    await backend.load("tiny-b")
    pinned = await backend.pin("tiny-b")
    assert pinned.pinned and pinned.state == "ready"
    pieces = [c.text async for c in backend.complete("tiny-b", "the time", max_tokens=5, temperature=0.0,
                                                     ignore_eos=True)]
    assert "".join(pieces)
    assert [m.name for m in backend.sync.models()]  # blocking calls work here too
    evicted = await backend.evict("tiny-b", force=True)
    assert evicted.state == "available"


async def test_events_show_state_changes(backend: LocalBackend) -> None:
    events = backend.events()
    await backend.load("tiny-c")
    seen: list[tuple[str, str]] = []

    async def read() -> None:
        async for event in events:
            if isinstance(event, StateChanged) and event.model == "tiny-c":
                seen.append((event.old, event.new))
                if event.new == "ready":
                    return

    await asyncio.wait_for(read(), 5)
    assert seen == [("available", "loading"), ("loading", "ready")]


async def test_abandoned_stream_gives_the_model_back(backend: LocalBackend) -> None:
    stream = backend.complete("tiny-a", "Once upon a time", max_tokens=200, temperature=0.0, ignore_eos=True)
    async for _ in stream:
        break
    await stream.aclose()

    async def idle() -> None:
        while (await backend.models())[0].in_flight:
            await asyncio.sleep(0.01)

    await asyncio.wait_for(idle(), 5)
    assert (await backend.models())[0].state == "ready"


def test_bad_requests_are_typed_errors_and_do_not_hurt(backend: LocalBackend) -> None:
    with pytest.raises(BadRequest, match="unknown option"):
        backend.sync.text("tiny-a", "hi", temprature=0.5)
    with pytest.raises(ModelNotFound, match="known models: tiny-a, tiny-b, tiny-c"):
        backend.sync.text("nope", "hi")
    with pytest.raises(BadRequest, match="messages"):
        list(backend.sync.chat("tiny-a", []))
    assert backend.sync.text("tiny-a", "hi", max_tokens=2, ignore_eos=True)


def test_close_unloads_and_stops_the_backend_thread(model_dir: Path) -> None:
    local = LocalBackend(settings_from_dict(tiny_settings(model_dir)))
    local.sync.load("tiny-a")
    local.close()
    assert not local._thread.is_alive()
    assert not [t for t in threading.enumerate() if t.name.startswith("engine-tiny-a")]
    local.close()  # idempotent


def test_embeddings_are_one_normalised_vector_per_input(backend: LocalBackend) -> None:
    result = backend.sync.embed("tiny-a", ["once upon a time", "the time"])
    assert len(result.vectors) == 2 and {len(v) for v in result.vectors} == {64}
    assert all(abs(sum(x * x for x in v) - 1.0) < 1e-6 for v in result.vectors)
    assert result.vectors[0] != result.vectors[1] and result.prompt_tokens > 2
    assert backend.sync.embed("tiny-a", "once upon a time").vectors[0] == result.vectors[0]


@pytest.mark.parametrize("inputs, fragment", [
    ([], "non-empty list"), ([1, 2], "list of strings"), ([""], "input[0] is empty"),
    (["time " * 3000], "embedding context holds"),
])
def test_bad_embedding_input_is_a_clear_error(backend: LocalBackend, inputs: object, fragment: str) -> None:
    with pytest.raises(BadRequest, match=re.escape(fragment)):
        backend.sync.embed("tiny-a", inputs)  # type: ignore[arg-type]
    assert backend.sync.embed("tiny-a", "still works").vectors


async def test_embeddings_run_beside_generation(backend: LocalBackend) -> None:
    async def generate() -> str:
        return "".join([c.text async for c in backend.complete("tiny-a", "Once upon a time", max_tokens=50,
                                                                temperature=0.0, ignore_eos=True)])

    text, vectors = await asyncio.gather(generate(), backend.embed("tiny-a", ["a", "b", "c"]))
    assert text and len(vectors.vectors) == 3


@pytest.mark.parametrize("options, fragment", [
    ({"max_tokens": "10"}, "max_tokens = '10': must be an integer"),
    ({"max_tokens": 2.5}, "max_tokens = 2.5: must be an integer"),
    ({"temperature": "hot"}, "temperature = 'hot': must be a number"),
    ({"seed": "42"}, "seed = '42': must be an integer"),
    ({"top_k": 2.5}, "top_k = 2.5: must be an integer"),
    ({"ignore_eos": "no"}, "ignore_eos = 'no': must be true or false"),
    ({"stop": 5}, "stop = 5: must be a string or a list of strings"),
    ({"keep_alive": "soon"}, "keep_alive = 'soon'"),
])
def test_wrong_option_types_are_bad_requests(backend: LocalBackend, options: dict, fragment: str) -> None:
    with pytest.raises(BadRequest, match=re.escape(fragment)):
        backend.sync.text("tiny-a", "hi", **options)


def test_none_means_default_and_durations_are_accepted(backend: LocalBackend) -> None:
    assert backend.sync.text("tiny-a", "hi", max_tokens=2, stop=None, seed=None, min_p=None, ignore_eos=True,
                             keep_alive="5m")
    assert backend.sync.models()[0].keep_alive_s == 300.0


def test_load_with_keep_alive(backend: LocalBackend) -> None:
    """As a request's keep_alive: "10m" keeps the model 600 s once idle, 0 unloads it at once."""
    kept = backend.sync.load("tiny-a", keep_alive="10m")
    assert kept.keep_alive_s == 600 and kept.ttl_left_s is not None and kept.ttl_left_s > 590
    backend.sync.load("tiny-b", keep_alive=0)
    wait_for(lambda: {m.name: m.state for m in backend.sync.models()}["tiny-b"] == "available",
             what="tiny-b to unload")
    assert {m.name: m.state for m in backend.sync.models()}["tiny-a"] == "ready"


def test_bad_messages_are_refused_before_any_load(backend: LocalBackend) -> None:
    with pytest.raises(BadRequest):
        list(backend.sync.chat("tiny-c", [{"role": "wizard", "content": "hi"}]))
    with pytest.raises(BadRequest, match="prompt must be a string"):
        backend.sync.text("tiny-c", None)  # type: ignore[arg-type]
    with pytest.raises(BadRequest, match="Undefined rule identifier 'nowhere'"):
        backend.sync.text("tiny-c", "hi", grammar='root ::= "a" | nowhere')
    with pytest.raises(BadRequest, match="keyword 'multipleOf'"):
        backend.sync.text("tiny-c", "hi", response_format={"type": "json_schema", "json_schema": {
            "schema": {"type": "integer", "multipleOf": 2}}})
    assert {m.name: m.state for m in backend.sync.models()}["tiny-c"] == "available"


async def test_cancelled_requests_never_leave_a_model_busy(backend: LocalBackend) -> None:
    """Cancel at every point of a request's start: every lease must come back."""
    await backend.load("tiny-a")

    async def one() -> None:
        async for _ in backend.complete("tiny-a", "Once upon a time", max_tokens=4, ignore_eos=True):
            pass

    for i in range(60):
        task = asyncio.create_task(one())
        await asyncio.sleep((i % 6) * 0.0005)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def idle() -> None:
        while (await backend.models())[0].in_flight:
            await asyncio.sleep(0.01)

    await asyncio.wait_for(idle(), 5)
    assert (await backend.models())[0].state == "ready"


MISTRAL_TEMPLATE = (
    "{%- if tools %}[AVAILABLE_TOOLS]{{ tools | tojson }}[/AVAILABLE_TOOLS]{% endif %}"
    "{%- for m in messages %}{%- if m.tool_calls is defined %}[TOOL_CALLS]{{ m.tool_calls | tojson }}"
    "{%- else %}[INST]{{ m.content }}[/INST]{%- endif %}{%- endfor %}"
)


def test_a_mistral_template_gets_mistral_tool_calls(tmp_path: Path) -> None:
    """A template that writes [TOOL_CALLS] makes the answer a Mistral call list: held to its
    grammar, parsed back into a call with a 9-character id (the vocabulary holds the marker as
    a control token, as Mistral's does; test_engine checks that such a token keeps its text)."""
    write_tiny_llama(tmp_path / "m" / "mistralish.gguf", name="mistralish", chat_template=MISTRAL_TEMPLATE,
                     control_tokens=("[TOOL_CALLS]",))
    settings = tiny_settings(tmp_path / "m", defaults={"n_ctx": 2048, "n_parallel": 1, "n_threads": 1})
    tool = {"type": "function", "function": {"name": "pick", "parameters": {
        "type": "object", "properties": {"n": {"type": "integer", "minimum": 1, "maximum": 9}}, "required": ["n"]}}}
    with LocalBackend(settings_from_dict(settings)) as local:
        chunks = list(local.sync.chat("mistralish", [{"role": "user", "content": "pick"}], tools=[tool],
                                      tool_choice="required", parallel_tool_calls=False, max_tokens=600,
                                      temperature=0.0))
    calls = [delta for chunk in chunks for delta in chunk.tool_calls]
    assert chunks[-1].finish_reason == "tool_calls", "".join(c.text for c in chunks)
    assert [c.name for c in calls if c.name] == ["pick"] and "[TOOL_CALLS]" not in "".join(c.text for c in chunks)
    assert re.fullmatch(r"[A-Za-z0-9]{9}", calls[0].id or "")  # Mistral's templates refuse other ids
    assert 1 <= json.loads("".join(c.arguments for c in calls))["n"] <= 9
