"""The fleet simulation's core (tests/benchmarks/fleet_model.py): the issue's 2 x 3 case, and a
small open-loop fleet where every request ends served or refused. No Ray."""

from __future__ import annotations

from benchmarks.fleet_model import GB, Fleet, Job, simulate
from benchmarks.fleet_sim import issue_case, zipf_fleet, zipf_traffic


def test_issue_case_corral_loads_each_model_once_and_ray_lru_thrashes() -> None:
    fleet, jobs = issue_case()
    corral = simulate(fleet, jobs, "corral", closed_loop=True)
    assert corral.requests == 60 and corral.refused == 0
    assert corral.loads <= 4 and corral.hits >= 56
    # Ray's count LRU (2 models a replica) agrees with the byte budget only when its random
    # pick puts m3 and m2 together; otherwise the issue's 41 loads for 60 requests.
    ray = [simulate(fleet, jobs, "ray", seed=seed, ray_models=2, closed_loop=True).loads for seed in range(10)]
    assert 41 in ray and set(ray) <= {3, 41}


def test_open_loop_fleet_serves_or_refuses_every_request_within_budget() -> None:
    fleet = zipf_fleet(nodes=3, models=9, budget_gb=20, largest_gb=16)
    jobs = zipf_traffic(fleet, requests=600, rate_per_node=2.0, seed=7)
    assert [j.at for j in jobs] == sorted(j.at for j in jobs)
    results = [simulate(fleet, jobs, policy, seed=7, ray_models=count) for policy, count in (("corral", 0), ("ray", 3))]
    for result in results:
        assert result.requests == 600
        assert len(result.ttft) + result.refused == 600
        assert result.loads > 9 and fleet.budget - 3 * GB < result.peak_bytes <= fleet.budget
        assert 0 < result.hits <= 600 and result.ttft_quantile(0.5) <= result.ttft_quantile(0.99)
    again = simulate(fleet, jobs, "ray", seed=7, ray_models=3)
    assert (again.loads, again.ttft) == (results[1].loads, results[1].ttft)  # seeded: the same run


def test_a_model_larger_than_every_budget_is_refused_not_loaded() -> None:
    fleet = Fleet(nodes=2, sizes={"big": 12 * GB, "small": 2 * GB}, budget=10 * GB)
    jobs = [Job(0.0, "big", 0.1, 1.0), Job(0.0, "small", 0.1, 1.0)]
    for policy in ("corral", "ray"):
        result = simulate(fleet, jobs, policy, ray_models=2, closed_loop=True)
        assert (result.refused, result.loads, len(result.ttft)) == (1, 1, 1)
