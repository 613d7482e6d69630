"""The model manager against real llama.cpp loads of tiny random-weight GGUFs."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from corral.backend.generation import Decoding, SamplingParams
from corral.backend.errors import (BadRequest, BudgetExceeded, CorralError, IllegalTransition, LoadFailed,
                                   ModelBusy, ModelNotFound, ModelPinned)
from corral.backend.events import EventBus, LoadProgress, ModelLoaded, RequestFinished, StateChanged
from corral.backend.manager import Manager
from corral.backend.metrics import Metrics
from corral.backend.records import ALLOWED, State
from corral.backend.snapshot import ModelInfo, RequestPercentiles, percentile
from corral.backend.telemetry import Telemetry
from fake_nvml import GIB, FakeNVML
from managers import kv_heavy_dir, make_settings, state
from ggufs import (write_bad_magic, write_corrupt_header, write_tiny_llama, write_truncated,
                   write_unknown_arch)


async def generate(manager: Manager, name: str, prompt: str = "Once upon a time", **params: Any) -> str:
    async with manager.lease(name) as lease:
        tokens = lease.engine.weights.tokenize(prompt, add_special=True)
        sampling = SamplingParams(**{"max_tokens": 8, "temperature": 0.0, **params})
        return "".join([c.text async for c in lease.engine.stream(tokens, Decoding(sampling))])


# -- lifecycle ---------------------------------------------------------------------------


async def test_every_lifecycle_transition_is_one_event(model_dir: Path, running: Any) -> None:
    manager, events = await running(make_settings(model_dir))
    await manager.load("tiny-a")
    lease = await manager.acquire("tiny-a")
    assert state(manager, "tiny-a") == "busy"
    await manager.release(lease)
    await manager.evict("tiny-a")
    await events.settle()
    assert events.states("tiny-a") == [
        ("available", "loading"), ("loading", "ready"), ("ready", "busy"),
        ("busy", "ready"), ("ready", "unloading"), ("unloading", "available"),
    ]


async def test_failed_load_then_retry_then_clear(tmp_path: Path, running: Any) -> None:
    models = tmp_path / "models"
    models.mkdir()
    bad = write_bad_magic(models / "flaky.gguf")
    manager, events = await running(make_settings(models))

    with pytest.raises(CorralError) as failure:
        await manager.load("flaky")
    assert str(bad) in str(failure.value) and "not a GGUF file" in str(failure.value)
    info = manager.info(manager.record("flaky"))
    assert info.state == "failed" and "not a GGUF file" in (info.error or "")

    write_tiny_llama(bad, name="flaky")  # the operator fixes the file: failed → loading works
    await manager.load("flaky")
    assert state(manager, "flaky") == "ready"

    write_bad_magic(models / "broken.gguf")
    await manager.rescan()
    with pytest.raises(CorralError):
        await manager.load("broken")
    await manager.evict("broken")  # evicting a failed model clears it
    await events.settle()
    assert events.states("flaky") == [("available", "loading"), ("loading", "failed"),
                                      ("failed", "loading"), ("loading", "ready")]
    assert events.states("broken")[-1] == ("failed", "available")


async def test_illegal_transition_raises_and_changes_nothing(model_dir: Path, running: Any) -> None:
    manager, _ = await running(make_settings(model_dir))
    record = manager.record("tiny-a")
    with pytest.raises(IllegalTransition, match="available → ready"):
        manager._transition(record, State.READY)
    assert record.state == State.AVAILABLE
    assert all(State.AVAILABLE not in targets for s, targets in ALLOWED.items() if s != State.UNLOADING
               and s != State.FAILED)


async def test_load_progress_and_loaded_event(model_dir: Path, running: Any) -> None:
    manager, events = await running(make_settings(model_dir))
    info = await manager.load("tiny-a")
    await events.settle()
    percents = [e.percent for e in events.events if isinstance(e, LoadProgress)]
    assert percents and percents[-1] == 100 and percents == sorted(set(percents))
    loaded = [e for e in events.events if isinstance(e, ModelLoaded)]
    assert len(loaded) == 1 and loaded[0].estimate_bytes == info.estimate_bytes
    assert info.measured_bytes is not None and info.load_seconds is not None
    assert info.chat_template == "fallback:llama2"


# -- single flight and auto-load ---------------------------------------------------------


async def test_single_flight_for_concurrent_cold_requests(model_dir: Path, running: Any) -> None:
    manager, events = await running(make_settings(model_dir, defaults={"n_parallel": 4}))
    texts = await asyncio.gather(*[generate(manager, "tiny-b") for _ in range(12)])
    await events.settle()
    assert events.states("tiny-b").count(("available", "loading")) == 1
    assert len(set(texts)) == 1 and texts[0]  # greedy: every request got the same real text
    assert state(manager, "tiny-b") == "ready"
    assert manager.record("tiny-b").in_flight == 0


async def test_unknown_model_names_the_known_ones(model_dir: Path, running: Any) -> None:
    manager, _ = await running(make_settings(model_dir))
    with pytest.raises(ModelNotFound) as err:
        await manager.acquire("nope")
    assert "tiny-a, tiny-b, tiny-c" in str(err.value)


# -- budgets and eviction ----------------------------------------------------------------


async def test_lru_eviction_by_max_loaded(model_dir: Path, running: Any) -> None:
    manager, events = await running(make_settings(model_dir, budgets={"max_loaded": 2}))
    await manager.load("tiny-a")
    await manager.load("tiny-b")
    await generate(manager, "tiny-a")  # a is now more recently used than b
    await manager.load("tiny-c")
    assert [state(manager, n) for n in ("tiny-a", "tiny-b", "tiny-c")] == ["ready", "available", "ready"]
    await events.settle()
    assert "evicted (least recently used) to make room for tiny-c" in events.reasons("tiny-b")


async def test_evictions_and_failed_loads_are_counted_by_reason(model_dir: Path, tmp_path: Path,
                                                                running: Any) -> None:
    shutil.copytree(model_dir, tmp_path / "counted")
    write_bad_magic(tmp_path / "counted" / "broken.gguf")
    manager, events = await running(make_settings(tmp_path / "counted", budgets={"max_loaded": 2}))
    await manager.load("tiny-a")
    await manager.load("tiny-b")
    await manager.load("tiny-c")  # tiny-a is the least recently used: out for max_loaded
    await manager.evict("tiny-b")
    with pytest.raises(CorralError):
        await manager.load("broken")
    tight, refusals = await running(make_settings(model_dir, budgets={"ram_bytes": "1MiB"}))
    with pytest.raises(BudgetExceeded):
        await tight.load("tiny-a")
    await events.settle()
    await refusals.settle()
    metrics = Metrics()
    for event in events.events + refusals.events:
        metrics.observe(event)

    def counted(name: str, model: str, reason: str) -> float | None:
        return metrics.registry.get_sample_value(f"corral_{name}_total", {"model": model, "reason": reason})

    assert counted("evictions", "tiny-a", "max_loaded") == 1 and counted("evictions", "tiny-b", "operator") == 1
    assert counted("load_failures", "broken", "file") == 1 and counted("load_failures", "tiny-a", "budget") == 1
    unloading = [e for e in events.events if isinstance(e, StateChanged) and e.new == "unloading"]
    assert [(e.model, e.cause) for e in unloading] == [("tiny-a", "max_loaded"), ("tiny-b", "operator")]


async def test_a_quantized_kv_cache_loads_answers_and_is_counted_smaller(tmp_path: Path, running: Any) -> None:
    write_tiny_llama(tmp_path / "kvq" / "wide.gguf", name="wide", n_embd=128, n_head=4, n_kv_head=2)  # heads of 32
    f16, _ = await running(make_settings(tmp_path / "kvq"))
    plain = f16.info(f16.record("wide"))
    q8, _ = await running(make_settings(tmp_path / "kvq", defaults={"type_k": "q8_0", "type_v": "q8_0"}))
    info = await q8.load("wide")
    assert info.kv_types == "q8_0/q8_0" and plain.kv_types == "f16"
    assert info.estimate_detail["kv_cache"] == plain.estimate_detail["kv_cache"] * 34 // 64  # 34-byte blocks of 32
    async with q8.lease("wide") as lease:
        sampling = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
        chunks = [c async for c in lease.engine.stream(lease.engine.weights.tokenize("Once", add_special=True),
                                                         Decoding(sampling))]
    assert chunks[-1].stats is not None and chunks[-1].stats.completion_tokens == 8


async def test_a_smaller_n_ubatch_is_counted_and_still_answers_long_prompts(model_dir: Path, running: Any) -> None:
    whole, _ = await running(make_settings(model_dir, defaults={"n_batch": 64}))
    small, _ = await running(make_settings(model_dir, defaults={"n_batch": 64, "n_ubatch": 8}))
    assert (small.info(small.record("tiny-a")).estimate_detail["compute"]
            < whole.info(whole.record("tiny-a")).estimate_detail["compute"])
    await small.load("tiny-a")
    async with small.lease("tiny-a") as lease:
        prompt = lease.engine.weights.tokenize("Once upon a time " * 8, add_special=True)  # several micro-batches
        sampling = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
        chunks = [c async for c in lease.engine.stream(prompt, Decoding(sampling))]
    assert len(prompt) > 16 and chunks[-1].stats is not None and chunks[-1].stats.completion_tokens == 4


async def test_lru_eviction_by_ram_budget(tmp_path: Path, running: Any) -> None:
    models = kv_heavy_dir(tmp_path / "models")
    probe, _ = await running(make_settings(models, defaults={"n_ctx": 16384}))
    one = await probe.load("big-a")
    await probe.close()
    assert one.measured_bytes and one.measured_bytes > 48 * 2**20, one
    # Room for one model plus half of another: every second load must evict.
    budget = one.estimate_bytes + one.measured_bytes // 2
    manager, events = await running(make_settings(models, defaults={"n_ctx": 16384},
                                                  budgets={"ram_bytes": budget, "max_loaded": 10}))
    await manager.load("big-a")
    await manager.load("big-b")
    assert state(manager, "big-a") == "available" and state(manager, "big-b") == "ready"
    assert manager.ram_reserved() <= budget
    await events.settle()
    assert any("to make room for big-b" in r for r in events.reasons("big-a"))


async def test_pinned_model_survives_pressure(model_dir: Path, running: Any) -> None:
    manager, _ = await running(make_settings(model_dir, budgets={"max_loaded": 2}))
    await manager.load("tiny-a")
    await manager.pin("tiny-a")
    await manager.load("tiny-b")
    await manager.load("tiny-c")  # a is least recently used but pinned: b goes
    assert [state(manager, n) for n in ("tiny-a", "tiny-b", "tiny-c")] == ["ready", "available", "ready"]
    with pytest.raises(ModelPinned):
        await manager.evict("tiny-a")
    await manager.evict("tiny-a", force=True)
    assert state(manager, "tiny-a") == "available"


async def test_busy_model_is_never_evicted_and_refusal_names_numbers(model_dir: Path, running: Any) -> None:
    manager, _ = await running(make_settings(model_dir, budgets={"max_loaded": 1}))
    lease = await manager.acquire("tiny-a")
    with pytest.raises(BudgetExceeded) as refused:
        await manager.load("tiny-b")
    message = str(refused.value)
    assert "max_loaded = 1" in message and "tiny-a (busy)" in message and "tiny-b" in message
    assert state(manager, "tiny-a") == "busy" and state(manager, "tiny-b") == "available"
    await manager.release(lease)
    await manager.load("tiny-b")  # now a is idle and goes
    assert state(manager, "tiny-a") == "available" and state(manager, "tiny-b") == "ready"


async def test_model_larger_than_budget_is_refused_with_bytes(model_dir: Path, running: Any) -> None:
    manager, _ = await running(make_settings(model_dir, budgets={"ram_bytes": "1MiB"}))
    with pytest.raises(BudgetExceeded) as refused:
        await manager.load("tiny-a")
    assert refused.value.needed > 2**20
    assert "MiB" in str(refused.value) and "RAM budget is 1.0 MiB" in str(refused.value)
    assert state(manager, "tiny-a") == "available"


async def test_operator_evict_of_busy_model_drains_first(model_dir: Path, running: Any) -> None:
    manager, events = await running(make_settings(model_dir))
    lease = await manager.acquire("tiny-a")
    evicting = asyncio.create_task(manager.evict("tiny-a"))
    await asyncio.sleep(0.2)
    assert not evicting.done() and state(manager, "tiny-a") == "busy"
    await manager.release(lease)
    await asyncio.wait_for(evicting, 5)
    assert state(manager, "tiny-a") == "available"


async def test_an_unload_hands_freed_memory_back_to_the_os(model_dir: Path, running: Any,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """glibc keeps a freed context's buffers resident until `malloc_trim`; every unload calls it
    (tests/test_memory_release.py shows what the call does)."""
    trims: list[str] = []
    monkeypatch.setattr("corral.backend.admission.return_free_memory", lambda: trims.append(state(manager, "tiny-a")))
    manager, events = await running(make_settings(model_dir))
    await manager.load("tiny-a")
    assert trims == []
    await manager.evict("tiny-a")
    assert trims == ["unloading"]  # after the context is freed, before the model is available


# -- keep-alive --------------------------------------------------------------------------


async def test_idle_ttl_unloads(model_dir: Path, running: Any) -> None:
    manager, events = await running(make_settings(model_dir, defaults={"keep_alive": 0.3}))
    await generate(manager, "tiny-a")
    assert manager.info(manager.record("tiny-a")).ttl_left_s is not None
    await events.wait_for(lambda: state(manager, "tiny-a") == "available", timeout=5)
    assert any("keep_alive" in r for r in events.reasons("tiny-a"))


async def test_per_request_keep_alive_overrides_model_ttl(model_dir: Path, running: Any) -> None:
    manager, events = await running(make_settings(model_dir))  # default: keep forever
    async with manager.lease("tiny-a", keep_alive=0.2):
        pass
    await manager.load("tiny-b")
    await events.wait_for(lambda: state(manager, "tiny-a") == "available", timeout=5)
    await asyncio.sleep(0.5)
    assert state(manager, "tiny-b") == "ready"


async def test_load_with_keep_alive_zero_unloads_once_idle(model_dir: Path, running: Any) -> None:
    manager, events = await running(make_settings(model_dir))  # default: keep forever
    info = await manager.load("tiny-a", keep_alive=0)
    assert info.keep_alive_s == 0
    await events.wait_for(lambda: state(manager, "tiny-a") == "available", timeout=5)
    assert manager.info(manager.record("tiny-a")).keep_alive_s == -1  # the override ends with the load


async def test_load_with_keep_alive_sets_the_ttl(model_dir: Path, running: Any) -> None:
    manager, _ = await running(make_settings(model_dir))
    await manager.load("tiny-a")
    info = await manager.load("tiny-a", keep_alive="10m")  # already loaded: only the keep-alive changes
    assert info.state == "ready" and info.keep_alive_s == 600 and 590 < info.ttl_left_s <= 600
    forever = await manager.load("tiny-a", keep_alive="-1")
    assert forever.keep_alive_s == -1 and forever.ttl_left_s is None
    with pytest.raises(BadRequest, match="keep_alive = 'soon'"):
        await manager.load("tiny-a", keep_alive="soon")


async def test_pinned_model_does_not_expire(model_dir: Path, running: Any) -> None:
    manager, _ = await running(make_settings(model_dir, defaults={"keep_alive": 0.1}))
    await manager.load("tiny-a")
    await manager.pin("tiny-a")
    await asyncio.sleep(0.5)
    assert state(manager, "tiny-a") == "ready"


# -- start-up and bad files --------------------------------------------------------------


async def test_preload_at_start(model_dir: Path, running: Any) -> None:
    manager, events = await running(make_settings(model_dir, preload=["tiny-c", "missing-model"]))
    await events.wait_for(lambda: state(manager, "tiny-c") == "ready")
    await events.wait_for(lambda: any("preload failed" in getattr(e, "message", "") for e in events.events))


@pytest.mark.parametrize("breakage", ["missing", "truncated", "not-gguf", "corrupt-header", "unknown-arch"])
async def test_bad_file_fails_with_reason_and_others_keep_serving(
        tmp_path: Path, running: Any, breakage: str) -> None:
    models = tmp_path / "models"
    good = write_tiny_llama(models / "good.gguf", name="good")
    bad = tmp_path / "bad.gguf"
    if breakage == "truncated":
        write_truncated(good, bad)
    elif breakage == "not-gguf":
        write_bad_magic(bad)
    elif breakage == "corrupt-header":
        write_corrupt_header(good, bad)
    elif breakage == "unknown-arch":
        write_unknown_arch(bad)
    manager, _ = await running(make_settings(models, models=[{"name": "bad", "path": str(bad)}]))
    before = await generate(manager, "good")
    lease = await manager.acquire("good")  # a request in flight on another model
    with pytest.raises(CorralError) as failure:
        await manager.load("bad")
    message = str(failure.value)
    assert "'bad'" in message and str(bad) in message
    expected = {"missing": "file not found", "truncated": "truncated", "not-gguf": "not a GGUF file",
                "corrupt-header": "corrupt", "unknown-arch": "architecture 'notanarch'"}[breakage]
    assert expected in message
    info = manager.info(manager.record("bad"))
    assert info.state == "failed" and expected in (info.error or "")
    assert state(manager, "good") == "busy"
    await manager.release(lease)
    assert await generate(manager, "good") == before


async def test_file_removed_after_scan_fails_cleanly(tmp_path: Path, running: Any, tiny_gguf: Any) -> None:
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(tiny_gguf("vanishing"), models / "vanishing.gguf")
    manager, _ = await running(make_settings(models))
    (models / "vanishing.gguf").unlink()
    with pytest.raises(CorralError, match="file not found"):
        await manager.load("vanishing")
    assert state(manager, "vanishing") == "failed"


class StepGPU:
    """An NVML stand-in with one GPU whose used memory grows by 512 MiB per query, as if
    each load put that much on it."""

    import pynvml as _pynvml

    NVMLError = _pynvml.NVMLError

    def __init__(self) -> None:
        self.used = 0

    def nvmlInit(self) -> None: ...
    def nvmlShutdown(self) -> None: ...
    def nvmlDeviceGetCount(self) -> int:
        return 1

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> Any:
        from types import SimpleNamespace

        total = 16 * 2**30
        info = SimpleNamespace(total=total, used=self.used, free=total - self.used)
        self.used += 512 * 2**20
        return info


async def test_vram_taken_by_a_load_is_measured_per_gpu(model_dir: Path) -> None:
    from corral.backend.telemetry import Telemetry

    bus = EventBus()
    manager = Manager(make_settings(model_dir), bus, telemetry=Telemetry(nvml=StepGPU()))
    await manager.start()
    try:
        info = await manager.load("tiny-a")
        assert info.measured_vram == {0: 512 * 2**20}
    finally:
        await manager.close()
    cpu_only = Manager(make_settings(model_dir), EventBus())
    await cpu_only.start()
    try:
        assert (await cpu_only.load("tiny-a")).measured_vram is None  # no GPU here
    finally:
        await cpu_only.close()


async def test_concurrent_unloads_of_one_model_do_not_collide(model_dir: Path, running: Any) -> None:
    manager, events = await running(make_settings(model_dir, defaults={"keep_alive": 0.05}))
    lease = await manager.acquire("tiny-a")
    evictions = [asyncio.create_task(manager.evict("tiny-a")) for _ in range(2)]
    await asyncio.sleep(0.05)
    await manager.release(lease)  # the reaper, and both evicts, now all want it gone
    await asyncio.wait_for(asyncio.gather(*evictions), 5)
    assert state(manager, "tiny-a") == "available"
    await events.settle()
    assert events.states("tiny-a").count(("ready", "unloading")) + events.states("tiny-a").count(
        ("busy", "unloading")) == 1


async def test_unload_all_goes_past_a_busy_model(model_dir: Path, running: Any) -> None:
    manager, _ = await running(make_settings(model_dir, budgets={"drain_timeout": 0.1}))
    for name in ("tiny-a", "tiny-b", "tiny-c"):
        await manager.load(name)
    lease = await manager.acquire("tiny-a")
    with pytest.raises(ModelBusy, match="left loaded: tiny-a"):
        await manager.unload_all()
    assert [state(manager, n) for n in ("tiny-a", "tiny-b", "tiny-c")] == ["busy", "available", "available"]
    await manager.release(lease)


async def test_a_name_clash_leaves_the_winner_usable(model_dir: Path, tmp_path: Path, running: Any) -> None:
    other = write_tiny_llama(tmp_path / "elsewhere" / "other.gguf", name="other", seed=9)
    manager, _ = await running(make_settings(model_dir, models=[{"name": "tiny-a", "path": str(other)}]))
    info = await manager.load("tiny-a")  # the [[models]] entry wins over tiny-a.gguf in the dir
    assert info.state == "ready" and info.path == str(other)


async def test_pin_toggle_on_an_unloaded_model_sets_no_expiry(model_dir: Path, running: Any) -> None:
    manager, _ = await running(make_settings(model_dir, defaults={"keep_alive": 0.01}))
    await manager.pin("tiny-a")
    await manager.pin("tiny-a", False)
    assert manager.record("tiny-a").expires_at is None


# -- recent request timings ------------------------------------------------------------------


async def test_recent_requests_give_latency_and_ttft_percentiles(model_dir: Path, running: Any) -> None:
    manager, events = await running(make_settings(model_dir))
    assert manager.info(manager.record("tiny-a")).requests is None
    for _ in range(3):
        await generate(manager, "tiny-a", max_tokens=4, ignore_eos=True)
    # an embeddings request and another model's requests are not counted here
    manager.bus.publish(RequestFinished(model="tiny-a", finish_reason="embeddings", prompt_tokens=3,
                                        completion_tokens=0, ttft_s=None, duration_s=9.0, tokens_per_s=None))
    await generate(manager, "tiny-b", max_tokens=2)
    await events.wait_for(lambda: manager.info(manager.record("tiny-b")).requests is not None)
    stats = manager.info(manager.record("tiny-a")).requests
    assert stats is not None and stats.count == 3
    assert stats.ttft_p50 is not None and 0 < stats.ttft_p50 <= stats.ttft_p99 <= stats.latency_p99
    assert stats.latency_p50 is not None and stats.latency_p50 < 9.0
    assert stats.tokens_per_s_p50 is not None and stats.tokens_per_s_p50 > 0


def test_percentiles_are_nearest_rank() -> None:
    assert percentile([], 50) is None
    values = [float(v) for v in range(1, 101)]
    assert (percentile(values, 50), percentile(values, 90), percentile(values, 99)) == (50.0, 90.0, 99.0)
    assert percentile([0.3, 0.1, 0.2], 50) == 0.2
    stats = RequestPercentiles.of([0.1], [0.5, 1.5], [])
    assert (stats.count, stats.ttft_p99, stats.latency_p50, stats.tokens_per_s_p50) == (2, 0.1, 0.5, None)


def test_model_info_round_trips_its_percentiles_through_a_dict() -> None:
    import json

    stats = RequestPercentiles.of([0.05, 0.07], [0.5, 0.9], [60.0, 62.0])
    info = ModelInfo.from_dict(json.loads(json.dumps(_info_dict(requests=stats, oldest_wait_s=1.5))))
    assert info.requests == stats and info.oldest_wait_s == 1.5
    old_server = _info_dict()
    del old_server["requests"], old_server["oldest_wait_s"]
    assert ModelInfo.from_dict(old_server).requests is None


def _info_dict(**fields: Any) -> dict[str, Any]:
    from dataclasses import fields as dataclass_fields

    values: dict[str, Any] = {f.name: None for f in dataclass_fields(ModelInfo)}
    values.update(name="m", state="available", source="dir", usable=True, n_ctx=256, n_parallel=1,
                  pinned=False, keep_alive_s=300.0, in_flight=0, active=0, queued=0, tokens_per_s=0.0,
                  oldest_wait_s=0.0)
    values.update(fields)
    return ModelInfo(**values).to_dict()


# -- GPU placement, with a fake NVML -------------------------------------------------------


class AllocatingGPU(FakeNVML):
    """One fake 24 GiB GPU on which a load takes memory the way a real one does: `arm` before
    a load, and the memory shows as used from the query after the one that measures 'before'."""

    def __init__(self, free: int = 20 * GIB) -> None:
        super().__init__([dict(name="Fake GPU", uuid="GPU-fake", util=0, total=24 * GIB, used=24 * GIB - free,
                               temp=40, power_mw=50_000, limit_mw=300_000)])
        self.held: dict[str, int] = {}
        self._armed: tuple[str, int] | None = None
        self._queries_since_arming = 0

    def arm(self, name: str, nbytes: int) -> None:
        self._armed, self._queries_since_arming = (name, nbytes), 0

    def free(self, name: str) -> None:
        self.devices[0]["used"] -= self.held.pop(name, 0)

    def nvmlDeviceGetMemoryInfo(self, handle: Any) -> Any:
        if self._armed is not None:
            self._queries_since_arming += 1
            if self._queries_since_arming == 2:
                name, nbytes = self._armed
                self.held[name], self._armed = nbytes, None
                self.devices[0]["used"] += nbytes
        return super().nvmlDeviceGetMemoryInfo(handle)


class GPUManager(Manager):
    """The real manager over real (CPU) llama.cpp loads, with the fake GPU's memory following
    each placement, and optionally a CUDA out-of-memory for the first loads offloading layers."""

    def __init__(self, settings: Any, bus: EventBus, gpu: AllocatingGPU, ooms: int = 0) -> None:
        super().__init__(settings, bus, telemetry=Telemetry(nvml=gpu))
        self.gpu, self.ooms, self.opened = gpu, ooms, []

    def _open(self, r: Any, placement: Any) -> Any:
        self.opened.append((r.name, placement.gpu, placement.n_gpu_layers))
        if placement.n_gpu_layers and self.ooms:
            self.ooms -= 1
            raise LoadFailed(f"{r.entry.path}: llama.cpp could not load this file: ggml_backend_cuda_buffer_type"
                             "_alloc_buffer: allocating 4096.00 MiB on device 0: cudaMalloc failed: out of memory")
        self.gpu.arm(r.name, placement.vram)
        return super()._open(r, placement)

    async def _close_engine(self, r: Any, reason: str) -> None:
        await super()._close_engine(r, reason)
        self.gpu.free(r.name)


def on_gpu(ooms: int = 0) -> Callable[[Any, EventBus], GPUManager]:
    """A `running` factory: a GPUManager on a fresh fake GPU."""
    return lambda settings, bus: GPUManager(settings, bus, AllocatingGPU(), ooms)


async def test_a_load_is_placed_on_the_gpu_and_shown(model_dir: Path, running: Any) -> None:
    manager, events = await running(make_settings(model_dir), on_gpu())
    info = await manager.load("tiny-a")
    assert (info.gpu, info.gpu_layers, info.gpu_layers_total) == (0, 3, 3)  # 2 blocks + the output head
    assert manager.opened == [("tiny-a", 0, 3)]
    assert info.placement and info.placement.startswith("all 3 layers on GPU 0")
    assert info.measured_vram == {0: info.vram_estimate_bytes}
    await events.settle()
    assert events.reasons("tiny-a")[0] == info.placement  # available → loading says where it goes
    assert ModelInfo.from_dict(info.to_dict()) == info
    await manager.evict("tiny-a")
    assert manager.info(manager.record("tiny-a")).placement is None


async def test_without_a_gpu_the_load_goes_to_the_cpu_with_the_reason(model_dir: Path, running: Any) -> None:
    manager, _ = await running(make_settings(model_dir))
    info = await manager.load("tiny-a")
    assert (info.gpu, info.gpu_layers) == (None, 0)
    assert info.placement and info.placement.startswith("CPU: no GPU (")


async def test_forced_layers_and_cpu_from_the_config(model_dir: Path, running: Any) -> None:
    settings = make_settings(model_dir, models=[
        {"name": "tiny-a", "path": str(model_dir / "tiny-a.gguf"), "n_gpu_layers": 1},
        {"name": "tiny-b", "path": str(model_dir / "tiny-b.gguf"), "n_gpu_layers": 0}])
    manager, _ = await running(settings, on_gpu())
    a, b = await manager.load("tiny-a"), await manager.load("tiny-b")
    assert (a.gpu, a.gpu_layers) == (0, 1) and "(forced;" in (a.placement or "")
    assert (b.gpu, b.gpu_layers, b.placement) == (None, 0, "CPU: n_gpu_layers = 0")


def one_vram(manager: Manager, name: str) -> int:
    estimate = manager.record(name).estimate
    assert estimate is not None
    return estimate.vram(estimate.gpu_layers_total)


async def test_vram_pressure_evicts_the_lru_idle_model_on_that_gpu(model_dir: Path, running: Any) -> None:
    probe, _ = await running(make_settings(model_dir), on_gpu())
    budget = one_vram(probe, "tiny-a") * 3 // 2  # room for one model on the GPU, not two
    settings = make_settings(model_dir, budgets={"vram_bytes": budget, "max_loaded": 10})
    manager, events = await running(settings, on_gpu())
    await manager.load("tiny-a")
    await manager.load("tiny-b")
    assert [state(manager, n) for n in ("tiny-a", "tiny-b")] == ["available", "ready"]
    await events.settle()
    assert "evicted (least recently used) on GPU 0 to make room for tiny-b" in events.reasons("tiny-a")
    assert manager.gpu.held == {"tiny-b": one_vram(manager, "tiny-b")}

    await manager.pin("tiny-b")  # pinned: never evicted, so tiny-c gets what is left
    c = await manager.load("tiny-c")
    assert state(manager, "tiny-b") == "ready" and c.gpu_layers is not None and c.gpu_layers < 3
    assert c.placement and ("of 3 layers on GPU 0: only" in c.placement or c.placement.startswith("CPU: not one"))


async def test_a_forced_offload_that_cannot_fit_is_refused_with_numbers(model_dir: Path, running: Any) -> None:
    settings = make_settings(model_dir, defaults={"n_gpu_layers": -1}, budgets={"vram_bytes": "1MiB"})
    manager, _ = await running(settings, on_gpu())
    with pytest.raises(BudgetExceeded) as refused:
        await manager.load("tiny-a")
    message = str(refused.value)
    assert "VRAM: 3 of 3 layers on GPU 0 (forced;" in message and "1.0 MiB room): does not fit" in message
    assert "nothing can be evicted" in message and state(manager, "tiny-a") == "available"


async def test_out_of_gpu_memory_is_retried_with_fewer_layers(model_dir: Path, running: Any) -> None:
    manager, events = await running(make_settings(model_dir), on_gpu(ooms=1))
    info = await manager.load("tiny-a")
    assert manager.opened == [("tiny-a", 0, 3), ("tiny-a", 0, 1)]
    assert info.state == "ready" and info.gpu_layers == 1
    assert info.placement == ("1 of 3 layers on GPU 0: retried, out of GPU memory with 3 of 3 layers "
                              "(ggml_backend_cuda_buffer_type_alloc_buffer: allocating 4096.00 MiB on device 0: "
                              "cudaMalloc failed: out of memory)")
    assert await generate(manager, "tiny-a")


async def test_out_of_gpu_memory_fails_with_numbers_and_others_keep_serving(model_dir: Path,
                                                                             running: Any) -> None:
    manager, _ = await running(make_settings(model_dir, budgets={"gpu_oom_retry": False}), on_gpu())
    await manager.load("tiny-b")
    manager.ooms = 2  # still out of memory on the retry too, where retries are allowed
    with pytest.raises(LoadFailed) as failed:
        await manager.load("tiny-a")
    info = manager.info(manager.record("tiny-a"))
    assert info.state == "failed" and info.error == failed.value.message
    assert "out of GPU memory with 3 of 3 layers on GPU 0 (" in info.error
    assert "planned; all 3 layers on GPU 0" in info.error
    assert "cudaMalloc failed: out of memory" in info.error
    assert state(manager, "tiny-b") == "ready" and await generate(manager, "tiny-b")

    retrying, _ = await running(make_settings(model_dir), on_gpu(ooms=2))
    with pytest.raises(LoadFailed, match="out of GPU memory with 1 of 3 layers on GPU 0"):
        await retrying.load("tiny-a")
    assert len(retrying.opened) == 2  # one retry only
