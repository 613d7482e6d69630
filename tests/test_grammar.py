"""Grammar-held sequences and log-probabilities in the engine, on tiny random-weight GGUFs.

The tiny vocabulary (tests/ggufs.py) has all 256 byte tokens besides its characters and word
pieces, so any ASCII text can be spelled and a grammar over ASCII can always be satisfied. The
weights are random: left free, the model writes noise, which is what makes a held output that
still parses a test of the grammar and not of the model.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from typing import Any

import numpy as np
import pytest

from corral.backend.engine import Engine
from corral.backend.errors import BadRequest
from corral.backend.generation import Chunk, Decoding, Grammar, SamplingParams, TokenLogprob
from reference import reference_steps

PROMPTS = ["Once upon a time", "the time", "a upon once", "time time the a"]

JSON_OBJECT = r'''
root ::= "{" ws "\"a\"" ws ":" ws num ws "," ws "\"b\"" ws ":" ws str ws "}"
num  ::= "-"? [0-9] [0-9]? [0-9]? [0-9]?
str  ::= "\"" [a-z ]? [a-z ]? [a-z ]? [a-z ]? [a-z ]? [a-z ]? [a-z ]? [a-z ]? "\""
ws   ::= " "?
'''
CHOICE = 'root ::= "yes" | "no"'
SAMPLED = {"temperature": 1.5, "top_k": 0, "top_p": 1.0, "min_p": 0.0}


async def run(engine: Engine, prompt: str, grammar: Grammar | None = None, *, logprobs: bool = False,
              top_logprobs: int = 0, **params: Any) -> tuple[str, list[Chunk]]:
    """Greedy unless told otherwise; returns the text and every chunk."""
    tokens = engine.weights.tokenize(prompt, add_special=True)
    sampling = SamplingParams(**{"temperature": 0.0, "max_tokens": 64, **params})
    chunks = [c async for c in engine.stream(tokens, Decoding(sampling, grammar, logprobs, top_logprobs))]
    assert chunks[-1].finish_reason is not None
    return "".join(c.text for c in chunks), chunks


def runs(n: int) -> list[tuple[str, dict[str, Any]]]:
    """`n` prompt and sampling variations: greedy on each prompt, then seeded draws."""
    variants = [(p, {}) for p in PROMPTS]
    variants += [(PROMPTS[i % len(PROMPTS)], {**SAMPLED, "seed": i}) for i in range(n - len(variants))]
    return variants


async def test_every_output_of_a_json_object_grammar_parses(engine_factory: Any) -> None:
    engine = engine_factory(n_ctx=512)
    grammar = Grammar(JSON_OBJECT)
    results = await asyncio.gather(*[run(engine, p, grammar, **params) for p, params in runs(16)])
    for text, chunks in results:
        assert chunks[-1].finish_reason == "stop", text
        value = json.loads(text)
        assert list(value) == ["a", "b"] and isinstance(value["a"], int) and isinstance(value["b"], str)
    assert len({text for text, _ in results}) > 4  # the sampled runs really differ
    stats = engine.grammar_stats
    assert stats.checked > 0 and stats.rejected > 0  # noise is refused, and then resolved
    assert stats.rejected == sum(stats.resolved)


async def test_a_choice_grammar_gives_one_of_its_choices(engine_factory: Any) -> None:
    engine = engine_factory(n_ctx=512)
    results = await asyncio.gather(*[run(engine, p, Grammar(CHOICE), **params) for p, params in runs(12)])
    assert {text for text, _ in results} <= {"yes", "no"}
    assert all(chunks[-1].finish_reason == "stop" for _, chunks in results)


async def test_a_complete_grammar_ends_the_answer_even_with_ignore_eos(engine_factory: Any) -> None:
    """Once the grammar's text is complete only end-of-generation is allowed: ignore_eos must
    not turn that into an endless run of end-of-generation tokens."""
    engine = engine_factory(n_ctx=512)
    text, chunks = await run(engine, PROMPTS[0], Grammar(CHOICE), ignore_eos=True, max_tokens=200)
    assert text in ("yes", "no") and chunks[-1].finish_reason == "stop"
    assert chunks[-1].stats is not None and chunks[-1].stats.completion_tokens <= 4


async def test_a_repeat_penalty_chain_is_held_too(engine_factory: Any) -> None:
    engine = engine_factory(n_ctx=512)
    for params in ({"repeat_penalty": 1.3}, {**SAMPLED, "seed": 5, "repeat_penalty": 1.3}):
        text, chunks = await run(engine, PROMPTS[1], Grammar(JSON_OBJECT), **params)
        assert chunks[-1].finish_reason == "stop" and json.loads(text)


@pytest.mark.parametrize("form", ["({})", r"[\s\S]*?({})[\s\S]*"])  # plain, and llama.cpp's idiom
async def test_a_lazy_grammar_leaves_output_free_until_its_trigger_matches(engine_factory: Any, form: str) -> None:
    engine = engine_factory(n_ctx=512)
    free, _ = await run(engine, PROMPTS[0], max_tokens=40, ignore_eos=True)
    # a trigger from the middle of the free output: three letters that start a word
    start = next(i for i in range(8, len(free) - 3)
                 if free[i - 1] == " " and free[i:i + 3].isalpha() and free.find(free[i:i + 3]) == i)
    trigger = free[start:start + 3]
    held = Grammar(f'root ::= "{trigger}" [a-zA-Z ]{{0,12}} "#" [0-9] [0-9]', triggers=(form.format(trigger),))
    text, chunks = await run(engine, PROMPTS[0], held, max_tokens=60, ignore_eos=True)
    assert text[:start] == free[:start]  # free until the trigger
    assert re.fullmatch(rf"{trigger}[a-zA-Z ]{{0,12}}#[0-9][0-9]", text[start:]), text
    assert "#" not in free and chunks[-1].finish_reason == "stop"


async def test_output_after_a_trigger_that_the_grammar_refuses_ends_only_that_request(
        engine_factory: Any) -> None:
    engine = engine_factory(n_ctx=512)
    free, _ = await run(engine, PROMPTS[0], max_tokens=24, ignore_eos=True)
    word = re.findall(r"[A-Za-z]{2,}", free)[1]
    refusing = Grammar('root ::= "#"', triggers=(re.escape(word),))
    _, chunks = await run(engine, PROMPTS[0], refusing, max_tokens=24, ignore_eos=True)
    assert chunks[-1].finish_reason == "error"
    assert "does not fit" in (chunks[-1].error or "")
    again, _ = await run(engine, PROMPTS[0], max_tokens=24, ignore_eos=True)
    assert again == free


async def test_a_grammar_that_allows_no_token_ends_with_an_error(engine_factory: Any) -> None:
    engine = engine_factory(n_ctx=512)
    _, chunks = await run(engine, PROMPTS[0], Grammar(r'root ::= "\x00"'))  # no token may hold a NUL
    assert chunks[-1].finish_reason == "error" and "no token" in (chunks[-1].error or "")
    assert (await run(engine, PROMPTS[1], max_tokens=4))[0]


async def test_unconstrained_outputs_are_the_same_beside_a_held_sequence(engine_factory: Any) -> None:
    """A grammar-held sequence shares the batch and the sampling pass; on f32 weights the
    others' greedy text must be exactly what each gives alone."""
    single = engine_factory(n_ctx=512, n_parallel=1)
    alone = [(await run(single, p, max_tokens=32, ignore_eos=True))[0] for p in PROMPTS[:3]]
    batched = engine_factory(n_ctx=512, n_parallel=5)
    together = await asyncio.gather(
        *[run(batched, p, max_tokens=32, ignore_eos=True) for p in PROMPTS[:3]],
        run(batched, PROMPTS[3], Grammar(JSON_OBJECT)),
        run(batched, PROMPTS[0], Grammar(JSON_OBJECT), seed=3, **SAMPLED),
    )
    assert [text for text, _ in together[:3]] == alone
    assert json.loads(together[3][0]) and json.loads(together[4][0])


@pytest.mark.parametrize("gbnf, root, reason", [
    ('root ::= "a" nope', "root", "Undefined rule identifier 'nope'"),
    ('root ::= "a"', "start", "does not contain a 'start' symbol"),
    ('root ::= [a-', "root", "unexpected end of input"),
    ("", "root", "empty"),
])
async def test_a_grammar_llama_cpp_cannot_parse_is_a_bad_request_with_its_reason(
        engine_factory: Any, gbnf: str, root: str, reason: str) -> None:
    engine = engine_factory(n_ctx=512)
    tokens = engine.weights.tokenize(PROMPTS[0], add_special=True)
    with pytest.raises(BadRequest, match=re.escape(reason)) as raised:
        engine.submit(tokens, Decoding(SamplingParams(), Grammar(gbnf, root)))  # before any chunk
    assert str(raised.value).startswith("grammar:")
    text, chunks = await run(engine, PROMPTS[0], Grammar(CHOICE))  # the engine still serves
    assert text in ("yes", "no")
    assert engine.load().queued == 0


async def test_a_trigger_that_is_not_a_regular_expression_is_a_bad_request(engine_factory: Any) -> None:
    engine = engine_factory(n_ctx=512)
    tokens = engine.weights.tokenize(PROMPTS[0], add_special=True)
    with pytest.raises(BadRequest, match="trigger"):
        engine.submit(tokens, Decoding(SamplingParams(), Grammar(CHOICE, triggers=("(unclosed",))))


def logprobs_of(chunks: list[Chunk]) -> list[TokenLogprob]:
    return [lp for chunk in chunks for lp in chunk.logprobs]


def log_softmax(row: np.ndarray) -> np.ndarray:
    wide = row.astype(np.float64)
    shifted = wide - wide.max()
    return shifted - np.log(np.exp(shifted).sum())


async def test_logprobs_match_a_log_softmax_of_the_reference_logits(engine_factory: Any, tiny_gguf: Any) -> None:
    engine = engine_factory(n_parallel=1, n_ctx=256)
    text, chunks = await run(engine, PROMPTS[0], logprobs=True, top_logprobs=5, max_tokens=16)
    expected, steps = reference_steps(str(tiny_gguf("engine")), PROMPTS[0], 16)
    assert text == expected
    got = logprobs_of(chunks)
    assert len(got) == len(steps) == chunks[-1].stats.completion_tokens
    for lp, (token, row) in zip(got, steps):
        reference = log_softmax(row)
        assert lp.logprob == pytest.approx(reference[token], abs=1e-5)
        assert lp.bytes == tuple(engine.weights.piece(token))
        assert lp.token == engine.weights.piece(token).decode("utf-8", "replace")
        assert len(lp.top) == 5
        assert [t.logprob for t in lp.top] == sorted((t.logprob for t in lp.top), reverse=True)
        best = np.sort(reference)[::-1][:5]
        assert [t.logprob for t in lp.top] == pytest.approx(list(best), abs=1e-5)
        assert lp.top[0].logprob == lp.logprob and lp.top[0].bytes == lp.bytes  # greedy: the top-1
        assert all(t.logprob <= 0 for t in lp.top) and sum(math.exp(t.logprob) for t in lp.top) <= 1 + 1e-9


async def test_a_token_whose_text_is_held_back_still_delivers_its_logprob(engine_factory: Any) -> None:
    """A possible stop-string prefix holds text back; its tokens' logprobs still come, one per
    token, and the final chunk carries the last token's."""
    engine = engine_factory(n_ctx=512)
    plain, plain_chunks = await run(engine, PROMPTS[0], max_tokens=20, ignore_eos=True)
    assert not logprobs_of(plain_chunks)  # nothing is computed for a request that did not ask
    stop = plain + "\x01"  # the whole output could grow into it: all text is held to the end
    text, chunks = await run(engine, PROMPTS[0], logprobs=True, max_tokens=20, ignore_eos=True, stop=(stop,))
    assert text == plain and chunks[-1].finish_reason == "length"
    assert len(logprobs_of(chunks)) == 20 and chunks[-1].logprobs
    assert any(not c.text and c.logprobs for c in chunks)
    assert all(lp.top == () for lp in logprobs_of(chunks))


async def test_sampled_logprobs_and_a_held_sequence_report_the_raw_distribution(engine_factory: Any) -> None:
    engine = engine_factory(n_ctx=512)
    _, chunks = await run(engine, PROMPTS[2], Grammar(JSON_OBJECT), logprobs=True, top_logprobs=3,
                          seed=11, **SAMPLED)
    got = logprobs_of(chunks)
    assert got and len(got) == chunks[-1].stats.completion_tokens - 1  # end-of-generation has none
    assert "".join(lp.token for lp in got) == "".join(c.text for c in chunks)
    assert all(lp.logprob <= 0 and lp.logprob <= lp.top[0].logprob for lp in got)
