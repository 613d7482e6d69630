"""Memory-estimate check on a GPU: corral's VRAM estimate against the VRAM a load really took.

    python3 -m tests.benchmarks.gpu_memory [--json results.json]      # on the lent GPU machine

Issue 9, point 6. Two random-weight f16 llamas (about 0.45 GB and 1.7 GB, written with the
`gguf` package as gpu_serving.py does) at two contexts each (4096 and 16384 tokens), every
layer on the GPU. Each case loads through corral's own Manager, which plans the load
(`vram_estimate_bytes`, from backend/memory.py) and measures it (`measured_vram`: NVML's free
memory before minus after the load and warm-up decode). A small model loaded first and kept
pays for the CUDA context and cuBLAS workspace, which belong to the process, not to a model.
Prints estimate, measured and their ratio per case; the target is within ±10 %.
Without a GPU it says so and exits 2.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from .gpu_serving import Shape, require_gpu, write_f16_llama
from .peers import log

SIZES = {"small": Shape(n_layer=8, n_embd=1024, n_head=8, n_kv_head=4, n_ff=2816),
         "large": Shape()}
CONTEXTS = (4096, 16384)
TOLERANCE = 0.10


async def measure(models: dict[str, Path], warm: Path, contexts: tuple[int, ...],
                  n_parallel: int) -> list[dict[str, Any]]:
    from corral.backend.config import settings_from_dict
    from corral.backend.events import EventBus
    from corral.backend.manager import Manager

    entries = [{"name": "warm", "path": str(warm), "n_ctx": 512, "n_parallel": 1, "pinned": True}]
    entries += [{"name": f"{size}-{n_ctx}", "path": str(path), "n_ctx": n_ctx}
                for size, path in models.items() for n_ctx in contexts]
    settings = settings_from_dict({
        "include_default_model": False, "models": entries, "budgets": {"max_loaded": 2},
        "defaults": {"n_gpu_layers": -1, "n_parallel": n_parallel, "keep_alive": -1, "n_threads": 4}})
    manager = Manager(settings, EventBus())
    await manager.start()
    rows = []
    try:
        await manager.load("warm")
        for entry in entries[1:]:
            info = await manager.load(entry["name"])
            estimate = info.vram_estimate_bytes or 0
            measured = (info.measured_vram or {}).get(info.gpu if info.gpu is not None else 0, 0)
            ratio = estimate / measured if measured else None
            rows.append({"case": info.name, "n_ctx": info.n_ctx, "placement": info.placement,
                         "estimate_bytes": estimate, "measured_bytes": measured,
                         "estimate_detail": info.estimate_detail, "ratio": ratio,
                         "within_tolerance": ratio is not None and abs(ratio - 1) <= TOLERANCE})
            log(f"{info.name}: estimate {estimate / 2**20:.0f} MiB, measured {measured / 2**20:.0f} MiB"
                + (f", ratio {ratio:.3f}" if ratio else ""))
            await manager.evict(info.name)
    finally:
        await manager.close()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m tests.benchmarks.gpu_memory", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--n-parallel", type=int, default=8)
    args = parser.parse_args(argv)
    require_gpu()
    with tempfile.TemporaryDirectory(prefix="corral-gpu-memory-") as tmp:
        folder = Path(tmp)
        models = {size: write_f16_llama(folder / f"{size}.gguf", shape) for size, shape in SIZES.items()}
        warm = write_f16_llama(folder / "warm.gguf", Shape(n_layer=2, n_embd=256, n_head=4, n_kv_head=2, n_ff=512,
                                                         vocab=1000))
        rows = asyncio.run(measure(models, warm, CONTEXTS, args.n_parallel))
    print(f"{'case':<14} {'n_ctx':>6} {'estimate MiB':>13} {'measured MiB':>13} {'est/meas':>9}  within ±10%")
    for row in rows:
        ratio = "-" if row["ratio"] is None else f"{row['ratio']:.3f}"
        print(f"{row['case']:<14} {row['n_ctx']:>6} {row['estimate_bytes'] / 2**20:>13.0f} "
              f"{row['measured_bytes'] / 2**20:>13.0f} {ratio:>9}  {'yes' if row['within_tolerance'] else 'NO'}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0 if rows and all(row["within_tolerance"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
