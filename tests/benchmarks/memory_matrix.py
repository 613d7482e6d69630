"""The memory estimate against the peak a loaded model reaches, over a matrix of settings.

    .venv/bin/python -m tests.benchmarks.memory_matrix                 # 2 models x 24 settings
    .venv/bin/python -m tests.benchmarks.memory_matrix --models default --n-ctx 1024

Admission decides on the estimate, so it must hold for what a model can reach under any load,
not just right after its load: llama.cpp's compute buffers are reserved whole but their pages
are touched as graph shapes vary, and the embeddings context appears with the first embedding
request. Each cell runs in a fresh process (its own high-water mark): the resident set just
before the load is the baseline; the model is loaded with the cell's `n_ctx`, `n_parallel`,
`n_ubatch` and KV type, every slot then gets a long prompt at once (two waves of different
lengths, so graph shapes vary), and embeddings run beside the second wave. The
peak is the kernel's high-water mark (VmHWM) less the baseline. A cell passes when the estimate
is within +-10 % of that peak.

The models: the default gemma-3-270m (Q4_K_M, 262,144-token vocabulary, sliding-window
layers) and a random-weight llama written here (F16, untied output head, a small vocabulary),
so the vocabulary-sized buffers and the weight-sized ones both get tested.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .peers import default_model_path, log
from .report import proc_status_bytes, write_json
from tests.support import write_config

TOLERANCE = 0.10
PROMPT_FILL = 0.9  # of each slot's share of n_ctx
EMBED_TOKENS = 600  # the longer embedding input: a few of its chunks (EmbeddingShape)
RANDOM_MODEL = {"n_layer": 8, "n_embd": 768, "n_head": 12, "n_kv_head": 4, "n_ff": 2048,
                "context_length": 16384, "dtype": "f16", "name": "llama-random-50m", "seed": 7}
WORDS = ("the quick brown fox jumps over a lazy dog while seven tall ships sail under grey "
         "skies and market traders count copper coins beside the river").split()


def _text(rng: random.Random, words: int) -> str:
    return " ".join(f"{rng.choice(WORDS)}{rng.randint(0, 99) if rng.random() < 0.3 else ''}" for _ in range(words))


def _config(folder: Path, model: Path, cell: dict[str, Any]) -> Path:
    return write_config(folder / "config.toml", {
        "include_default_model": False,
        "stores": {"ollama": False, "huggingface": False, "lmstudio": False},
        "budgets": {"ram_bytes": "64GiB"}, "cache": {"enabled": False},
        "models": [{"name": "m", "path": str(model), "n_ctx": cell["n_ctx"], "n_parallel": cell["n_parallel"],
                    "n_batch": 512, "n_ubatch": cell["n_ubatch"], "type_k": cell["kv"], "type_v": cell["kv"],
                    "n_threads": cell["threads"], "n_gpu_layers": 0}]})


def run_cell(model: Path, cell: dict[str, Any]) -> dict[str, Any]:
    """One cell, in this process (which must be fresh): the figures as a dict."""
    from corral.backend import LocalBackend
    from corral.backend.request import GenerationRequest, Message

    folder = Path(tempfile.mkdtemp(prefix="corral-memory-"))
    os.environ["XDG_STATE_HOME"] = str(folder)
    rng = random.Random(cell["n_ctx"] * 7 + cell["n_parallel"])
    with LocalBackend(config=str(_config(folder, model, cell))) as backend:
        sync = backend.sync
        sync.models()
        baseline = proc_status_bytes("VmRSS")
        info = sync.load("m")
        loaded = proc_status_bytes("VmRSS") - baseline

        def messages(words: int) -> tuple[Message, ...]:
            return (Message(role="user", content=_text(rng, words)),)

        probe = sync.count_tokens(GenerationRequest(model="m", messages=messages(200)))
        per_word = probe / 200

        def prompt(fill: float) -> list[dict[str, str]]:
            share = cell["n_ctx"] // cell["n_parallel"]
            words = max(8, int(share * fill / per_word))
            return [{"role": "user", "content": _text(rng, words)}]

        async def chat(fill: float) -> int:
            tokens = 0
            async for chunk in backend.chat("m", prompt(fill), max_tokens=16, temperature=0, ignore_eos=True):
                tokens += 1 if chunk.text else 0
            return tokens

        async def wave(fill: float, embed: bool) -> None:
            jobs: list[Any] = [chat(fill) for _ in range(cell["n_parallel"])]
            if embed:
                # the embeddings context's KV cache is cleared (touched) whole when it opens, and
                # its compute is a chunk's: a few chunks of text reach its peak
                words = int(EMBED_TOKENS / per_word)
                jobs.append(backend.embed("m", [_text(rng, words), _text(rng, words // 3)]))
            await asyncio.gather(*jobs)

        started = time.perf_counter()
        sync.run(wave(PROMPT_FILL, embed=False))
        after_prefill = proc_status_bytes("VmHWM") - baseline
        sync.run(wave(PROMPT_FILL / 2, embed=True))
        seconds = time.perf_counter() - started
        peak = proc_status_bytes("VmHWM") - baseline
        detail = info.estimate_detail or {}
    return {**cell, "estimate": info.estimate_bytes, "estimate_detail": detail, "loaded": loaded,
            "peak_prefill": after_prefill, "peak": peak, "error": info.estimate_bytes / peak - 1,
            "seconds": round(seconds, 1)}


def write_random_model(folder: Path) -> Path:
    from tests.ggufs import write_tiny_llama

    path = folder / f"{RANDOM_MODEL['name']}.gguf"
    if not path.exists():
        write_tiny_llama(path, **{k: v for k, v in RANDOM_MODEL.items() if k != "name"}, name=RANDOM_MODEL["name"])
    return path


def model_paths(names: list[str], cache: Path) -> dict[str, Path]:
    paths = {}
    for name in names:
        if name == "default":
            paths["gemma-3-270m Q4_K_M"] = default_model_path()
        elif name == "random":
            paths[f"{RANDOM_MODEL['name']} F16"] = write_random_model(cache)
        else:
            paths[Path(name).stem] = Path(name)
    return paths


def measure(label: str, path: Path, cell: dict[str, Any]) -> dict[str, Any]:
    """Run one cell in a child process: a high-water mark belongs to a whole process."""
    child = subprocess.run(
        [sys.executable, "-m", "tests.benchmarks.memory_matrix", "--cell", json.dumps(cell), "--model-path", str(path)],
        capture_output=True, text=True, timeout=1800)
    if child.returncode != 0:
        raise RuntimeError(f"cell {cell} failed:\n{child.stderr[-3000:]}")
    result = json.loads(child.stdout.strip().splitlines()[-1])
    result["model"] = label
    return result


def mib(n: int | float) -> str:
    return f"{n / 2**20:.1f}"


def render(results: list[dict[str, Any]]) -> str:
    lines = ["| model | n_ctx | n_parallel | n_ubatch | KV | estimate MiB | after load MiB | peak MiB | estimate / peak |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        ok = "✓" if abs(r["error"]) <= TOLERANCE else "✗"
        lines.append(f"| {r['model']} | {r['n_ctx']} | {r['n_parallel']} | {r['n_ubatch']} | {r['kv']} | "
                     f"{mib(r['estimate'])} | {mib(r['loaded'])} | {mib(r['peak'])} | {1 + r['error']:.3f} {ok} |")
    worst = max(results, key=lambda r: abs(r["error"]))
    inside = sum(abs(r["error"]) <= TOLERANCE for r in results)
    lines.append(f"\n{inside} of {len(results)} cells within ±{TOLERANCE:.0%}; the widest: "
                 f"{worst['model']} n_ctx {worst['n_ctx']} x{worst['n_parallel']} ubatch {worst['n_ubatch']} "
                 f"{worst['kv']}, {worst['error']:+.1%}")
    return "\n".join(lines)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="default,random", help="default, random or GGUF paths, comma-separated")
    parser.add_argument("--n-ctx", type=_ints, default=[1024, 2048, 4096])
    parser.add_argument("--n-parallel", type=_ints, default=[1, 4])
    parser.add_argument("--n-ubatch", type=_ints, default=[128, 512])
    parser.add_argument("--kv", default="f16,q8_0")
    parser.add_argument("--threads", type=int, default=min(os.cpu_count() or 1, 4))
    parser.add_argument("--json", type=Path, default=Path("bench-results/memory_matrix.json"))
    parser.add_argument("--cell", help=argparse.SUPPRESS)
    parser.add_argument("--model-path", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.cell:
        print(json.dumps(run_cell(args.model_path, json.loads(args.cell))))
        return 0
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "corral-bench"
    cache.mkdir(parents=True, exist_ok=True)
    results = []
    for label, path in model_paths(args.models.split(","), cache).items():
        for n_ctx, n_parallel, n_ubatch, kv in itertools.product(args.n_ctx, args.n_parallel, args.n_ubatch,
                                                                 args.kv.split(",")):
            cell = {"n_ctx": n_ctx, "n_parallel": n_parallel, "n_ubatch": n_ubatch, "kv": kv, "threads": args.threads}
            result = measure(label, path, cell)
            log(f"{label} {cell}: estimate {mib(result['estimate'])} MiB, peak {mib(result['peak'])} MiB "
                f"({result['error']:+.1%}), {result['seconds']} s")
            results.append(result)
    table = render(results)
    print(table)
    write_json(args.json, {"results": results, "table": table})
    return 0 if all(abs(r["error"]) <= TOLERANCE for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
