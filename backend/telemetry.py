"""Host telemetry: CPU and RAM from psutil, GPUs from NVML.

The console polls this about once a second and the manager asks it for free VRAM before
a load, so it must never raise: a machine without a GPU, a missing driver, a GPU that
does not support one query, or a GPU that falls off the bus all end up as data
(`gpus == ()` with a `gpu_note`, or `None` for the one field that failed), the way nvitop
shows "N/A" instead of crashing.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import psutil

_GPU_TEMPERATURE_SENSOR = 0


@dataclass(frozen=True)
class GPUStats:
    index: int
    name: str
    uuid: str | None
    util_percent: float | None
    mem_used: int | None
    mem_total: int | None
    temperature_c: float | None
    power_w: float | None
    power_limit_w: float | None

    @property
    def mem_free(self) -> int | None:
        if self.mem_used is None or self.mem_total is None:
            return None
        return max(0, self.mem_total - self.mem_used)


@dataclass(frozen=True)
class HostStats:
    ts: float
    cpu_percent: float
    cpu_count: int
    physical_cores: int
    ram_used: int
    ram_total: int
    ram_available: int
    process_rss: int
    gpus: tuple[GPUStats, ...]
    gpu_note: str


def physical_cores() -> int:
    """Physical cores, the thread count llama.cpp runs best with.

    psutil returns None for physical cores on some platforms and containers; the logical
    count is then the best guess left.
    """
    for count in (_safe(lambda: psutil.cpu_count(logical=False)), _logical_cores()):
        if isinstance(count, int) and count > 0:
            return count
    return 1


def _logical_cores() -> int:
    count = _safe(lambda: psutil.cpu_count(logical=True)) or os.cpu_count() or 1
    return max(1, int(count))


def _safe(query: Callable[[], Any]) -> Any:
    try:
        return query()
    except Exception:
        return None


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


def _number(value: Any, scale: float = 1.0) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        return float(value) / scale
    except (TypeError, ValueError):
        return None


def _bytes(value: Any) -> int | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


class Telemetry:
    """Samples the host on demand; one instance per process is enough.

    `nvml` is the pynvml module by default, imported only on the first GPU query so a
    machine without nvidia-ml-py still works; tests pass a fake with the same functions.
    NVML is initialised once: a failed init is remembered (its reason becomes `gpu_note`)
    rather than retried on every one-second poll.
    """

    def __init__(self, nvml: object | None = None) -> None:
        self._nvml: Any = nvml
        self._lock = threading.Lock()
        self._initialised = False
        self._tried = False
        self._note = ""
        self._count = 0
        self._handles: dict[int, Any] = {}
        self._cpu_count = _logical_cores()
        self._physical_cores = physical_cores()
        self._process = _safe(psutil.Process)
        # psutil's interval=None measures since the previous call; the first call has no
        # previous one and returns 0.0, so spend it here.
        _safe(lambda: psutil.cpu_percent(interval=None))

    def sample(self) -> HostStats:
        ts = time.time()
        cpu = _number(_safe(lambda: psutil.cpu_percent(interval=None))) or 0.0
        vm = _safe(psutil.virtual_memory)
        ram_total = _bytes(getattr(vm, "total", None)) or 0
        ram_available = _bytes(getattr(vm, "available", None)) or 0
        ram_used = _bytes(getattr(vm, "used", None))
        if ram_used is None:
            ram_used = max(0, ram_total - ram_available)
        rss = _bytes(_safe(lambda: self._process.memory_info().rss)) or 0
        with self._lock:
            gpus = self._gpu_stats()
            note = "" if gpus else self._why_none()
        return HostStats(
            ts=ts,
            cpu_percent=min(100.0, max(0.0, cpu)),
            cpu_count=self._cpu_count,
            physical_cores=self._physical_cores,
            ram_used=ram_used,
            ram_total=ram_total,
            ram_available=ram_available,
            process_rss=rss,
            gpus=gpus,
            gpu_note=note,
        )

    def gpu_free_bytes(self) -> dict[int, int]:
        """Free memory per GPU index (the manager measures a load's VRAM as its change)."""
        return {index: free for index, (free, _total) in self.gpu_memory().items()}

    def gpu_memory(self) -> dict[int, tuple[int, int]]:
        """(free, total) bytes per GPU index, for placement; GPUs that do not answer are left out."""
        memory: dict[int, tuple[int, int]] = {}
        with self._lock:
            if not self._ensure_nvml():
                return memory
            for index in range(self._count):
                handle = self._handle(index)
                if handle is None:
                    continue
                info = _safe(lambda: self._nvml.nvmlDeviceGetMemoryInfo(handle))
                total = _bytes(getattr(info, "total", None))
                free = _bytes(getattr(info, "free", None))
                if free is None:
                    used = _bytes(getattr(info, "used", None))
                    if used is None or total is None:
                        continue
                    free = max(0, total - used)
                memory[index] = (free, total if total is not None else free)
        return memory

    def gpu_note(self) -> str:
        """Why there are no GPUs ("" while there are some)."""
        with self._lock:
            return "" if self._ensure_nvml() and self._count else self._why_none()

    def _why_none(self) -> str:
        return self._note or "no GPU (NVML found no devices)"

    def close(self) -> None:
        with self._lock:
            if self._initialised:
                _safe(self._nvml.nvmlShutdown)
            self._initialised = False
            self._tried = False
            self._note = ""
            self._count = 0
            self._handles.clear()

    def _ensure_nvml(self) -> bool:
        if self._tried:
            return self._initialised
        self._tried = True
        if self._nvml is None:
            try:
                import pynvml
            except Exception:
                self._note = "no GPU (nvidia-ml-py is not installed)"
                return False
            self._nvml = pynvml
        try:
            self._nvml.nvmlInit()
        except Exception as error:
            self._note = self._init_failure(error)
            return False
        self._initialised = True
        count = _safe(self._nvml.nvmlDeviceGetCount)
        self._count = count if isinstance(count, int) and count > 0 else 0
        if count is None:
            self._note = "no GPU (NVML could not count devices)"
        elif self._count == 0:
            self._note = "no GPU (NVML found no devices)"
        return True

    def _init_failure(self, error: Exception) -> str:
        if self._is(error, "NVMLError_LibraryNotFound"):
            return "no GPU (NVML library not found)"
        if self._is(error, "NVMLError_DriverNotLoaded"):
            return "no GPU (NVIDIA driver not loaded)"
        if self._is(error, "NVMLError_NoPermission"):
            return "no GPU (no permission to use NVML)"
        detail = str(error).strip() or type(error).__name__
        if self._is(error, "NVMLError"):
            return f"no GPU (NVML error: {detail})"
        return f"no GPU (NVML unavailable: {detail})"

    def _is(self, error: Exception, name: str) -> bool:
        kind = getattr(self._nvml, name, None)
        if isinstance(kind, type) and isinstance(error, kind):
            return True
        return any(cls.__name__ == name for cls in type(error).__mro__)

    def _handle(self, index: int) -> Any:
        handle = self._handles.get(index)
        if handle is None:
            handle = _safe(lambda: self._nvml.nvmlDeviceGetHandleByIndex(index))
            if handle is not None:
                self._handles[index] = handle
        return handle

    def _gpu_stats(self) -> tuple[GPUStats, ...]:
        if not self._ensure_nvml():
            return ()
        return tuple(self._device(index) for index in range(self._count))

    def _device(self, index: int) -> GPUStats:
        nvml = self._nvml
        handle = self._handle(index)
        if handle is None:
            return GPUStats(index, f"GPU {index}", None, None, None, None, None, None, None)

        def ask(function: str, *args: Any) -> Any:
            return _safe(lambda: getattr(nvml, function)(handle, *args))

        memory = ask("nvmlDeviceGetMemoryInfo")
        utilisation = ask("nvmlDeviceGetUtilizationRates")
        sensor = getattr(nvml, "NVML_TEMPERATURE_GPU", _GPU_TEMPERATURE_SENSOR)
        return GPUStats(
            index=index,
            name=_text(ask("nvmlDeviceGetName")) or f"GPU {index}",
            uuid=_text(ask("nvmlDeviceGetUUID")),
            util_percent=_number(getattr(utilisation, "gpu", None)),
            mem_used=_bytes(getattr(memory, "used", None)),
            mem_total=_bytes(getattr(memory, "total", None)),
            temperature_c=_number(ask("nvmlDeviceGetTemperature", sensor)),
            power_w=_number(ask("nvmlDeviceGetPowerUsage"), 1000.0),
            power_limit_w=_number(ask("nvmlDeviceGetEnforcedPowerLimit"), 1000.0),
        )
