"""The engine against real llama.cpp on tiny random-weight GGUFs."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from corral.backend.embedder import Embedder
from corral.backend.memory import EmbeddingShape
from corral.backend.engine import ContextSettings, Engine
from corral.backend.sequence import Queued, Sequence
from corral.backend.errors import BadRequest, LoadFailed, QueueFull
from corral.backend.events import EventBus, RequestFinished, RequestStarted
from corral.backend.generation import Chunk, Decoding, SamplingParams
from corral.backend.weights import ModelWeights
from ggufs import RERANKER, write_unknown_arch
from reference import greedy_reference, llama_cpp_pooled, llama_cpp_rank_scores

PROMPTS = ["Once upon a time", "the time", "a upon once", "time time the a"]


async def run(engine: Engine, prompt: str | list[int], **params: Any) -> tuple[str, Chunk]:
    """Greedy unless told otherwise; `prompt` is text, or tokens to send as they are."""
    tokens = engine.weights.tokenize(prompt, add_special=True) if isinstance(prompt, str) else prompt
    text, last = "", None
    async for chunk in engine.stream(tokens, Decoding(SamplingParams(**{"temperature": 0.0, **params}))):
        text += chunk.text
        last = chunk
    assert last is not None and last.finish_reason is not None
    return text, last


async def test_greedy_matches_the_reference_loop(engine_factory: Any, tiny_gguf: Any) -> None:
    engine = engine_factory(n_parallel=1)
    text, last = await run(engine, "Once upon a time", max_tokens=24)
    expected = greedy_reference(str(tiny_gguf("engine")), "Once upon a time", 24)
    assert text == expected and len(text) > 0
    assert last.finish_reason in ("length", "stop")


async def test_batched_greedy_equals_single_sequence_output(engine_factory: Any) -> None:
    """On f32 weights batching must not change greedy text (DESIGN: determinism, honestly)."""
    single = engine_factory(n_parallel=1)
    alone = [(await run(single, p, max_tokens=32))[0] for p in PROMPTS]
    batched = engine_factory(n_parallel=4)
    together = await asyncio.gather(*[run(batched, p, max_tokens=32) for p in PROMPTS])
    assert [t for t, _ in together] == alone
    assert len(set(alone)) > 1  # the prompts really differ


async def test_max_tokens_and_stats(engine_factory: Any) -> None:
    engine = engine_factory()
    text, last = await run(engine, "Once upon a time", max_tokens=7, ignore_eos=True)
    stats = last.stats
    assert last.finish_reason == "length" and stats is not None
    assert stats.completion_tokens == 7 and stats.prompt_tokens == 5
    assert stats.ttft_s is not None and 0 <= stats.queue_wait_s <= stats.ttft_s <= stats.duration_s


async def test_stop_string_cuts_output_even_across_tokens(engine_factory: Any) -> None:
    engine = engine_factory()
    full, _ = await run(engine, "Once upon a time", max_tokens=40, ignore_eos=True)
    assert len(full) > 12
    stop = full[5:9]  # four characters that most likely span a token boundary
    cut, last = await run(engine, "Once upon a time", max_tokens=40, ignore_eos=True, stop=(stop,))
    assert last.finish_reason == "stop"
    assert cut == full[:full.index(stop)]


async def test_seeded_sampling_is_reproducible(engine_factory: Any) -> None:
    engine = engine_factory()
    sampled = [(await run(engine, "Once upon a time", max_tokens=24, temperature=1.5, top_k=0, top_p=1.0,
                          min_p=0.0, seed=seed, ignore_eos=True))[0] for seed in (7, 7, 8)]
    assert sampled[0] == sampled[1]
    assert sampled[0] != sampled[2]


async def test_cancel_frees_the_sequence_at_the_next_step(engine_factory: Any) -> None:
    bus = EventBus()
    finished: list[RequestFinished] = []

    async def record() -> None:
        async for event in bus.subscribe():
            if isinstance(event, RequestFinished):
                finished.append(event)

    recorder = asyncio.create_task(record())
    engine = engine_factory(n_ctx=4096, n_parallel=2, bus=bus, context_length=4096)
    tokens = engine.weights.tokenize("Once upon a time", add_special=True)
    stream = engine.stream(tokens, Decoding(SamplingParams(temperature=0.0, max_tokens=4000, ignore_eos=True)))
    async for chunk in stream:
        assert chunk.finish_reason is None
        break
    await stream.aclose()

    async def freed() -> None:
        while engine.load().active or not finished:
            await asyncio.sleep(0.005)

    await asyncio.wait_for(freed(), 5)
    assert finished[0].finish_reason == "cancelled" and finished[0].completion_tokens < 4000
    text, _ = await run(engine, "the time", max_tokens=4)  # the slot serves the next request
    assert text
    recorder.cancel()


async def test_context_exhaustion_ends_the_longest_sequence_not_the_process(engine_factory: Any) -> None:
    engine = engine_factory(n_ctx=256, n_parallel=2)
    results = await asyncio.gather(*[run(engine, p, max_tokens=240, ignore_eos=True) for p in PROMPTS[:2]])
    assert [last.finish_reason for _, last in results] == ["length", "length"]
    generated = sorted(last.stats.completion_tokens for _, last in results)
    # 2 x (prompt + 240) cannot fit in 256 cells: the longer one is ended when the cache is
    # full, and the other then finishes in the freed cells.
    assert generated[0] < 240 and generated[1] == 240


async def test_prompt_longer_than_context_is_a_clear_error(engine_factory: Any) -> None:
    engine = engine_factory(n_ctx=256)
    with pytest.raises(BadRequest, match=r"prompt is \d+ tokens but the context holds 256"):
        await run(engine, "once upon a time " * 80)


@pytest.mark.parametrize("params, fragment", [
    ({"max_tokens": 0}, "max_tokens"), ({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"),
    ({"min_p": 2}, "min_p"), ({"repeat_penalty": 0}, "repeat_penalty"), ({"stop": ("",)}, "stop"),
])
async def test_bad_sampling_parameters_are_rejected(engine_factory: Any, params: dict, fragment: str) -> None:
    engine = engine_factory()
    with pytest.raises(BadRequest, match=fragment):
        await run(engine, "Once", **params)
    assert (await run(engine, "Once", max_tokens=2))[0] is not None  # still serving


def test_llama_cpp_failure_reason_reaches_the_exception(tmp_path: Path) -> None:
    path = write_unknown_arch(tmp_path / "odd.gguf")
    with pytest.raises(LoadFailed, match="unknown model architecture: 'notanarch'"):
        ModelWeights(str(path))


def test_llama_cpp_never_writes_to_the_terminal(tiny_gguf: Any, tmp_path: Path) -> None:
    """llama.cpp logs from C; check the real file descriptors of a fresh process. Its GBNF
    parser prints its complaint with fprintf(stderr): a bad grammar must not reach them either."""
    bad = write_unknown_arch(tmp_path / "odd.gguf")
    code = f"""
import asyncio
from corral.backend.engine import ContextSettings, Engine
from corral.backend.errors import BadRequest, LoadFailed
from corral.backend.generation import Decoding, Grammar, SamplingParams
from corral.backend.weights import ModelWeights, batch_add
w = ModelWeights({str(tiny_gguf("quiet"))!r})
e = Engine(w, ContextSettings(n_ctx=128, n_parallel=1, n_threads=1), model_name="q")
e.start()
async def go():
    tokens = w.tokenize("hi", add_special=True)
    try:
        e.submit(tokens, Decoding(SamplingParams(), Grammar('root ::= "a" undefined')))
    except BadRequest:
        pass
    return [c async for c in e.stream(tokens, Decoding(SamplingParams(max_tokens=4)))]
asyncio.run(go())
e.close(); w.release()
try:
    ModelWeights({str(bad)!r})
except LoadFailed:
    pass
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "" and done.stderr == ""


async def test_repeat_penalty_and_every_sampler_option_run(engine_factory: Any) -> None:
    engine = engine_factory()
    text, last = await run(engine, "Once upon a time", max_tokens=12, ignore_eos=True, repeat_penalty=1.3,
                           temperature=0.7, top_k=20, top_p=0.9, min_p=0.02, seed=3)
    assert text and last.finish_reason == "length"
    greedy_penalised, _ = await run(engine, "Once upon a time", max_tokens=12, ignore_eos=True,
                                    repeat_penalty=1.3)
    assert greedy_penalised  # greedy with a penalty goes through the sampler chain
    assert (await run(engine, "the time", max_tokens=3))[0] is not None  # the engine still serves


async def test_queue_is_bounded_even_with_free_slots(engine_factory: Any, tiny_gguf: Any) -> None:
    weights = ModelWeights(str(tiny_gguf("engine")))
    engine = Engine(weights, ContextSettings(n_ctx=256, n_parallel=2, n_threads=1, max_queue=2),
                    model_name="bounded")
    weights.release()  # not started: nothing is taken off the queue
    tokens = engine.weights.tokenize("Once", add_special=True)
    accepted = [engine.submit(tokens, Decoding(SamplingParams(max_tokens=1))) for _ in range(4)]  # 2 slots + 2 queued
    with pytest.raises(QueueFull):
        engine.submit(tokens, Decoding(SamplingParams(max_tokens=1)))
    assert engine.load().queued == len(accepted) == 4
    engine.close()


async def test_eight_concurrent_streams_all_complete_with_their_token_counts(engine_factory: Any) -> None:
    engine = engine_factory(n_ctx=1024, n_parallel=8)
    wanted = [3, 17, 5, 30, 11, 8, 24, 1]
    results = await asyncio.gather(*[run(engine, PROMPTS[i % 4], max_tokens=n, ignore_eos=True)
                                     for i, n in enumerate(wanted)])
    assert [last.finish_reason for _, last in results] == ["length"] * 8
    assert [last.stats.completion_tokens for _, last in results] == wanted


async def test_waiting_requests_start_in_arrival_order(engine_factory: Any) -> None:
    bus = EventBus()
    subscription = bus.subscribe()
    engine = engine_factory(n_parallel=1, bus=bus)
    ids = [f"r{i}" for i in range(6)]
    tokens = engine.weights.tokenize("Once upon a time", add_special=True)
    streams = [engine.stream(tokens, Decoding(SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)),
                             request_id=rid) for rid in ids]
    await asyncio.gather(*[_drain(s) for s in streams])  # tasks start, and submit, in creation order
    started = []
    async for event in subscription:
        if isinstance(event, RequestStarted):
            started.append(event.request_id)
        if len(started) == len(ids):
            break
    assert started == ids


async def _drain(stream: Any) -> None:
    async for _ in stream:
        pass


async def test_a_long_prompt_does_not_stall_running_streams(engine_factory: Any) -> None:
    """Prefill is chunked to n_batch: a running stream gets a token every step meanwhile."""
    engine = engine_factory(n_ctx=2048, n_parallel=2, n_batch=32, context_length=2048)
    long_prompt = engine.weights.tokenize("the time upon a " * 150, add_special=True)
    assert len(long_prompt) > 500
    arrivals: list[str] = []

    async def short() -> None:
        tokens = engine.weights.tokenize("Once upon a time", add_special=True)
        decoding = Decoding(SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True))
        async for chunk in engine.stream(tokens, decoding):
            arrivals.append("short")
            if len(arrivals) == 1:
                long_task.set_result(None)

    async def long() -> None:
        await long_task
        async for _ in engine.stream(long_prompt, Decoding(SamplingParams(temperature=0.0, max_tokens=1))):
            arrivals.append("long")
            return

    long_task: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    await asyncio.gather(short(), long())
    shorts_before_long = arrivals.index("long") - 1
    # ~17 prefill steps of 31 prompt tokens each; unchunked it would be one decode.
    assert shorts_before_long >= 10, arrivals[:40]


async def test_a_follow_up_prompt_reuses_the_cached_prefix(engine_factory: Any) -> None:
    engine = engine_factory(n_ctx=512, n_parallel=2)
    first = engine.weights.tokenize("Once upon a time the time upon a", add_special=True)
    _, last = await run(engine, first, max_tokens=6, ignore_eos=True)
    assert last.stats.cached_tokens == 0
    follow_up = first + engine.weights.tokenize(" a upon once time", add_special=False)
    text, last = await run(engine, follow_up, max_tokens=12, ignore_eos=True)
    assert last.stats.cached_tokens >= len(first)
    fresh = engine_factory(n_ctx=512, n_parallel=2)
    expected, cold = await run(fresh, follow_up, max_tokens=12, ignore_eos=True)
    assert cold.stats.cached_tokens == 0 and text == expected  # reuse does not change the answer
    again, last = await run(engine, follow_up, max_tokens=12, ignore_eos=True)
    assert again == expected and last.stats.cached_tokens == len(follow_up) - 1


async def test_an_unrelated_request_leaves_a_warm_prefix_alone(engine_factory: Any) -> None:
    engine = engine_factory(n_ctx=512, n_parallel=2)
    warm = engine.weights.tokenize("the time upon a " * 6, add_special=True)
    await run(engine, warm, max_tokens=2)
    await run(engine, "a upon once", max_tokens=2)  # takes the empty sequence, not the warm one
    _, last = await run(engine, warm + engine.weights.tokenize(" once", add_special=False), max_tokens=2)
    assert last.stats.cached_tokens >= len(warm)


async def test_a_full_cache_drops_idle_prefixes_before_ending_a_request(engine_factory: Any) -> None:
    engine = engine_factory(n_ctx=256, n_parallel=2)
    await run(engine, PROMPTS[0], max_tokens=120, ignore_eos=True)  # leaves ~125 cells cached
    _, last = await run(engine, PROMPTS[2], max_tokens=200, ignore_eos=True)  # needs ~205 more
    assert last.finish_reason == "length" and last.stats.completion_tokens == 200


async def test_no_kv_leak_after_1000_short_requests(engine_factory: Any) -> None:
    engine = engine_factory(n_ctx=512, n_parallel=4)
    words = ["Once", "upon", "a", "time", "the"]
    prompts = [" ".join(words[(i + j) % 5] for j in range(1 + i % 7)) for i in range(1000)]
    for wave in range(0, 1000, 20):
        await asyncio.gather(*[run(engine, p, max_tokens=1 + i % 6, ignore_eos=True)
                               for i, p in enumerate(prompts[wave:wave + 20])])
    load = engine.load()
    assert (load.active, load.queued) == (0, 0)
    cells = engine.kv_cells()
    assert all(ours == theirs for ours, theirs in cells.values()), cells  # bookkeeping == llama.cpp
    # What stays is at most one cached prompt + answer per sequence, ready for reuse.
    assert 0 < sum(ours for ours, _ in cells.values()) <= 4 * (10 + 6)


async def test_a_stop_token_ends_the_answer_like_end_of_generation(engine_factory: Any) -> None:
    """Chat requests stop at turn delimiters (ModelWeights.turn_tokens): the engine treats a
    request's stop tokens as it treats end-of-generation, and ignore_eos overrides both."""
    engine = engine_factory()
    tokens = engine.weights.tokenize("Once upon a time", add_special=True)
    every = frozenset(range(engine.weights.n_vocab))
    decoding = Decoding(SamplingParams(temperature=0.0, max_tokens=8), stop_tokens=every)
    chunks = [c async for c in engine.stream(tokens, decoding)]
    assert chunks[-1].finish_reason == "stop" and chunks[-1].stats.completion_tokens == 1
    assert "".join(c.text for c in chunks) == ""  # the delimiter itself is not part of the answer
    _, last = await run(engine, "Once upon a time", max_tokens=8, ignore_eos=True)
    assert last.stats.completion_tokens == 8


async def test_an_idle_scheduler_thread_ends_and_the_next_request_starts_one(
        engine_factory: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """An idle thread would keep its OpenMP team and slow other models' decodes (Engine._spawn)."""
    import threading

    from corral.backend import engine as engine_module

    monkeypatch.setattr(engine_module, "IDLE_EXIT_S", 0.05)
    engine = engine_factory()
    first, _ = await run(engine, "Once upon a time", max_tokens=6, ignore_eos=True)

    def scheduler_threads() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name.startswith(f"engine-{engine.model_name}-")]

    for _ in range(100):
        if not scheduler_threads():
            break
        await asyncio.sleep(0.02)
    assert not scheduler_threads()
    again, last = await run(engine, "Once upon a time", max_tokens=6, ignore_eos=True)
    assert again == first and last.stats.completion_tokens == 6


LONG_TEXT = " ".join(["the time once upon a"] * 24)


def embedder(tiny_gguf: Any, monkeypatch: pytest.MonkeyPatch, **budget_and_model: Any) -> Embedder:
    """An Embedder on a tiny model, with its logits budgets (LOGITS_BYTES, ...) overridden."""
    model = {k: v for k, v in budget_and_model.items() if not k.isupper()}
    for name, value in budget_and_model.items():
        if name.isupper():
            monkeypatch.setattr(EmbeddingShape, name, value)
    weights = ModelWeights(str(tiny_gguf("embed", context_length=512, **model)))
    try:
        return Embedder(weights, n_ctx=512, n_threads=1)
    finally:
        weights.release()


def test_embeddings_decoded_in_chunks_equal_one_pass(tiny_gguf: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The chunking that bounds the logits' memory must not change the vector: the per-token
    states summed over 16-token chunks are the states of one pass over the whole text."""
    whole = embedder(tiny_gguf, monkeypatch)
    chunked = embedder(tiny_gguf, monkeypatch, LOGITS_BYTES=1)
    try:
        assert (whole.chunk, chunked.chunk) == (512, EmbeddingShape.MIN_CHUNK)
        (a,), tokens = whole.embed([LONG_TEXT])
        (b,), _ = chunked.embed([LONG_TEXT])
        assert tokens > 4 * EmbeddingShape.MIN_CHUNK
        assert sum(x * y for x, y in zip(a, b)) > 0.99999
    finally:
        whole.close()
        chunked.close()


def test_an_encoder_reads_a_text_in_one_pass_and_refuses_more_than_its_budget(
        tiny_gguf: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Bidirectional attention needs the whole text in one ubatch, so an encoder's context is
    what its logits budget allows (here 100 tokens), and a longer input is a clear error."""
    weights = ModelWeights(str(tiny_gguf("embed", context_length=512, causal=False)))
    budget = 100 * 4 * weights.n_vocab
    weights.release()
    encoder = embedder(tiny_gguf, monkeypatch, causal=False, LOGITS_BYTES=1, ONE_PASS_LOGITS_BYTES=budget)
    try:
        assert encoder.n_ctx == encoder.chunk == 100
        (vector,), _ = encoder.embed(["once upon a time"])
        assert abs(sum(x * x for x in vector) - 1) < 1e-6
        with pytest.raises(BadRequest, match=r"input\[0\] is \d+ tokens but the embedding context holds 100"):
            encoder.embed([LONG_TEXT])
    finally:
        encoder.close()


def test_a_shown_control_token_keeps_its_text(tiny_gguf: Any) -> None:
    """A format's marker that the vocabulary holds as one control token (Mistral's
    [TOOL_CALLS], Llama's <|python_tag|>) renders as nothing by default; a sequence that names
    it in `shown_tokens` keeps its text, so the output parsers see the marker."""
    weights = ModelWeights(str(tiny_gguf("marker", control_tokens=("[TOOL_CALLS]",))))
    try:
        [marker] = weights.control_tokens(["[TOOL_CALLS]"])
        [letter] = weights.tokenize("x", add_special=False)[-1:]
        texts = {}
        for shown in (frozenset(), frozenset({marker})):
            decoding = Decoding(SamplingParams(max_tokens=8), shown_tokens=shown)
            request = Queued("r", None, [weights.bos], decoding, delivery=None, sampler=SimpleNamespace(held=False))
            sequence = Sequence(request, 0, weights, 64, 0)
            texts[bool(shown)] = sequence.add_token(marker)[0] + sequence.add_token(letter)[0]
        assert texts == {False: "x", True: "[TOOL_CALLS]x"}
    finally:
        weights.release()


@pytest.mark.parametrize(("pooling", "code"), [("cls", 2), ("last", 3), ("mean", 1)])
def test_embeddings_pool_as_the_gguf_declares(tiny_gguf: Any, monkeypatch: pytest.MonkeyPatch, pooling: str,
                                              code: int) -> None:
    chunked = embedder(tiny_gguf, monkeypatch, pooling=pooling, LOGITS_BYTES=1)  # in 16-token chunks
    try:
        assert chunked.pooling == pooling
        tokens = chunked.weights.tokenize(LONG_TEXT, add_special=True)
        (ours,), _ = chunked.embed([LONG_TEXT])
    finally:
        chunked.close()
    reference = llama_cpp_pooled(tiny_gguf("embed", context_length=512, pooling=pooling), tokens, code)
    assert sum(x * y for x, y in zip(ours, reference)) > 0.99999


def test_a_reranker_gguf_gives_no_embeddings_and_says_why(tiny_gguf: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    reranker = embedder(tiny_gguf, monkeypatch, **RERANKER)
    try:
        with pytest.raises(BadRequest, match=r"reranker .* POST /v1/rerank"):
            reranker.embed(["once upon a time"])
    finally:
        reranker.close()


def test_an_embedding_model_does_not_rerank(tiny_gguf: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    model = embedder(tiny_gguf, monkeypatch, pooling="mean")
    try:
        with pytest.raises(BadRequest, match="not a reranker"):
            model.rerank("a cat", ["the cat"])
    finally:
        model.close()


QUERY = "the little girl and her dog"
DOCUMENTS = ["a dog ran in the park with the girl", "the sun is red", LONG_TEXT, "hello"]


@pytest.mark.parametrize("template", [None, "<s>query: {query} document: {document}"])
def test_reranker_scores_are_llama_cpps_rank_pooling(tiny_gguf: Any, monkeypatch: pytest.MonkeyPatch,
                                                     template: str | None) -> None:
    """Each score is what llama.cpp's RANK pooling gives the pair's prompt in one pass, though
    the Embedder decodes it in 16-token chunks; the prompt is the GGUF's rerank template filled
    in, or BOS query document (this vocabulary adds no EOS or SEP), as llama-server builds it."""
    model = {**RERANKER, "rerank_template": template}
    reranker = embedder(tiny_gguf, monkeypatch, LOGITS_BYTES=1, **model)
    try:
        assert (reranker.pooling, reranker.chunk) == ("rank", EmbeddingShape.MIN_CHUNK)
        ours, tokens = reranker.rerank(QUERY, DOCUMENTS)
        tokenize = reranker.weights.tokenize
        if template is None:
            prompts = [[reranker.weights.bos] + tokenize(QUERY, add_special=False) + tokenize(d, add_special=False)
                       for d in DOCUMENTS]
        else:
            prompts = [tokenize(template.replace("{query}", QUERY).replace("{document}", d), add_special=False)
                       for d in DOCUMENTS]
    finally:
        reranker.close()
    assert tokens == sum(map(len, prompts)) and max(map(len, prompts)) > 4 * EmbeddingShape.MIN_CHUNK
    reference = llama_cpp_rank_scores(tiny_gguf("embed", context_length=512, **model), prompts)
    assert ours == pytest.approx(reference, abs=1e-4)  # chunks change the order of float sums, no more
    assert all(0 < score < 1 for score in ours)  # a Qwen3 reranker's softmax: P("yes")
    assert len(set(ours)) == len(ours)  # the documents' scores differ, so their order means something


def test_a_pair_longer_than_the_reranking_context_is_refused_with_its_index(
        tiny_gguf: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    reranker = embedder(tiny_gguf, monkeypatch, **RERANKER)
    try:
        with pytest.raises(BadRequest, match=r"documents\[1\] with the query is \d+ tokens but the reranking "
                                             r"context holds 512"):
            reranker.rerank(QUERY, ["short", LONG_TEXT * 5])
        with pytest.raises(BadRequest, match=r"query is \d+ tokens but the reranking context holds 512"):
            reranker.rerank(LONG_TEXT * 5, ["short"])
        with pytest.raises(BadRequest, match="query is empty"):
            reranker.rerank("  ", ["short"])
    finally:
        reranker.close()
