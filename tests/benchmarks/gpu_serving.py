"""GPU serving benchmark: `corral serve` against a CUDA `llama-server` of the same llama.cpp.

    python3 -m tests.benchmarks.gpu_serving [--json results.json]      # on the lent GPU machine

Issue 9, point 5. What it does:

1. Refuses to run without a GPU (NVML sees none, or llama-cpp-python has no GPU offload):
   it says so and exits 2. Everything else here is for the GPU machine (shared GPU.md).
2. Writes a random-weight f16 llama of realistic size with the `gguf` package (16 layers,
   2048 wide, 16 heads, 4 KV heads, ff 5632, vocab 32000: about 1.7 GB); speed does not
   depend on the weight values.
3. Takes the CUDA llama-server that GPU.md's `build-cuda.sh` built from the llama.cpp vendored
   in llama-cpp-python (`--llama-server`, default `$LLAMA_CPP_LIB_PATH/llama-server`), or
   builds it with `-DGGML_CUDA=on` from `--source` (that vendored llama.cpp folder).
4. Runs both servers with the same settings (all layers on the GPU, `--slots` slots, unified
   KV, full-size SWA cache, flash attention on, n_batch = n_ubatch) and measures each with
   serving.py's closed-loop streaming clients at concurrency 1, 8, 32, 64: temperature 0,
   ignore-eos, fixed 128-token outputs. Prints aggregate tok/s and TTFT with corral/llama-server
   ratios, and the issue's targets (>= 1.0x at c1, >= 1.5x at c32 and c64).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..support import free_port, write_config
from . import serving
from .peers import corral_command, log
from .report import build_ratios, fmt, render_table, summarize
from .serving import Server

MODEL_NAME = "bench-f16"
LEVELS = (1, 8, 32, 64)
TARGETS = ((1, 1.0), (32, 1.5), (64, 1.5))  # (concurrency, corral/llama-server tok/s at least)


class NeedsGPU(RuntimeError):
    """Why a GPU benchmark cannot run here (it would otherwise fail obscurely without one)."""


def require_gpu() -> dict[int, tuple[int, int]]:
    """Each GPU's (free, total) bytes; without a usable GPU, says why on stderr and exits 2."""
    try:
        return _gpus()
    except NeedsGPU as exc:
        print(f"this benchmark needs a GPU: {exc}. Run it on the lent GPU machine (GPU.md, "
              "tests/benchmarks/README.md)", file=sys.stderr)
        raise SystemExit(2) from None


def _gpus() -> dict[int, tuple[int, int]]:
    from corral.backend.telemetry import Telemetry

    telemetry = Telemetry()
    try:
        memory = telemetry.gpu_memory()
        if not memory:
            raise NeedsGPU(telemetry.gpu_note())
    finally:
        telemetry.close()
    import llama_cpp

    if not llama_cpp.llama_supports_gpu_offload():
        raise NeedsGPU("llama-cpp-python here was built without GPU offload (GPU.md: source build-cuda.sh "
                       "and keep LLAMA_CPP_LIB_PATH set)")
    return memory


# -- the model ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Shape:
    n_layer: int = 16
    n_embd: int = 2048
    n_head: int = 16
    n_kv_head: int = 4
    n_ff: int = 5632
    vocab: int = 32000
    context_length: int = 32768


def write_f16_llama(path: Path, shape: Shape, seed: int = 0) -> Path:
    """A random-weight f16 llama that llama.cpp loads, written by tests/ggufs.py with its
    vocabulary padded by filler pieces to `shape.vocab`, so the output head costs what a real
    one does (ggufs.py's own vocabulary is a few hundred tokens)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import ggufs

    small = ggufs._vocab

    def padded() -> tuple[list[str], list[float], list[int]]:
        tokens, scores, types = small()
        filler = shape.vocab - len(tokens)
        return ([*tokens, *(f"\u2581w{i}" for i in range(filler))], [*scores, *(-1000.0 - i for i in range(filler))],
                [*types, *[types[-1]] * filler])

    ggufs._vocab = padded
    try:
        return ggufs.write_tiny_llama(path, n_layer=shape.n_layer, n_embd=shape.n_embd, n_head=shape.n_head,
                                      n_kv_head=shape.n_kv_head, n_ff=shape.n_ff, context_length=shape.context_length,
                                      seed=seed, dtype="f16", name=path.stem)
    finally:
        ggufs._vocab = small


# -- the peer ----------------------------------------------------------------------------------

def cuda_llama_server(given: Path | None, source: Path | None, jobs: int) -> Path:
    """The CUDA llama-server: given, next to LLAMA_CPP_LIB_PATH (build-cuda.sh), or built here."""
    lib = os.environ.get("LLAMA_CPP_LIB_PATH")
    for candidate in (given, Path(lib) / "llama-server" if lib else None):
        if candidate is not None and candidate.is_file():
            return candidate
    if source is None:
        raise SystemExit("no CUDA llama-server: pass --llama-server PATH, source GPU.md's build-cuda.sh "
                         "(it sets LLAMA_CPP_LIB_PATH), or --source <vendored llama.cpp folder> to build one")
    build = source / "build-cuda"
    log(f"building a CUDA llama-server in {build} (several minutes)")
    subprocess.run(["cmake", "-S", str(source), "-B", str(build), "-DGGML_CUDA=on", "-DCMAKE_BUILD_TYPE=Release",
                    "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF"], check=True)
    subprocess.run(["cmake", "--build", str(build), "--target", "llama-server", "-j", str(jobs)], check=True)
    return build / "bin" / "llama-server"


def make_servers(model: Path, llama_server: Path, workdir: Path, args: argparse.Namespace) -> list[Server]:
    """corral and llama-server with the same context settings, every layer on the GPU."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
    config = write_config(workdir / "corral.toml", {
        "include_default_model": False, "preload": [MODEL_NAME],
        "defaults": {"n_ctx": args.n_ctx, "n_parallel": args.slots, "n_threads": args.threads,
                     "n_batch": args.n_batch, "n_gpu_layers": -1, "keep_alive": -1, "max_queue": 256},
        "models": [{"name": MODEL_NAME, "path": str(model)}]})
    corral_port, peer_port = free_port(), free_port()
    corral = Server("corral", [*corral_command(), "serve", "--host", "127.0.0.1", "--port", str(corral_port),
                               "--config", str(config)], corral_port, "/health", workdir / "corral.log", env)
    peer = Server("llama-server", [
        str(llama_server), "-m", str(model), "--host", "127.0.0.1", "--port", str(peer_port), "-ngl", "999",
        "--parallel", str(args.slots), "--cont-batching", "-c", str(args.n_ctx), "-t", str(args.threads),
        "-tb", str(args.threads), "-b", str(args.n_batch), "-ub", str(args.n_batch), "--kv-unified",
        "--swa-full", "--flash-attn", "on", "--no-webui"], peer_port, "/health", workdir / "llama-server.log", env)
    return [corral, peer]


# -- the run -----------------------------------------------------------------------------------

def measure(servers: list[Server], args: argparse.Namespace) -> list[dict[str, Any]]:
    """One closed-loop step per server and level (the order alternates per level)."""
    rows: list[dict[str, Any]] = []
    k = 0
    for li, conc in enumerate(args.levels):
        n = max(args.min_requests, 2 * conc)
        for server in servers[li % 2:] + servers[:li % 2]:
            step = asyncio.run(serving.run_step(server, conc, n, k, args.max_tokens, args.step_seconds,
                                                args.request_timeout))
            row = summarize(step, args.max_tokens)
            log(f"c{conc:<2} {server.name:<12} {fmt(row['tok_s']):>8} tok/s  TTFT p50 "
                f"{fmt(row['ttft_p50_ms'], '.0f')} ms  err {row['errors']}  tokens "
                f"{row['tokens_received']}/{row['tokens_expected']}")
            rows.append(row)
        k += n
    return rows


def targets(ratios: list[dict[str, Any]]) -> list[str]:
    by = {r["concurrency"]: r["tok_s_ratio"] for r in ratios if r["peer"] == "llama-server"}
    lines = ["issue 9 targets (corral / llama-server aggregate tok/s):"]
    for conc, bound in TARGETS:
        value = by.get(conc)
        verdict = "not measured" if value is None else ("met" if value >= bound else "NOT met")
        lines.append(f"  c{conc:<3} {fmt(value, '.2f'):>6}x  (target >= {bound}x)  {verdict}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m tests.benchmarks.gpu_serving", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="write the rows, ratios and settings here")
    parser.add_argument("--levels", type=lambda s: [int(x) for x in s.split(",")], default=list(LEVELS))
    parser.add_argument("--min-requests", type=int, default=16, help="per step; at least 2 x concurrency")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--slots", type=int, default=64)
    parser.add_argument("--n-ctx", type=int, default=16384, help="shared by the slots (unified KV)")
    parser.add_argument("--n-batch", type=int, default=512)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--step-seconds", type=float, default=60.0)
    parser.add_argument("--request-timeout", type=float, default=120.0)
    parser.add_argument("--model", type=Path, help="an existing GGUF instead of generating one")
    parser.add_argument("--llama-server", type=Path)
    parser.add_argument("--source", type=Path, help="vendored llama.cpp to build a CUDA llama-server from")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 4)
    parser.add_argument("--keep-logs", type=Path, help="copy both servers' logs here")
    args = parser.parse_args(argv)
    gpus = require_gpu()
    signal.signal(signal.SIGTERM, serving._terminate)
    serving.CORRAL_MODEL = MODEL_NAME  # serving.py's clients name corral's model by this
    llama_server = cuda_llama_server(args.llama_server, args.source, args.jobs)
    with tempfile.TemporaryDirectory(prefix="corral-gpu-bench-") as tmp, contextlib.ExitStack() as stack:
        workdir = Path(tmp)
        model = args.model
        if model is None:
            started = time.perf_counter()
            model = write_f16_llama(workdir / f"{MODEL_NAME}.gguf", Shape())
            log(f"wrote {model} ({model.stat().st_size / 2**30:.2f} GiB) in {time.perf_counter() - started:.0f} s")
        servers = make_servers(model, llama_server, workdir, args)
        for server in servers:  # one at a time: each gets the whole GPU while it loads
            stack.callback(_stop_and_keep, server, args.keep_logs)
            log(f"starting {server.name}: {' '.join(server.argv)}")
            server.start()
            log(f"{server.name} ready in {server.wait_ready(timeout=600):.1f} s")
            asyncio.run(serving.warm_up(server, args.slots, args.request_timeout))
        rows = measure(servers, args)
    ratios = build_ratios(rows)
    print(render_table(rows, ratios, []))
    print("\n".join(targets(ratios)))
    print(f"GPUs: {', '.join(f'{i}: {total / 2**30:.0f} GiB' for i, (_, total) in gpus.items())}")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "ratios": ratios, "targets": targets(ratios),
                                         "settings": {k: str(v) for k, v in vars(args).items()}}, indent=1))
    return 0


def _stop_and_keep(server: Server, keep: Path | None) -> None:
    server.stop()
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(OSError):
            (keep / server.log_path.name).write_bytes(server.log_path.read_bytes())


if __name__ == "__main__":
    sys.exit(main())
