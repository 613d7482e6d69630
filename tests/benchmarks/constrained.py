"""What does a grammar cost the batch? Plain streams against a mix with JSON-schema-held ones.

On the default model (262,144-token vocabulary) with 8 slots and 2 threads, two runs of 8
concurrent greedy clients that each receive 64 tokens:

- `plain`: no grammar (ignore_eos, so every stream is 64 tokens long);
- `mixed`: the same 4 plain clients beside 4 whose requests are held to a JSON schema. A held
  answer ends when its JSON is complete, so those clients submit again (the same prompt, whose
  prefix the slot still caches) until they have their 64 tokens: 8 sequences stay in the batch
  all along, and the difference between the runs is what the grammar costs, not a smaller batch.

For each: the aggregate tok/s (tokens received / wall time from the first submit to the last
token) and the wall time of the engine's sampling pass per step, where all grammar work
happens; medians of the passes, which alternate which run goes first. The ratio mixed/plain is
the figure to watch (target: within 15 %); on a shared 2-core machine other work moves the
decodes far more than a grammar does, so read it with the sampling times and the load average
it prints. The grammar counters say how often the sample-first check refused a token and which
tier then found one (samplers.py): the 64 or 4,096 most likely tokens, or the whole vocabulary.

    .venv/bin/python -m tests.benchmarks.constrained [--passes 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from dataclasses import asdict
from typing import Any

from corral.backend.catalog import default_model_path
from corral.backend.engine import ContextSettings, Engine
from corral.backend.generation import Decoding, Grammar, SamplingParams
from corral.backend.samplers import TIERS, GrammarStats
from corral.backend.schema_grammar import schema_grammar
from corral.backend.weights import ModelWeights

TOKENS = 64
STREAMS = 8
SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                   "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3}},
    "required": ["name", "age", "tags"],
}
PLAIN_PROMPT = "{}: Once upon a time"
HELD_PROMPT = "Record {} of the customer list, as JSON:\n"


async def client(engine: Engine, prompt: str, grammar: Grammar | None, outputs: list[str]) -> int:
    """Receive TOKENS tokens, submitting again whenever a held answer ends early."""
    tokens = engine.weights.tokenize(prompt, add_special=True)
    received = 0
    while received < TOKENS:
        params = SamplingParams(temperature=0.0, max_tokens=TOKENS - received, ignore_eos=True)
        text = ""
        async for chunk in engine.stream(tokens, Decoding(params, grammar)):
            text += chunk.text
            if chunk.stats is not None:
                received += chunk.stats.completion_tokens
        outputs.append(text)
    return received


class SamplingClock:
    """Wall time of the engine's sampling pass (Engine._sample), where all grammar work happens,
    so that its cost shows apart from the decodes, which other load on a small machine moves
    far more than any grammar does."""

    def __init__(self) -> None:
        self.seconds, self.steps = 0.0, 0
        original = Engine._sample

        def timed(engine: Engine, *args: Any) -> None:
            start = time.perf_counter()
            original(engine, *args)
            self.seconds += time.perf_counter() - start
            self.steps += 1

        Engine._sample = timed  # type: ignore[method-assign]

    def reset(self) -> None:
        self.seconds, self.steps = 0.0, 0

    @property
    def ms_per_step(self) -> float:
        return 1e3 * self.seconds / max(self.steps, 1)


async def one_run(engine: Engine, held: int, grammar: Grammar, clock: SamplingClock,
                  outputs: list[str]) -> tuple[float, float]:
    """Aggregate tok/s and sampling ms per step of one run with `held` grammar clients."""
    clock.reset()
    start = time.perf_counter()
    counts = await asyncio.gather(*[
        client(engine, HELD_PROMPT.format(i) if i < held else PLAIN_PROMPT.format(i),
               grammar if i < held else None, outputs if i < held else [])
        for i in range(STREAMS)])
    return sum(counts) / (time.perf_counter() - start), clock.ms_per_step


async def main_async(passes: int, threads: int) -> None:
    clock = SamplingClock()
    weights = ModelWeights(str(default_model_path()))
    engine = Engine(weights, ContextSettings(n_ctx=4096, n_parallel=STREAMS, n_threads=threads),
                    model_name="constrained")
    weights.release()
    await asyncio.to_thread(engine.start)
    grammar = schema_grammar(SCHEMA)
    runs: dict[str, list[tuple[float, float]]] = {"plain": [], "mixed": []}
    answers: list[str] = []
    load = os.getloadavg()[0]
    try:
        await one_run(engine, STREAMS // 2, grammar, clock, [])  # warm: first requests, page faults
        before = asdict(engine.grammar_stats)
        for i in range(passes):  # alternate which goes first, so drift favours neither
            for name in ("plain", "mixed") if i % 2 == 0 else ("mixed", "plain"):
                held = STREAMS // 2 if name == "mixed" else 0
                runs[name].append(await one_run(engine, held, grammar, clock, answers))
        after = asdict(engine.grammar_stats)
    finally:
        engine.close()
    stats = GrammarStats(after["checked"] - before["checked"], after["rejected"] - before["rejected"],
                         [a - b for a, b in zip(after["resolved"], before["resolved"])])
    rates = {name: [rate for rate, _ in r] for name, r in runs.items()}
    print(f"{STREAMS} clients x {TOKENS} greedy tokens, {threads} threads, {passes} passes; load average "
          f"{load:.2f} before, {os.getloadavg()[0]:.2f} after (other work on the machine moves tok/s)")
    print(f"{'run':>6} {'tok/s':>8} {'sampling ms/step':>17}   per pass tok/s")
    for name, r in runs.items():
        print(f"{name:>6} {statistics.median(rates[name]):>8.1f} {statistics.median(ms for _, ms in r):>17.2f}   "
              f"{', '.join(f'{x:.1f}' for x in rates[name])}")
    pairwise = statistics.median(m / p for m, p in zip(rates["mixed"], rates["plain"]))
    print(f"mixed/plain {statistics.median(rates['mixed']) / statistics.median(rates['plain']):.3f} "
          f"(median of pairs {pairwise:.3f}; target >= 0.85)")
    rejected = stats.rejected / stats.checked if stats.checked else 0.0
    tiers = ", ".join(f"top {k}: {n}" for k, n in zip(TIERS, stats.resolved))
    print(f"held tokens {stats.checked}: first pick refused {stats.rejected} ({rejected:.1%}); "
          f"resolved in the {tiers}, whole vocabulary: {stats.resolved[-1]}")
    complete = [a for a in answers if _parses(a)]
    print(f"held answers {len(answers)}: {len(complete)} complete JSON objects "
          f"(the rest were cut by their client's 64-token budget); e.g. {answers[0][:120]!r}")


def _parses(text: str) -> bool:
    try:
        value = json.loads(text)
    except ValueError:
        return False
    return isinstance(value, dict) and set(value) == set(SCHEMA["properties"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    asyncio.run(main_async(args.passes, args.threads))


if __name__ == "__main__":
    main()
