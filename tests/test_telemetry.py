from __future__ import annotations

import time
from types import SimpleNamespace

import psutil
import pynvml
import pytest

from corral.backend import telemetry
from corral.backend.telemetry import GPUStats, HostStats, Telemetry, physical_cores
from fake_nvml import GIB, FakeNVML, two_gpus


def test_sample_on_this_host_is_sane():
    t = Telemetry()
    try:
        before = time.time()
        s = t.sample()
        after = time.time()
    finally:
        t.close()
    assert isinstance(s, HostStats)
    assert before <= s.ts <= after
    assert 0.0 <= s.cpu_percent <= 100.0
    assert s.cpu_count == psutil.cpu_count(logical=True)
    assert 1 <= s.physical_cores <= s.cpu_count
    assert s.ram_total == psutil.virtual_memory().total
    assert 0 < s.ram_used <= s.ram_total
    assert 0 < s.ram_available <= s.ram_total
    assert 0 < s.process_rss < s.ram_total
    assert isinstance(s.gpus, tuple)
    if s.gpus:
        assert s.gpu_note == ""
    else:
        assert s.gpu_note.startswith("no GPU (")


def test_no_gpu_on_this_machine_gives_a_note_not_an_error():
    t = Telemetry()
    if t.gpu_free_bytes():
        pytest.skip("this machine has a working NVIDIA GPU")
    s = t.sample()
    assert s.gpus == ()
    assert s.gpu_note
    assert t.gpu_free_bytes() == {}
    t.close()
    t.close()


def test_sample_is_fast_and_repeatable():
    t = Telemetry()
    t.sample()
    start = time.perf_counter()
    for _ in range(5):
        s = t.sample()
    assert (time.perf_counter() - start) / 5 < 0.05
    assert 0.0 <= s.cpu_percent <= 100.0
    t.close()


def test_physical_cores():
    n = physical_cores()
    assert isinstance(n, int)
    assert 1 <= n <= (psutil.cpu_count(logical=True) or n)


def test_physical_cores_falls_back_to_logical(monkeypatch):
    monkeypatch.setattr(psutil, "cpu_count", lambda logical=True: None if not logical else 6)
    assert physical_cores() == 6
    monkeypatch.setattr(psutil, "cpu_count", lambda logical=True: None)
    assert physical_cores() >= 1


def test_fake_two_gpus():
    nvml = FakeNVML(two_gpus())
    t = Telemetry(nvml=nvml)
    s = t.sample()
    assert s.gpu_note == ""
    assert s.gpus == (
        GPUStats(index=0, name="NVIDIA H100 80GB HBM3", uuid="GPU-aaaa", util_percent=37.0,
                 mem_used=20 * GIB, mem_total=80 * GIB, temperature_c=54.0, power_w=312.5,
                 power_limit_w=700.0),
        GPUStats(index=1, name="NVIDIA RTX 4090", uuid="GPU-bbbb", util_percent=0.0,
                 mem_used=1 * GIB, mem_total=24 * GIB, temperature_c=41.0, power_w=25.0,
                 power_limit_w=450.0),
    )
    assert s.gpus[0].mem_free == 60 * GIB
    assert s.gpus[1].mem_free == 23 * GIB
    assert isinstance(s.gpus[0].name, str)


def test_nvml_initialised_once_and_handles_cached():
    nvml = FakeNVML(two_gpus())
    t = Telemetry(nvml=nvml)
    assert nvml.calls == []
    t.sample()
    t.sample()
    t.gpu_free_bytes()
    assert nvml.calls.count("nvmlInit") == 1
    assert nvml.calls.count("nvmlDeviceGetCount") == 1
    assert nvml.calls.count("nvmlDeviceGetHandleByIndex") == 2
    t.close()
    assert nvml.calls.count("nvmlShutdown") == 1
    t.close()
    assert nvml.calls.count("nvmlShutdown") == 1


def test_failing_temperature_gives_none_for_that_field_only():
    nvml = FakeNVML(two_gpus(), fail={"nvmlDeviceGetTemperature"})
    s = Telemetry(nvml=nvml).sample()
    assert len(s.gpus) == 2
    g = s.gpus[0]
    assert g.temperature_c is None
    assert g.name == "NVIDIA H100 80GB HBM3"
    assert g.uuid == "GPU-aaaa"
    assert g.util_percent == 37.0
    assert g.mem_used == 20 * GIB and g.mem_total == 80 * GIB
    assert g.power_w == 312.5 and g.power_limit_w == 700.0
    assert s.gpu_note == ""


def test_every_field_failing_still_lists_the_gpu():
    every = {
        "nvmlDeviceGetName", "nvmlDeviceGetUUID", "nvmlDeviceGetUtilizationRates",
        "nvmlDeviceGetMemoryInfo", "nvmlDeviceGetTemperature", "nvmlDeviceGetPowerUsage",
        "nvmlDeviceGetEnforcedPowerLimit",
    }
    t = Telemetry(nvml=FakeNVML(two_gpus(), fail=every))
    s = t.sample()
    assert s.gpus[1] == GPUStats(1, "GPU 1", None, None, None, None, None, None, None)
    assert s.gpus[1].mem_free is None
    assert t.gpu_free_bytes() == {}


def test_missing_handle_gives_na_device():
    t = Telemetry(nvml=FakeNVML(two_gpus(), fail={"nvmlDeviceGetHandleByIndex"}))
    s = t.sample()
    assert [g.name for g in s.gpus] == ["GPU 0", "GPU 1"]
    assert all(g.mem_total is None for g in s.gpus)
    assert t.gpu_free_bytes() == {}


@pytest.mark.parametrize(
    ("error", "note"),
    [
        (pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND), "no GPU (NVML library not found)"),
        (pynvml.NVMLError(pynvml.NVML_ERROR_DRIVER_NOT_LOADED), "no GPU (NVIDIA driver not loaded)"),
        (pynvml.NVMLError(pynvml.NVML_ERROR_UNKNOWN), "no GPU (NVML error: Unknown Error)"),
        (OSError("libnvidia-ml.so.1: cannot open shared object file"),
         "no GPU (NVML unavailable: libnvidia-ml.so.1: cannot open shared object file)"),
        (RuntimeError(""), "no GPU (NVML unavailable: RuntimeError)"),
    ],
)
def test_init_failure_gives_no_gpus_and_a_reason(error, note):
    nvml = FakeNVML(two_gpus(), init_error=error)
    t = Telemetry(nvml=nvml)
    s = t.sample()
    assert s.gpus == ()
    assert s.gpu_note == note
    assert t.gpu_free_bytes() == {}
    t.sample()
    assert nvml.calls == ["nvmlInit"]
    t.close()
    assert "nvmlShutdown" not in nvml.calls


def test_zero_devices_gives_a_note():
    s = Telemetry(nvml=FakeNVML([])).sample()
    assert s.gpus == ()
    assert s.gpu_note == "no GPU (NVML found no devices)"


def test_gpu_free_bytes_with_fake():
    t = Telemetry(nvml=FakeNVML(two_gpus()))
    assert t.gpu_free_bytes() == {0: 60 * GIB, 1: 23 * GIB}
    t.close()
    assert t.gpu_free_bytes() == {0: 60 * GIB, 1: 23 * GIB}


def test_gpu_free_bytes_falls_back_to_total_minus_used():
    class NoFree(FakeNVML):
        def nvmlDeviceGetMemoryInfo(self, handle):
            d = self._device(handle)
            return SimpleNamespace(total=d["total"], used=d["used"])

    assert Telemetry(nvml=NoFree(two_gpus())).gpu_free_bytes() == {0: 60 * GIB, 1: 23 * GIB}


def test_gpu_memory_gives_free_and_total_for_placement():
    fake = FakeNVML(two_gpus())
    t = Telemetry(nvml=fake)
    assert t.gpu_memory() == {0: (60 * GIB, 80 * GIB), 1: (23 * GIB, 24 * GIB)}
    assert t.gpu_note() == ""
    fake.devices[1]["used"] = 20 * GIB  # a device dict is live: placement sees the change
    assert t.gpu_memory()[1] == (4 * GIB, 24 * GIB)


def test_gpu_note_says_why_there_is_no_gpu():
    missing = Telemetry(nvml=FakeNVML([], init_error=pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)))
    assert missing.gpu_memory() == {} and missing.gpu_note() == "no GPU (NVML library not found)"
    assert Telemetry(nvml=FakeNVML([])).gpu_note() == "no GPU (NVML found no devices)"


def test_psutil_failures_do_not_raise(monkeypatch):
    def broken(*args, **kwargs):
        raise psutil.AccessDenied()

    t = Telemetry(nvml=FakeNVML([]))
    monkeypatch.setattr(telemetry.psutil, "virtual_memory", broken)
    monkeypatch.setattr(telemetry.psutil, "cpu_percent", broken)
    monkeypatch.setattr(t, "_process", None)
    s = t.sample()
    assert s.cpu_percent == 0.0
    assert s.ram_total == 0 and s.ram_used == 0 and s.ram_available == 0
    assert s.process_rss == 0
    assert s.cpu_count >= 1
