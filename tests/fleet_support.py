"""A two-node corral fleet on one machine for the Ray tests: one local Ray cluster whose node
offers both nodes' resources, each node with its own config and model folder.

Ray must only ever run inside a loopback-only network namespace here (`in_namespace`): the
tests that start it re-run their own module inside `unshare -rn` with loopback up."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from corral.backend import LocalBackend
from corral.backend.config import settings_from_dict
from ggufs import write_tiny_llama
from support import write_config

INSIDE = "CORRAL_FLEET_NETNS"
SIZES = {"m1": 6, "m2": 5, "m3": 4}  # layers: the 6/5/4 shape
SHAPE = dict(n_embd=256, n_head=4, n_kv_head=4, n_ff=4096)
SLOW = "slow"  # a model on node a only, decoding slowly enough to keep a stream running
SLOW_SHAPE = dict(n_layer=4, n_embd=512, n_head=8, n_kv_head=8, n_ff=1024, context_length=2048)
ONLY_A = "only-a"  # another model only node a has: loading it needs room the stream holds


def in_namespace() -> bool:
    return os.environ.get(INSIDE) == "1"


def rerun_in_namespace(module: str, home: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    """Run pytest on `module` inside a new user and network namespace with only loopback up,
    where Ray falls back to 127.0.0.1; skips where that cannot be made. `home` is the run's
    HOME, where Ray keeps its token."""
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        pytest.skip("needs `unshare` and `ip` (util-linux, iproute2) for a loopback-only network namespace")
    probe = subprocess.run(["unshare", "-rn", "sh", "-c", "ip link set lo up"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot make a loopback-only network namespace here: {probe.stderr.strip()}")
    command = f"ip link set lo up && exec {sys.executable} -m pytest -q -x -p no:cacheprovider {module}"
    return subprocess.run(["unshare", "-rn", "sh", "-c", command], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, INSIDE: "1", "HOME": str(home)}, cwd=Path(__file__).parent.parent)


def make_nodes(root: Path) -> tuple[dict[str, Any], dict[str, float]]:
    """Model files, two node configs, the fleet settings (as fleet.toml gives them) and the
    resources of the one Ray node that stands for both hosts.

    Each node's RAM budget holds m1 + m3 (6 + 4 layers) but not m1 + m2 (6 + 5), as the
    issue's sizes 6/5/4 against a budget of 10. Node a also has the slow model and `only-a`,
    which fit together only after the slow one is evicted."""
    shared = root / "files"
    for seed, (name, layers) in enumerate(SIZES.items()):
        write_tiny_llama(shared / f"{name}.gguf", name=name, n_layer=layers, seed=seed, **SHAPE)
    slow = write_tiny_llama(shared / "a" / f"{SLOW}.gguf", name=SLOW, seed=7, **SLOW_SHAPE)
    only = write_tiny_llama(shared / "a" / f"{ONLY_A}.gguf", name=ONLY_A, seed=8, n_layer=8, **SHAPE)
    defaults = {"n_ctx": 256, "n_parallel": 2, "n_threads": 1, "keep_alive": -1}
    with LocalBackend(settings_from_dict({"include_default_model": False, "model_dirs": [str(shared)],
                                          "defaults": defaults})) as probe:
        estimate = {m.name: m.estimate_bytes for m in probe.sync.models()}
    budget = estimate["m1"] + estimate["m3"] + (estimate["m2"] - estimate["m3"]) // 2
    nodes = []
    for name in ("a", "b"):
        models = root / name / "models"
        models.mkdir(parents=True)
        for file in shared.glob("*.gguf"):
            os.link(file, models / file.name)
        extra = [{"name": SLOW, "path": str(slow), "n_ctx": 2048, "n_parallel": 1},
                 {"name": ONLY_A, "path": str(only)}] if name == "a" else []
        config = write_config(root / name / "corral.toml", {
            "include_default_model": False, "model_dirs": [str(models)], "models": extra, "defaults": defaults,
            "budgets": {"max_loaded": 3, "ram_bytes": budget}})
        nodes.append({"name": name, "config": str(config), "resource": f"corral_node_{name}"})
    fleet = {"app": "corral", "host": "127.0.0.1", "port": 8000, "api_key": "fleet-test-key",
             "num_cpus": 0, "stats_period_s": 0.5, "nodes": nodes}
    return fleet, {"corral_node": 2, **{n["resource"]: 1 for n in nodes}}
