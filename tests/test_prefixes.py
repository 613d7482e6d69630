"""Prompt prefixes evaluated once: shared between sequences of a context (a common system prompt),
and kept across an eviction or a restart (`PrefixStore`). Each reuse must give the same greedy
tokens as a cold evaluation, on tiny f32 models, and saved state must never be restored into
another model file or context size.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from corral.backend.engine import ContextSettings, Engine
from corral.backend.generation import Decoding, SamplingParams
from corral.backend.kvstore import Prefix, PrefixStore, prefix_key
from corral.backend.slots import MIN_AWAIT, SlotCache, awaited_prefix
from corral.backend.stepcost import StepCosts
from corral.backend.weights import ModelWeights

SYSTEM = "the time upon a " * 8


def engine_on(path: Path, store: PrefixStore | None = None, n_ctx: int = 512, n_parallel: int = 3,
              n_batch: int = 512) -> Engine:
    weights = ModelWeights(str(path))
    engine = Engine(weights, ContextSettings(n_ctx=n_ctx, n_parallel=n_parallel, n_batch=n_batch, n_threads=1),
                    model_name="engine", prefixes=store)
    weights.release()
    engine.start()
    return engine


async def greedy(engine: Engine, tokens: list[int], max_tokens: int = 8) -> tuple[str, Any]:
    text, last = "", None
    async for chunk in engine.stream(tokens, Decoding(SamplingParams(temperature=0.0, max_tokens=max_tokens,
                                                                     ignore_eos=True))):
        text += chunk.text
        last = chunk
    assert last is not None and last.stats is not None
    return text, last.stats


def tokens(engine: Engine, text: str, first: bool = False) -> list[int]:
    return engine.weights.tokenize(text, add_special=first)


async def cold(path: Path, prompt: list[int], max_tokens: int = 8) -> str:
    engine = engine_on(path)
    try:
        return (await greedy(engine, prompt, max_tokens))[0]
    finally:
        engine.close()


# -- between sequences ----------------------------------------------------------------------------


def parking(on: bool) -> PrefixStore | None:
    """A store lets an engine park idle sequences' KV beside the cache; without one it keeps them."""
    return PrefixStore(ram=64 << 20, disk=0, directory=None) if on else None


@pytest.mark.parametrize("parked", [False, True], ids=["in-cache", "parked"])
async def test_a_running_sequences_prefix_is_shared_with_a_new_request(tiny_gguf: Any, parked: bool) -> None:
    path = tiny_gguf("engine")
    engine = engine_on(path, parking(parked))
    try:
        system = tokens(engine, SYSTEM, first=True)
        first, second = system + tokens(engine, " once upon"), system + tokens(engine, " a time time")
        stream = engine.stream(first, Decoding(SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True)))
        await anext(stream)  # the first request is past its prompt and still decoding
        text, stats = await greedy(engine, second)
        assert stats.cached_tokens >= len(system)  # evaluated once, for the first request
        rest = "".join([chunk.text async for chunk in stream])
    finally:
        engine.close()
    assert text == await cold(path, second)
    assert len(rest) > 0


@pytest.mark.parametrize("parked", [False, True], ids=["in-cache", "parked"])
async def test_a_free_conversation_is_kept_when_its_prefix_is_shared(tiny_gguf: Any, parked: bool) -> None:
    path = tiny_gguf("engine")
    engine = engine_on(path, parking(parked), n_batch=32)  # a prefill of 16 tokens or more parks idle ones
    try:
        system = tokens(engine, SYSTEM, first=True)
        chat = system + tokens(engine, " once upon")
        answer, _ = await greedy(engine, chat)
        other_prompt = system + tokens(engine, " a time time upon once a the" * 3)
        other_text, other = await greedy(engine, other_prompt)
        assert other.cached_tokens >= len(system)  # shared into another sequence ...
        held = [cells for cells, _ in engine.kv_cells().values() if cells]  # the last token has no KV yet
        assert held == [len(other_prompt) + 7] if parked else len(chat) + 7 in held  # ... and the conversation
        # it came from parked beside the cache, or left in it; parked KV is memory the budget counts
        assert (engine.parked_bytes() > 0) == parked
        follow_up = chat + tokens(engine, answer) + tokens(engine, " upon once")
        text, stats = await greedy(engine, follow_up)
        assert stats.cached_tokens >= len(chat)  # ... so the conversation it came from is still whole
    finally:
        engine.close()
    assert text == await cold(path, follow_up) and other_text == await cold(path, other_prompt)


async def test_clients_arriving_together_evaluate_their_common_prefix_once(tiny_gguf: Any) -> None:
    path = tiny_gguf("engine")
    engine = engine_on(path, n_batch=8)  # the first prompt takes many steps: the others arrive during them
    try:
        system = tokens(engine, SYSTEM * 5, first=True)
        assert len(system) >= MIN_AWAIT + 8
        prompts = [system + tokens(engine, tail) for tail in (" once upon", " a time time", " upon the a")]
        answers = await asyncio.gather(*(greedy(engine, prompt) for prompt in prompts))
    finally:
        engine.close()
    cached = sorted(stats.cached_tokens for _, stats in answers)
    assert cached[0] == 0 and cached[1] >= len(system) and cached[2] >= len(system)
    for prompt, (text, _) in zip(prompts, answers):
        assert text == await cold(path, prompt)


def test_only_a_prefix_still_to_be_evaluated_is_awaited() -> None:
    prompt = list(range(200))
    prefilling = {0: (list(range(150)) + [7] * 50, 20), 1: (list(range(100)), 0), 2: (list(range(190)), 180)}
    assert awaited_prefix(prompt, prefilling) == (0, 150)  # the longest that is still ahead
    assert awaited_prefix(prompt, {2: prefilling[2]}) is None  # nearly done: share what is there
    assert awaited_prefix(list(range(50)), prefilling) is None  # too short to wait for


def test_slot_choice_prefers_the_best_match_and_never_shares_recurrent_state() -> None:
    slots = SlotCache(3)
    prompt = list(range(100))
    slots.tokens[0], slots.tokens[1] = list(range(40)) + [999] * 30, list(range(90))
    slots.free.remove(1)  # running
    taken = slots.take(prompt)
    assert (taken.cached, taken.copy_from) == (90, 1) and taken.seq_id == 2  # the empty one, not 0
    plain = SlotCache(3, share=False)
    plain.tokens[0], plain.tokens[1] = list(range(40)), list(range(90))
    plain.free.remove(1)
    assert plain.take(prompt).copy_from is None


# -- across evictions and restarts ----------------------------------------------------------------


async def test_restored_state_gives_the_same_tokens_as_evaluating_again(tiny_gguf: Any, tmp_path: Path) -> None:
    path = tiny_gguf("engine")
    store = PrefixStore(ram=64 << 20, disk=64 << 20, directory=tmp_path / "kv")
    engine = engine_on(path, store)
    chat = tokens(engine, SYSTEM + " once upon a time", first=True)
    answer, _ = await greedy(engine, chat)
    follow_up = chat + tokens(engine, answer) + tokens(engine, " upon once")
    engine.close()  # an eviction: the conversation's KV goes to the store
    again = engine_on(path, store)
    try:
        assert again.restored >= len(chat)
        text, stats = await greedy(again, follow_up)
    finally:
        again.close()
    assert stats.cached_tokens >= len(chat)
    assert text == await cold(path, follow_up)
    # a restart: a new store reads what the last one wrote
    restarted = engine_on(path, PrefixStore(ram=64 << 20, disk=64 << 20, directory=tmp_path / "kv"))
    try:
        assert restarted.restored >= len(chat)
        assert (await greedy(restarted, follow_up))[0] == text
    finally:
        restarted.close()


async def test_state_is_refused_after_the_file_or_the_context_changes(tiny_gguf: Any, tmp_path: Path) -> None:
    path = tmp_path / "model.gguf"
    shutil.copy(tiny_gguf("engine"), path)
    store = PrefixStore(ram=64 << 20, disk=0, directory=None)
    engine = engine_on(path, store)
    await greedy(engine, tokens(engine, SYSTEM, first=True))
    engine.close()
    other_context = engine_on(path, store, n_ctx=1024)
    assert other_context.restored == 0
    other_context.close()
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # the file was replaced
    changed = engine_on(path, store)
    assert changed.restored == 0
    changed.close()
    f16 = prefix_key(str(path), n_ctx=512, flash_attn=True)
    assert prefix_key(str(path), n_ctx=512, flash_attn=True, kv_types=("q8_0", "q8_0")) != f16  # other KV types


def test_the_store_keeps_to_its_budgets(tmp_path: Path) -> None:
    recent, older = Prefix((1, 2, 3), b"r" * 600), Prefix((4, 5, 6), b"o" * 600)
    store = PrefixStore(ram=1000, disk=1000, directory=tmp_path)
    store.save("a", [recent, older])
    assert store.load("a") == [recent]  # the most recent that fit
    store.save("b", [older])
    assert store.load("a") == [] and store.load("b") == [older]  # memory and disk: the older key went
    assert [p.name for p in tmp_path.glob("*.kv")] == ["b.kv"] and (tmp_path / "b.kv").stat().st_size <= 1000
    assert PrefixStore(ram=0, disk=1000, directory=tmp_path).load("b") == [older]
    nothing = PrefixStore(ram=0, disk=0, directory=tmp_path / "none")
    nothing.save("a", [recent])
    assert nothing.load("a") == [] and not (tmp_path / "none").exists()
    (tmp_path / "b.kv").write_bytes(b"garbage")
    assert PrefixStore(ram=0, disk=1000, directory=tmp_path).load("b") == []  # a broken file is ignored


# -- when prompts finish ---------------------------------------------------------------------------


def test_step_costs_say_when_prompts_should_finish_one_after_another() -> None:
    costs = StepCosts()
    assert costs.prompt_group(512) == 512  # nothing measured: everything fits in one step
    costs.record(0.020, 0)  # a step with no prompt tokens: the fixed part
    costs.record(0.020 + 64 * 0.002, 64)  # 2 ms a prompt token
    assert costs.prompt_group(512) == 10  # 20 ms buys 10 prompt tokens
    costs.record(0.020 + 4 * 0.5, 4)  # too few tokens to say anything
    assert costs.prompt_group(512) == 10
    costs.per_token = 1e-6
    assert costs.prompt_group(512) == 512  # never more than a batch


async def test_prompts_finished_in_turn_give_the_same_tokens(tiny_gguf: Any) -> None:
    path = tiny_gguf("engine")
    engine = engine_on(path)
    engine._costs.fixed, engine._costs.per_token = 0.001, 1.0  # one prompt token per step's worth
    try:
        prompts = [tokens(engine, tail, first=True) for tail in (SYSTEM, " once upon" * 9, " a time time" * 7)]
        answers = await asyncio.gather(*(greedy(engine, prompt) for prompt in prompts))
    finally:
        engine.close()
    for prompt, (text, _) in zip(prompts, answers):
        assert text == await cold(path, prompt)
