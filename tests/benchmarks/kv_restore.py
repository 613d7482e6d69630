"""The next turn of a long conversation after its model was evicted, or the server restarted:
restored from saved KV state versus evaluated again.

`corral serve` on the default model (n_ctx 8192, 2 threads, flash attention as configured by
default) gets a ~3,000-token conversation (a completion prompt, greedy, 8 tokens), then:

- `evict`: the model is evicted and loaded again, and the conversation's next turn is sent;
- `restart`: the server is stopped and started again on the same state folder, and the next
  turn is sent;

each once with saved KV (`[budgets] saved_kv_ram` / `saved_kv_disk` at their defaults) and once
with both set to 0, which evaluates the whole prompt again. The load (or start) is timed apart
from the turn's TTFT, and `usage.prompt_tokens_details.cached_tokens` says how much was reused.

    .venv/bin/python -m tests.benchmarks.kv_restore [--tokens 3000]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the server starter

from support import Server, start_server, write_config  # noqa: E402

from corral.backend.catalog import DEFAULT_MODEL_NAME, default_model_path  # noqa: E402

WORDS = ("river stone lantern orchard quiet market harbor winter thread copper meadow signal "
         "garden pocket ladder violet candle mirror saddle canyon").split()


def conversation(tokens: int, seed: int) -> str:
    rng = random.Random(seed)
    lines = [f"Line {i}: " + " ".join(rng.choice(WORDS) for _ in range(9)) + "." for i in range(tokens // 14)]
    return "\n".join(lines) + "\nSummary:"


def start(root: Path, saved: bool) -> tuple[Server, float]:
    budgets = {} if saved else {"saved_kv_ram": 0, "saved_kv_disk": 0}
    config = write_config(root / "corral.toml", {
        "include_default_model": False, "preload": [DEFAULT_MODEL_NAME], "budgets": budgets,
        "defaults": {"n_ctx": 8192, "n_parallel": 2, "n_threads": 2, "keep_alive": -1},
        "models": [{"name": DEFAULT_MODEL_NAME, "path": str(default_model_path())}]})
    began = time.perf_counter()
    server = start_server(root, config, timeout=180)
    return server, time.perf_counter() - began


def turn(http: httpx.Client, prompt: str) -> dict[str, Any]:
    began = time.perf_counter()
    first = None
    usage: dict[str, Any] = {}
    text = ""
    with http.stream("POST", "/v1/completions", json={
            "model": DEFAULT_MODEL_NAME, "prompt": prompt, "max_tokens": 8, "temperature": 0, "stream": True,
            "cache": False, "ignore_eos": True}, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            piece = (data.get("choices") or [{}])[0].get("text") or ""
            if piece and first is None:
                first = time.perf_counter() - began
            text += piece
            usage = data.get("usage") or usage
    return {"ttft_s": first, "text": text, "cached": (usage.get("prompt_tokens_details") or {}).get("cached_tokens"),
            "prompt_tokens": usage.get("prompt_tokens")}


def run(case: str, saved: bool, tokens: int, workdir: Path) -> dict[str, Any]:
    root = workdir / f"{case}-{'saved' if saved else 'none'}"
    server, _ = start(root, saved)
    try:
        with server.http() as http:
            opening = conversation(tokens, seed=len(case) + saved)
            first = turn(http, opening)
            follow = opening + first["text"] + "\nAnd in one word:"
            if case == "evict":
                http.post(f"/api/models/{DEFAULT_MODEL_NAME}/evict").raise_for_status()
                began = time.perf_counter()
                http.post(f"/api/models/{DEFAULT_MODEL_NAME}/load").raise_for_status()
                ready = time.perf_counter() - began
            else:
                assert server.stop() == 0, server.log()
                server, ready = start(root, saved)
        with server.http() as http:
            second = turn(http, follow)
    finally:
        server.stop()
    return {"case": case, "saved": saved, "first": first, "ready_s": ready, "next": second}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=3000, help="conversation length (default: %(default)s)")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="corral-kv-") as tmp:
        for case in ("evict", "restart"):
            for saved in (True, False):
                rows.append(run(case, saved, args.tokens, Path(tmp)))
                r = rows[-1]
                print(f"{case:8} saved={saved!s:5} first turn TTFT {r['first']['ttft_s']:.2f} s; "
                      f"{'load' if case == 'evict' else 'restart'} {r['ready_s']:.2f} s; next turn "
                      f"TTFT {r['next']['ttft_s']:.2f} s, {r['next']['cached']} of {r['next']['prompt_tokens']} "
                      "prompt tokens reused", flush=True)
    print("\n| after | next turn TTFT, restored | evaluated again | ratio | load / restart, restored | evaluated again |")
    print("|---|---|---|---|---|---|")
    for case in ("evict", "restart"):
        on, off = (next(r for r in rows if r["case"] == case and r["saved"] == s) for s in (True, False))
        print(f"| {case} | {on['next']['ttft_s']:.2f} s ({on['next']['cached']} reused) | "
              f"{off['next']['ttft_s']:.2f} s | {on['next']['ttft_s'] / off['next']['ttft_s']:.2f}x | "
              f"{on['ready_s']:.2f} s | {off['ready_s']:.2f} s |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
