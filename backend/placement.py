"""Where a model goes before it loads: which GPU, and how many of its layers.

Pure functions over numbers (the model's estimate, each GPU's free and total memory, corral's
VRAM budget and what its own models already hold there), so every rule is tested with fixed
figures and no GPU. The manager asks NVML for the numbers, plans, evicts when the plan says
eviction would help, and passes the result to llama.cpp as `n_gpu_layers` and `main_gpu`.

Rules (n_gpu_layers counts as llama.cpp counts: the blocks plus the output head):
- `n_gpu_layers = 0`: CPU.
- `"auto"` (the default): no GPU → CPU, with NVML's reason. Otherwise the GPU that takes the
  most layers within its room (ties: the most room); all of them when they fit, else a
  partial offload, else CPU when not even one layer fits.
- an int forces that many (-1 = all) on the GPU with the most room; it may not fit, and the
  manager then evicts or refuses. With no GPU that NVML sees it is passed through unplanned
  (llama.cpp may still have a Metal or ROCm device).
- A GPU's room is the smaller of its free memory less a headroom (CUDA context,
  fragmentation) and corral's budget on it less what corral's models hold there.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from .memory import MemoryEstimate, format_bytes

AUTO = "auto"
GPULayers = int | Literal["auto"]
HEADROOM = 256 * 2**20  # kept free on every GPU: CUDA context growth, allocator slack

# What llama.cpp's CUDA, Vulkan, Metal and SYCL backends log when a device allocation fails.
_GPU_OOM = re.compile(r"out of memory|cudaMalloc failed|failed to allocate (CUDA|ROCm|Vulkan|Metal|SYCL)\d*"
                      r"|unable to allocate (CUDA|ROCm|Vulkan|Metal|SYCL)\d*|ErrorOutOfDeviceMemory",
                      re.IGNORECASE)
# engine.py's words before llama.cpp's own lines
_ENGINE_PREFIX = re.compile(r"^.*?(could not load this file|could not create a context \(n_ctx \d+\)): ")


@dataclass(frozen=True)
class GPURoom:
    """One GPU as placement sees it."""

    index: int
    free: int  # NVML's free memory now (other processes' use already taken off)
    total: int
    budget: int  # corral's VRAM budget on this GPU
    reserved: int = 0  # what corral's resident models hold here (measured, else planned)
    evictable: int = 0  # the part of `reserved` held by idle, unpinned models

    @property
    def room(self) -> int:
        return max(0, min(self.free - HEADROOM, self.budget - self.reserved))

    @property
    def room_after_eviction(self) -> int:
        """The room once every idle, unpinned corral model here is unloaded."""
        return max(0, min(self.free + self.evictable - HEADROOM, self.budget - self.reserved + self.evictable))


@dataclass(frozen=True)
class Placement:
    """A plan for one load."""

    gpu: int | None  # the GPU index; None on CPU or when forced without a GPU NVML sees
    n_gpu_layers: int  # what llama.cpp is given
    layers_total: int  # n_gpu_layers that would offload everything
    vram: int  # expected bytes on `gpu`
    ram: int  # expected host bytes
    reason: str  # one line for ModelInfo and events
    fits: bool = True  # False: a forced value that no GPU has room for
    auto: bool = True  # planned from free memory (a forced value is never changed)

    @property
    def full(self) -> bool:
        return self.n_gpu_layers >= self.layers_total


def plan(need: MemoryEstimate, gpus: Sequence[GPURoom], n_gpu_layers: GPULayers, *,
         no_gpu: str = "no GPU") -> Placement:
    """Place a model needing `need` on `gpus` as `n_gpu_layers` asks (see the module rules).
    `no_gpu` is why there are no GPUs (telemetry's note), for the reason line."""
    total = need.gpu_layers_total
    if n_gpu_layers == 0:
        return _cpu(need, "CPU: n_gpu_layers = 0", auto=False)
    if n_gpu_layers != AUTO:
        return _forced(need, gpus, total if n_gpu_layers < 0 else min(n_gpu_layers, total), no_gpu)
    if not gpus:
        return _cpu(need, f"CPU: {no_gpu}")
    best = max(gpus, key=lambda g: (most_layers(need, g.room), g.room))
    k = most_layers(need, best.room)
    room = f"{format_bytes(best.room)} room on GPU {best.index}"
    if k == 0:
        return _cpu(need, f"CPU: not one layer fits ({format_bytes(need.vram(1))} needed, {room})")
    if k == total:
        why = f"all {total} layers on GPU {best.index} ({format_bytes(need.vram(k))} of {format_bytes(best.room)} room)"
    else:
        why = (f"{k} of {total} layers on GPU {best.index}: only {format_bytes(best.room)} room, "
               f"{format_bytes(need.vram(total))} needed for all")
    return _on(need, best.index, k, why)


def fewer_layers(need: MemoryEstimate, failed: Placement, gpus: Sequence[GPURoom], error: str) -> Placement:
    """The plan after `failed` ran out of GPU memory: at most half its layers, and no more
    than the room that GPU reports now, planned as `auto` would (CPU when none are left)."""
    room = next((g.room for g in gpus if g.index == failed.gpu), 0)
    k = min(failed.n_gpu_layers // 2, most_layers(need, room))
    why = f"out of GPU memory with {failed.n_gpu_layers} of {failed.layers_total} layers ({error})"
    if k == 0 or failed.gpu is None:
        return _cpu(need, f"CPU: {why}")
    return _on(need, failed.gpu, k, f"{k} of {failed.layers_total} layers on GPU {failed.gpu}: retried, {why}")


def eviction_target(need: MemoryEstimate, placement: Placement, gpus: Sequence[GPURoom]) -> int | None:
    """The GPU on which evicting corral's idle models would give this load what it wants:
    every layer when planned, the forced count when forced. None when it already has that,
    or when no GPU would have room for it even after evicting (a partial offload it is)."""
    want = need.gpu_layers_total if placement.auto else placement.n_gpu_layers
    if placement.fits and placement.n_gpu_layers >= want:
        return None
    vram = need.vram(want)
    candidates = [g for g in gpus if g.evictable and vram <= g.room_after_eviction]
    return max(candidates, key=lambda g: g.room_after_eviction).index if candidates else None


def most_layers(need: MemoryEstimate, room: int) -> int:
    """The largest n_gpu_layers whose VRAM fits in `room` (vram grows with the layer count)."""
    k = 0
    while k < need.gpu_layers_total and need.vram(k + 1) <= room:
        k += 1
    return k


def gpu_oom_line(message: str) -> str | None:
    """The llama.cpp line in a failed load's message (engine.py joins them with "; " after
    its own prefix) that says a GPU allocation failed; None when none does."""
    for part in message.split("; "):
        if _GPU_OOM.search(part):
            return _ENGINE_PREFIX.sub("", part)
    return None


def _on(need: MemoryEstimate, gpu: int | None, k: int, reason: str, *, fits: bool = True,
        auto: bool = True) -> Placement:
    return Placement(gpu=gpu, n_gpu_layers=k, layers_total=need.gpu_layers_total, vram=need.vram(k),
                     ram=need.ram(k), reason=reason, fits=fits, auto=auto)


def _cpu(need: MemoryEstimate, reason: str, *, auto: bool = True) -> Placement:
    return _on(need, None, 0, reason, auto=auto)


def _forced(need: MemoryEstimate, gpus: Sequence[GPURoom], k: int, no_gpu: str) -> Placement:
    total = need.gpu_layers_total
    if not gpus:
        return Placement(gpu=None, n_gpu_layers=k, layers_total=total, vram=0, ram=need.ram(0),
                         reason=f"{k} of {total} layers (forced) left to llama.cpp: {no_gpu}", auto=False)
    best = max(gpus, key=lambda g: g.room)
    vram = need.vram(k)
    fits = vram <= best.room
    verdict = "" if fits else ": does not fit"
    return _on(need, best.index, k, f"{k} of {total} layers on GPU {best.index} (forced; "
               f"{format_bytes(vram)} of {format_bytes(best.room)} room){verdict}", fits=fits, auto=False)
