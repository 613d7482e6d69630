"""Fleet simulation: corral's routing against Ray Serve's own model multiplexing, N nodes x M
models, on the same seeded traffic (the model is in fleet_model.py).

    python -m tests.benchmarks.fleet_sim                      # the issue's 2 x 3 case, three fleets
    python -m tests.benchmarks.fleet_sim --nodes 8 --models 40 --budget 32 --requests 8000 --seed 3

Traffic is open loop: Poisson arrivals (`--rate` per node per second), each for a model drawn
from a Zipf distribution (s = 1) over the models in a seeded random order; model sizes are
Zipf-like too (the k-th largest is `--largest` / sqrt(k) GB), independent of popularity. A request
prefills for 0.1-0.3 s (its first token) and then decodes for an exponential time (mean 2 s).
Loads take 0.5 s per GB. Ray's multiplexing needs a model count per replica
(`max_num_models_per_replica`); the tables show the two an operator would pick: the budget over
the mean model size, and the budget over the largest (never over the budget by count, at the
cost of memory left unused), or `--ray-models`.

The issue's case: 2 nodes, models of 6, 5 and 4 GB, 10 GB per node, one client sending m1, m3,
m2 twenty times, each request after the previous one ends; repeated over `--seeds` seeds, as
Ray's router draws at random.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections.abc import Sequence

from .fleet_model import GB, Fleet, Job, Result, simulate

FLEETS = ((4, 16, 20), (8, 32, 20), (16, 64, 24))  # nodes, models, budget GB
SIZE_EXPONENT = 0.5  # the k-th largest model is largest / k ** SIZE_EXPONENT


def issue_case() -> tuple[Fleet, list[Job]]:
    """The issue's 2 x 3 case (see the module docstring)."""
    fleet = Fleet(nodes=2, sizes={"m1": 6 * GB, "m2": 5 * GB, "m3": 4 * GB}, budget=10 * GB)
    return fleet, [Job(0.0, model, 0.1, 1.0) for _ in range(20) for model in ("m1", "m3", "m2")]


def zipf_fleet(nodes: int, models: int, budget_gb: float, largest_gb: float) -> Fleet:
    sizes = {f"m{k:02d}": int(largest_gb * GB / k ** SIZE_EXPONENT) for k in range(1, models + 1)}
    if largest_gb > budget_gb:
        raise SystemExit(f"--largest {largest_gb} GB does not fit --budget {budget_gb} GB: "
                         "raise the budget or lower --largest")
    return Fleet(nodes=nodes, sizes=sizes, budget=int(budget_gb * GB))


def zipf_traffic(fleet: Fleet, requests: int, rate_per_node: float, seed: int) -> list[Job]:
    rng = random.Random(seed)
    popular = list(fleet.sizes)
    rng.shuffle(popular)
    weights = [1 / k for k in range(1, len(popular) + 1)]
    jobs, at = [], 0.0
    for _ in range(requests):
        at += rng.expovariate(rate_per_node * fleet.nodes)
        model = rng.choices(popular, weights)[0]
        jobs.append(Job(at, model, rng.uniform(0.1, 0.3), rng.expovariate(1 / 2.0)))
    return jobs


def ray_counts(fleet: Fleet, chosen: int) -> list[int]:
    """max_num_models_per_replica values to compare: `chosen`, or budget / mean size and
    budget / largest size."""
    if chosen:
        return [chosen]
    sizes = fleet.sizes.values()
    return sorted({max(1, round(fleet.budget / statistics.mean(sizes))), max(1, fleet.budget // max(sizes))},
                  reverse=True)


def table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def result_row(result: Result) -> list[str]:
    return [result.policy, str(result.loads), str(result.evictions), f"{result.hit_rate:.2f}", str(result.refused),
            f"{result.ttft_quantile(0.5):.2f}", f"{result.ttft_quantile(0.99):.2f}"]


def issue_table(seeds: Sequence[int]) -> str:
    fleet, jobs = issue_case()
    rows = [["policy", "loads per seed", "loads", "evictions", "hit rate", "TTFT p50 s", "TTFT p99 s"]]
    for policy, count in (("corral", 0), ("ray", 2), ("ray", 1)):
        runs = [simulate(fleet, jobs, policy, seed=s, ray_models=count, closed_loop=True) for s in seeds]
        rows.append([runs[0].policy, " ".join(str(r.loads) for r in runs),
                     *(format(statistics.median(figure(r) for r in runs), spec) for figure, spec in (
                         (lambda r: r.loads, "g"), (lambda r: r.evictions, "g"), (lambda r: r.hit_rate, ".2f"),
                         (lambda r: r.ttft_quantile(0.5), ".2f"), (lambda r: r.ttft_quantile(0.99), ".2f")))])
    return table(rows)


def fleet_table(fleet: Fleet, jobs: Sequence[Job], seed: int, ray_models: int) -> str:
    rows = [["policy", "loads", "evictions", "hit rate", "refused", "TTFT p50 s", "TTFT p99 s"]]
    rows.append(result_row(simulate(fleet, jobs, "corral", seed=seed)))
    rows.extend(result_row(simulate(fleet, jobs, "ray", seed=seed, ray_models=count))
                for count in ray_counts(fleet, ray_models))
    return table(rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.benchmarks.fleet_sim", description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", type=int, help="nodes (with --models and --budget: only that fleet)")
    parser.add_argument("--models", type=int, help="models")
    parser.add_argument("--budget", type=float, help="memory budget per node, GB")
    parser.add_argument("--requests", type=int, default=4000, help="requests per fleet (default 4000)")
    parser.add_argument("--rate", type=float, default=2.0, help="requests per second per node (default 2)")
    parser.add_argument("--largest", type=float, default=16.0, help="the largest model, GB (default 16)")
    parser.add_argument("--seed", type=int, default=1, help="seed of traffic and of Ray's random draws")
    parser.add_argument("--seeds", type=int, default=10, help="seeds for the issue's 2 x 3 case (default 10)")
    parser.add_argument("--ray-models", type=int, default=0,
                        help="Ray's max_num_models_per_replica (default: budget/mean and budget/largest)")
    args = parser.parse_args(argv)
    given = [args.nodes, args.models, args.budget]
    if any(v is not None for v in given) and None in given:
        parser.error("--nodes, --models and --budget go together")
    if args.nodes is not None and min(args.nodes, args.models) < 1 or min(args.requests, args.seeds) < 1:
        parser.error("--nodes, --models, --requests and --seeds must be at least 1")
    if args.rate <= 0:
        parser.error("--rate must be above 0")
    started = time.perf_counter()
    print("## The issue's case: 2 nodes x 3 models (6, 5, 4 GB), 10 GB per node, m1 m3 m2 x 20, one at a time")
    print(f"medians over seeds {args.seed}..{args.seed + args.seeds - 1}\n")
    print(issue_table(range(args.seed, args.seed + args.seeds)))
    fleets = [tuple(given)] if args.nodes is not None else FLEETS
    for nodes, models, budget in fleets:
        fleet = zipf_fleet(nodes, models, budget, args.largest)
        jobs = zipf_traffic(fleet, args.requests, args.rate, args.seed)
        sizes = sorted(fleet.sizes.values())
        print(f"\n## {nodes} nodes x {models} models ({sizes[0] / GB:.2f}-{sizes[-1] / GB:.0f} GB, "
              f"{sum(sizes) / GB:.0f} GB in all), {budget:g} GB per node; {args.requests} requests at "
              f"{args.rate * nodes:g}/s, seed {args.seed}\n")
        print(fleet_table(fleet, jobs, args.seed, args.ray_models))
    print(f"\n({time.perf_counter() - started:.1f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
