"""Does the default model loop? Repeated sentences in completions of a few prompts, sampled
plainly at the console's temperature and with the loop guard (generation.LOOP_GUARD).

    .venv/bin/python -m tests.benchmarks.sampling_loops [--seeds 1,2,3] [--tokens 200]

Every prompt with every seed runs once per setting, all of one setting in one burst (the
engine batches them); ignore_eos keeps each to exactly --tokens tokens. The table gives, per
setting, the repeated sentences in all answers, the answers with 3 or more, and the worst.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the text checks

from coherence import repeated_sentences  # noqa: E402
from corral.backend.catalog import DEFAULT_MODEL_NAME  # noqa: E402
from corral.backend.config import settings_from_dict  # noqa: E402
from corral.backend.generation import LOOP_GUARD  # noqa: E402
from corral.backend.local import LocalBackend  # noqa: E402

PROMPTS = ("While I was looking for a place", "Once upon a time", "The history of the city",
           "My favourite recipe is", "Tell me a story", "The weather today")
SETTINGS: dict[str, dict[str, Any]] = {"plain": {"temperature": 0.7},
                                       "loop guard": {"temperature": 0.7, **LOOP_GUARD}}


async def burst(backend: LocalBackend, options: dict[str, Any], seeds: list[int], tokens: int) -> list[int]:
    async def one(prompt: str, seed: int) -> int:
        text = ""
        async for chunk in backend.complete(DEFAULT_MODEL_NAME, prompt, max_tokens=tokens, seed=seed,
                                            ignore_eos=True, cache=False, **options):
            text += chunk.text
        return repeated_sentences(text)

    return list(await asyncio.gather(*(one(p, s) for p in PROMPTS for s in seeds)))


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--tokens", type=int, default=200)
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    settings = settings_from_dict({"defaults": {"keep_alive": -1, "n_parallel": len(PROMPTS) * len(seeds)}})
    async with LocalBackend(settings) as backend:
        await backend.load(DEFAULT_MODEL_NAME)
        print(f"{len(PROMPTS)} prompts x {len(seeds)} seeds, {args.tokens} tokens each")
        print(f"{'setting':<12} {'repeated':>9} {'answers with >=3':>17} {'worst':>6} {'seconds':>8}")
        for name, options in SETTINGS.items():
            started = time.perf_counter()
            counts = await burst(backend, options, seeds, args.tokens)
            looping = sum(count >= 3 for count in counts)
            print(f"{name:<12} {sum(counts):>9} {f'{looping}/{len(counts)}':>17} {max(counts):>6} "
                  f"{time.perf_counter() - started:>8.0f}", flush=True)


if __name__ == "__main__":
    asyncio.run(main())
