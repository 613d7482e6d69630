"""A stand-in for pynvml with fixed GPUs, for telemetry and placement tests on machines
without one: `Telemetry(nvml=FakeNVML(two_gpus()))`. Devices are plain dicts, so a test
changes a GPU's used memory between queries by assigning to it."""

from __future__ import annotations

from types import SimpleNamespace

import pynvml

GIB = 1024**3


class FakeNVML:
    NVML_TEMPERATURE_GPU = 0
    NVMLError = pynvml.NVMLError
    NVMLError_LibraryNotFound = pynvml.NVMLError_LibraryNotFound
    NVMLError_DriverNotLoaded = pynvml.NVMLError_DriverNotLoaded

    def __init__(self, devices: list[dict], init_error: Exception | None = None, fail: set[str] = frozenset()):
        self.devices = devices
        self.init_error = init_error
        self.fail = set(fail)
        self.calls: list[str] = []

    def _record(self, name: str) -> None:
        self.calls.append(name)
        if name in self.fail:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)

    def nvmlInit(self):
        self.calls.append("nvmlInit")
        if self.init_error is not None:
            raise self.init_error

    def nvmlShutdown(self):
        self.calls.append("nvmlShutdown")

    def nvmlDeviceGetCount(self):
        self._record("nvmlDeviceGetCount")
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, index):
        self._record("nvmlDeviceGetHandleByIndex")
        return ("handle", index)

    def _device(self, handle):
        return self.devices[handle[1]]

    def nvmlDeviceGetName(self, handle):
        self._record("nvmlDeviceGetName")
        return self._device(handle)["name"]

    def nvmlDeviceGetUUID(self, handle):
        self._record("nvmlDeviceGetUUID")
        return self._device(handle)["uuid"]

    def nvmlDeviceGetUtilizationRates(self, handle):
        self._record("nvmlDeviceGetUtilizationRates")
        return SimpleNamespace(gpu=self._device(handle)["util"], memory=0)

    def nvmlDeviceGetMemoryInfo(self, handle):
        self._record("nvmlDeviceGetMemoryInfo")
        d = self._device(handle)
        return SimpleNamespace(total=d["total"], used=d["used"], free=d["total"] - d["used"])

    def nvmlDeviceGetTemperature(self, handle, sensor):
        self._record("nvmlDeviceGetTemperature")
        assert sensor == self.NVML_TEMPERATURE_GPU
        return self._device(handle)["temp"]

    def nvmlDeviceGetPowerUsage(self, handle):
        self._record("nvmlDeviceGetPowerUsage")
        return self._device(handle)["power_mw"]

    def nvmlDeviceGetEnforcedPowerLimit(self, handle):
        self._record("nvmlDeviceGetEnforcedPowerLimit")
        return self._device(handle)["limit_mw"]


def two_gpus() -> list[dict]:
    return [
        dict(name=b"NVIDIA H100 80GB HBM3", uuid=b"GPU-aaaa", util=37, total=80 * GIB,
             used=20 * GIB, temp=54, power_mw=312_500, limit_mw=700_000),
        dict(name="NVIDIA RTX 4090", uuid="GPU-bbbb", util=0, total=24 * GIB,
             used=1 * GIB, temp=41, power_mw=25_000, limit_mw=450_000),
    ]
