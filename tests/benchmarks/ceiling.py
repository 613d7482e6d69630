"""How fast can any server go here? The decode ceiling, next to corral's engine.

A server built on llama.cpp cannot stream faster than llama.cpp decodes. This script measures,
on the default model with the settings the serving benchmark uses (2 threads, unified KV,
full SWA cache, flash attention on), three things at 1 and 8 streams of 64 greedy tokens:

- `decode only`: a bare loop of llama_decode calls, one token per sequence per call, feeding
  back a numpy argmax: no scheduler, no events, no HTTP. Nothing built on these kernels can
  beat it on this machine.
- `corral engine`: the same work through corral's Engine (scheduler thread, stop and
  detokenisation, delivery to an asyncio consumer), without HTTP.
- the ratio between them: what corral's engine costs above the kernels.

Compare the serving benchmark's figures for `corral serve` and llama-server with the
ceiling: when llama-server is already at it, no server can be much faster than llama-server.

    .venv/bin/python -m tests.benchmarks.ceiling [--passes 3]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

import llama_cpp
import numpy as np

from corral.backend.catalog import default_model_path
from corral.backend.engine import ContextSettings, Engine
from corral.backend.generation import Decoding, SamplingParams
from corral.backend.weights import ModelWeights, batch_add, new_context

PROMPT = "Once upon a time"
TOKENS = 64


def decode_only(weights: ModelWeights, streams: int, threads: int) -> float:
    """Tokens/s of a bare batched greedy loop (prompt prefill excluded from the timing)."""
    ctx = new_context(weights, n_ctx=4096, n_batch=512, n_seq_max=8, n_threads=threads, flash_attn=True)
    batch = llama_cpp.llama_batch_init(512, 0, 1)
    try:
        prompts = [weights.tokenize(f"{i}: {PROMPT}", add_special=True) for i in range(streams)]
        batch.n_tokens = 0
        logits_rows = []  # batch indexes whose logits llama.cpp keeps
        for seq, tokens in enumerate(prompts):
            for pos, token in enumerate(tokens):
                if pos == len(tokens) - 1:
                    logits_rows.append(batch.n_tokens)
                batch_add(batch, token, pos, seq, pos == len(tokens) - 1)
        if llama_cpp.llama_decode(ctx, batch) != 0:
            raise RuntimeError("prefill failed")
        positions = [len(t) for t in prompts]
        started = time.perf_counter()
        for step in range(TOKENS + 1):
            if step == 1:  # the first decode step allocates the graph: warm-up, not timed
                started = time.perf_counter()
            nexts = []
            for row in logits_rows:
                logits = llama_cpp.llama_get_logits_ith(ctx, row)
                nexts.append(int(np.argmax(np.ctypeslib.as_array(logits, shape=(weights.n_vocab,)))))
            batch.n_tokens = 0
            for seq, token in enumerate(nexts):
                batch_add(batch, token, positions[seq], seq, True)
                positions[seq] += 1
            logits_rows = list(range(streams))
            if llama_cpp.llama_decode(ctx, batch) != 0:
                raise RuntimeError("decode failed")
        return streams * TOKENS / (time.perf_counter() - started)
    finally:
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_free(ctx)


async def through_engine(weights: ModelWeights, streams: int, threads: int) -> float:
    """Tokens/s of the same requests through corral's Engine, from first token to last."""
    engine = Engine(weights, ContextSettings(n_ctx=4096, n_parallel=8, n_threads=threads), model_name="ceiling")
    await asyncio.to_thread(engine.start)
    try:
        decoding = Decoding(SamplingParams(temperature=0.0, max_tokens=TOKENS, ignore_eos=True))
        requests = [engine.submit(weights.tokenize(f"{i}: {PROMPT}", add_special=True), decoding)
                    for i in range(streams)]
        first: float | None = None
        for request in requests:
            while (chunk := await request.delivery.queue.get()).finish_reason is None:
                first = first or time.perf_counter()
        assert chunk.stats is not None and chunk.stats.ttft_s is not None
        # decode time only, as decode_only measures it: from the first token on
        elapsed = time.perf_counter() - (first or time.perf_counter())
        return streams * (TOKENS - 1) / elapsed
    finally:
        engine.close()


def on_a_passing_thread(fn: Callable[..., float], *args: Any) -> float:
    """Run `fn` on a thread that ends with it. OpenMP keeps a thread team per calling thread
    while that thread lives, and a lingering team slows every other thread's decodes (see
    Engine.start): the bare loop must not leave one behind for the engine's turn."""
    result: list[float] = []
    thread = threading.Thread(target=lambda: result.append(fn(*args)))
    thread.start()
    thread.join()
    return result[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    weights = ModelWeights(str(default_model_path()))
    rows = []
    for streams in (1, 8):
        bare, engine = [], []
        for _ in range(args.passes):
            bare.append(on_a_passing_thread(decode_only, weights, streams, args.threads))
            engine.append(asyncio.run(through_engine(weights, streams, args.threads)))
        rows.append((streams, statistics.median(bare), statistics.median(engine)))
    weights.release()
    print(f"{'streams':>7} {'decode only':>12} {'corral engine':>14} {'engine/ceiling':>15}   (tok/s, median of "
          f"{args.passes})")
    for streams, bare, engine in rows:
        print(f"{streams:>7} {bare:>12.1f} {engine:>14.1f} {engine / bare:>14.2f}x")


if __name__ == "__main__":
    main()
