"""The fleet's routing rank on fake node reports: no Ray, no models."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from corral.backend.fleet.ranking import Fit, NodeReport, Routed, fit, rank

GB = 10**9
CATALOG = {"m1": 6 * GB, "m2": 5 * GB, "m3": 4 * GB}


def node(name: str, loaded: dict[str, str] | None = None, *, ongoing: int = 0, budget: int = 10 * GB,
         evictable: list[tuple[str, int]] | None = None, catalog: dict[str, int] | None = None,
         max_loaded: int = 0) -> NodeReport:
    """A node holding `loaded` (bytes from the catalog); every ready model is evictable, in
    the order given, unless `evictable` says otherwise."""
    loaded = loaded or {}
    catalog = CATALOG if catalog is None else catalog
    if evictable is None:
        evictable = [(m, catalog[m]) for m, state in loaded.items() if state == "ready"]
    return NodeReport(node=name, loaded=loaded, catalog=catalog, budget_bytes=budget,
                      used_bytes=sum(catalog[m] for m in loaded), evictable=evictable, ongoing=ongoing,
                      max_loaded=max_loaded)


def names(groups: list[list[NodeReport]]) -> list[list[str]]:
    return [[r.node for r in group] for group in groups]


def test_groups_go_loaded_then_loading_then_room_then_eviction() -> None:
    reports = [
        node("evicts", {"m1": "ready"}),                 # 6 + 5 > 10: must evict m1
        node("room", {"m3": "ready"}),                   # 4 + 5 <= 10
        node("loading", {"m2": "loading"}, ongoing=3),
        node("busy", {"m2": "busy"}, ongoing=7),
        node("ready", {"m2": "ready"}, ongoing=1),
    ]
    assert names(rank(reports, "m2")) == [["ready", "busy"], ["loading"], ["room"], ["evicts"]]


def test_least_busy_first_inside_a_group_and_ties_by_node() -> None:
    reports = [node("c", ongoing=2), node("b", ongoing=0), node("a", ongoing=2)]
    assert names(rank(reports, "m1")) == [["b", "a", "c"]]


def test_a_busier_loaded_node_still_beats_an_idle_empty_one() -> None:
    reports = [node("empty", ongoing=0), node("holds", {"m1": "busy"}, ongoing=40)]
    assert names(rank(reports, "m1")) == [["holds"], ["empty"]]


def test_fewest_bytes_evicted_first_each_amount_its_own_group() -> None:
    # Both hold m1 and m3 under 11 GB; m2 (5 GB) needs 4 GB freed. "a" may only evict m1
    # (6 GB), "b" only m3 (4 GB): "b" goes first however busy, in a group of its own, so
    # Ray's least-busy pick inside a group never prefers the larger eviction.
    a = node("a", {"m1": "ready", "m3": "ready"}, budget=11 * GB, ongoing=0, evictable=[("m1", 6 * GB)])
    b = node("b", {"m1": "ready", "m3": "ready"}, budget=11 * GB, ongoing=9, evictable=[("m3", 4 * GB)])
    c = node("c", {"m1": "busy", "m3": "ready"}, budget=11 * GB, ongoing=2, evictable=[("m3", 4 * GB)])
    assert fit(a, "m2") == Fit(3, 6 * GB, ("m1",))
    assert fit(b, "m2") == Fit(3, 4 * GB, ("m3",))
    assert names(rank([a, b, c], "m2")) == [["c", "b"], ["a"]]


def test_eviction_takes_the_lru_order_the_manager_uses() -> None:
    # The manager evicts least recently used first until the model fits, even where the
    # later, larger model alone would have been enough (m2 alone frees 5 + 1 = 6 GB).
    report = node("n", {"m3": "ready", "m2": "ready"},
                  evictable=[("m3", 4 * GB), ("m2", 5 * GB)])
    assert fit(report, "m1") == Fit(3, 9 * GB, ("m3", "m2"))


def test_never_a_node_without_the_model_or_without_room() -> None:
    no_file = node("no-file", catalog={"m2": 5 * GB})
    pinned = node("pinned", {"m2": "ready", "m3": "ready"}, evictable=[])  # 9 GB held, nothing to evict
    serving = node("serving", {"m2": "busy", "m3": "ready"}, evictable=[("m3", 4 * GB)])  # 5 + 6 > 10
    too_big = node("too-big", budget=5 * GB)
    assert rank([no_file, pinned, serving, too_big], "m1") == []
    assert fit(no_file, "m1") is None and fit(serving, "m1") is None
    assert rank([no_file], "unknown") == []


def test_max_loaded_forces_an_eviction_even_with_bytes_free() -> None:
    report = node("n", {"m3": "ready"}, budget=100 * GB, max_loaded=1)
    assert fit(report, "m2") == Fit(3, 4 * GB, ("m3",))
    stuck = node("n", {"m3": "busy"}, budget=100 * GB, max_loaded=1)
    assert fit(stuck, "m2") is None


def test_stats_round_trip_through_json_and_tolerate_missing_keys() -> None:
    report = node("host-a", {"m1": "ready", "m3": "loading"}, ongoing=4, budget=20 * GB, max_loaded=3)
    again = NodeReport.from_stats(json.loads(json.dumps(report.to_stats())))
    assert again == NodeReport(node="host-a", loaded=report.loaded, catalog=report.catalog,
                               budget_bytes=report.budget_bytes, used_bytes=report.used_bytes,
                               evictable=tuple(report.evictable), ongoing=4, max_loaded=3)
    assert rank([again], "m3") == [[again]]

    blank = NodeReport.from_stats({})
    assert (blank.node, blank.loaded, blank.catalog, blank.budget_bytes, blank.ongoing) == ("", {}, {}, 0, 0)
    assert rank([blank], "m1") == []  # a node that has not reported yet is never chosen
    partial = NodeReport.from_stats({"node": "b", "catalog": {"m1": 6}, "budget_bytes": 10})
    assert rank([partial], "m1") == [[partial]]


def test_malformed_stats_name_the_node_and_the_problem() -> None:
    with pytest.raises(ValueError, match=r"node 'x'.*NodeReport.to_stats"):
        NodeReport.from_stats({"node": "x", "catalog": {"m1": "six"}})
    with pytest.raises(ValueError, match="node 'y'"):
        NodeReport.from_stats({"node": "y", "evictable": [["m1"]]})


def test_ranking_imports_without_ray() -> None:
    code = ("import sys; import corral.backend.fleet.ranking; "
            "assert 'ray' not in sys.modules, sorted(m for m in sys.modules if m.startswith('ray'))")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_routed_models_count_as_loading_until_reported_or_forgotten() -> None:
    routed = Routed(memory_s=5.0)
    a, b = node("a"), node("b", ongoing=1)
    routed.sent("a", "m1", now=10.0)
    seen = routed.overlay(a, now=10.5)
    assert seen.loaded == {"m1": "loading"} and seen.used_bytes == 6 * GB
    # a burst for m1 follows the first request, not the idler node; m2 no longer fits beside it
    assert names(rank([seen, routed.overlay(b, now=10.5)], "m1")) == [["a"], ["b"]]
    assert names(rank([seen, b], "m2")) == [["b"]]  # a loading model is never evicted
    assert routed.overlay(b, now=10.5) is b

    reported = node("a", {"m1": "ready"})
    assert routed.overlay(reported, now=11.0) is reported  # the report shows it: forgotten
    assert routed.overlay(a, now=11.0) is a

    routed.sent("a", "m2", now=20.0)
    routed.sent("a", "not-here", now=20.0)  # a model outside the node's catalog is never added
    assert routed.overlay(a, now=24.0).loaded == {"m2": "loading"}
    assert routed.overlay(a, now=25.5) is a  # older than memory_s
