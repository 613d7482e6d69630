"""What a node reports for routing and for the console, from its backend's status (no Ray)."""

from __future__ import annotations

from corral.backend.fleet.ranking import rank
from corral.backend.fleet.report import Counters, NodeSnapshot, node_report
from corral.backend.snapshot import Status
from fake_backend import FIXED_NOW, MiB, fixed_host, model_info


def status() -> Status:
    models = (
        model_info("old", state="ready", estimate_bytes=40 * MiB, measured_bytes=30 * MiB, last_used=FIXED_NOW - 60),
        model_info("new", state="ready", estimate_bytes=50 * MiB, last_used=FIXED_NOW - 5),
        model_info("held", state="ready", estimate_bytes=20 * MiB, pinned=True, last_used=FIXED_NOW - 90),
        model_info("running", state="busy", estimate_bytes=10 * MiB, in_flight=3, last_used=FIXED_NOW - 99),
        model_info("coming", state="loading", estimate_bytes=15 * MiB),
        model_info("cold", estimate_bytes=70 * MiB),
        model_info("broken", usable=False, error="bad file", estimate_bytes=None),
        model_info("alias", state="ready", source="alias", alias_of="old", estimate_bytes=40 * MiB, in_flight=0),
    )
    return Status(models, fixed_host(), 200 * MiB, 125 * MiB, 5)


def test_the_report_holds_what_the_manager_would_weigh() -> None:
    report = node_report("a", status())
    assert report.loaded == {"old": "ready", "new": "ready", "held": "ready", "running": "busy",
                             "coming": "loading", "alias": "ready"}
    assert "broken" not in report.catalog and report.catalog["cold"] == 70 * MiB  # estimates: what a load needs
    assert report.evictable == (("old", 30 * MiB), ("new", 50 * MiB))  # idle, unpinned, LRU first, measured
    assert (report.budget_bytes, report.used_bytes, report.ongoing, report.max_loaded) == (200 * MiB, 125 * MiB, 3, 5)


def test_a_report_survives_the_trip_through_ray_and_ranks() -> None:
    report = node_report("a", status())
    again = type(report).from_stats(report.to_stats())
    assert again == report
    assert rank([again], "cold") == [[again]]  # 6 loaded against max_loaded 5: it must evict to load it
    assert rank([again], "broken") == []


def test_a_snapshot_round_trips_as_a_dict() -> None:
    snapshot = NodeSnapshot("a", status(), Counters(requests=10, hits=7, loads=2, evictions=1), FIXED_NOW)
    again = NodeSnapshot.from_dict(snapshot.to_dict())
    assert again == snapshot and again.counters.hit_rate == 0.7 and again.report == node_report("a", status())
