"""Where a load goes and what makes room for it: placement on the GPUs (placement.py), LRU
eviction of idle, unpinned models until the new one fits max_loaded, RAM and VRAM (or a refusal
with the numbers), and opening the engine there, retrying once with fewer layers when the GPU
runs out after all.

A mixin of `Manager` (manager.py), kept apart as its own concern, like reconfig.py: it works
on the manager's records through the same methods the manager's other verbs use."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from . import llamalog
from .engine import ContextSettings, Engine
from .errors import BudgetExceeded, LoadFailed
from .events import LoadProgress, Notice
from .memory import MemoryEstimate, format_bytes, return_free_memory
from .placement import GPULayers, GPURoom, Placement, eviction_target, fewer_layers, gpu_oom_line, plan
from .records import RESIDENT, Record
from .telemetry import physical_cores
from .weights import ModelWeights

if TYPE_CHECKING:
    from .manager import Manager


def close_and_trim(engine: Engine) -> None:
    """Close an engine and hand its freed buffers back to the OS, so RSS (and with it the RAM
    budget) shows the eviction."""
    engine.close()
    return_free_memory()


class Admission:
    async def _open_placed(self: Manager, r: Record) -> Engine:
        """Open `r` where it was placed. A load that runs out of GPU memory (llama.cpp's lines
        say so) is retried once with fewer layers when it was planned, not forced, and
        budgets.gpu_oom_retry allows; otherwise it fails with the numbers."""
        placement = r.placement
        assert placement is not None, "_make_room places every usable model"
        try:
            return await asyncio.to_thread(self._open, r, placement)
        except LoadFailed as exc:
            oom = gpu_oom_line(exc.message) if placement.n_gpu_layers else None
            if oom is None:
                raise
            if not (placement.auto and self.settings.budgets.gpu_oom_retry and r.estimate):
                raise self._out_of_vram(r, placement, exc) from exc
        rooms, _ = await self._gpu_rooms(r)
        r.placement = retry = fewer_layers(r.estimate, placement, rooms, oom)
        self.bus.publish(Notice(model=r.name, level="warning", message=f"model {r.name!r}: {retry.reason}"))
        try:
            return await asyncio.to_thread(self._open, r, retry)
        except LoadFailed as exc:
            if not (retry.n_gpu_layers and gpu_oom_line(exc.message)):
                raise
            raise self._out_of_vram(r, retry, exc) from exc

    @staticmethod
    def _out_of_vram(r: Record, placement: Placement, exc: LoadFailed) -> LoadFailed:
        return LoadFailed(f"model {r.name!r}: out of GPU memory with {placement.n_gpu_layers} of "
                          f"{placement.layers_total} layers on GPU {placement.gpu} "
                          f"({format_bytes(placement.vram)} planned; {placement.reason}): {exc.message}. "
                          "Lower n_gpu_layers, n_ctx or n_parallel, or free the GPU")

    def _open(self: Manager, r: Record, placement: Placement) -> Engine:
        """Blocking: weights, context, warmup, scheduler thread. Runs in a worker thread, whose
        llama.cpp lines go to the model's log, after a line saying which load they belong to."""
        r.log.add("corral", f"loading {r.entry.path} ({placement.reason})")
        with llamalog.attributed(r.log):
            return self._open_engine(r, placement)

    def _open_engine(self: Manager, r: Record, placement: Placement) -> Engine:
        s = r.settings
        last = [-1]

        def progress(fraction: float) -> None:
            percent = int(fraction * 100)
            if percent > last[0]:
                last[0] = percent
                r.load_percent = percent
                self.bus.publish(LoadProgress(model=r.name, percent=percent))

        vram_before = self.telemetry.gpu_free_bytes()
        weights = ModelWeights(str(r.entry.path), n_gpu_layers=placement.n_gpu_layers, main_gpu=placement.gpu,
                               progress=progress)
        try:
            template = weights.chat_template(r.entry.info.architecture if r.entry.info else "",
                                             config_format=r.chat_format, config_template=r.chat_template)
            engine = Engine(weights, ContextSettings(
                n_ctx=s.n_ctx, n_parallel=s.n_parallel, n_batch=s.n_batch,
                n_threads=s.n_threads or physical_cores(), flash_attn=s.flash_attn, max_queue=s.max_queue,
                type_k=s.type_k, type_v=s.type_v, n_ubatch=s.n_ubatch or s.n_batch,
            ), model_name=r.name, bus=self.bus, template=template, prefixes=self.prefixes, model_log=r.log)
        finally:
            weights.release()  # the engine holds its own reference
        try:
            engine.start(warmup=True)
        except Exception:
            close_and_trim(engine)
            raise
        r.template_source = template.source
        if vram_before:
            vram_after = self.telemetry.gpu_free_bytes()
            r.measured_vram = {i: max(free - vram_after.get(i, free), 0) for i, free in vram_before.items()}
        return engine

    async def _make_room(self: Manager, r: Record) -> None:
        """Place `r` (placement.py), then evict least-recently-used idle, unpinned models until
        it fits (max_loaded, RAM, and VRAM on the GPU it goes to), or refuse with the numbers;
        `next_step` decides, and `corral plan` asks it the same questions without acting."""
        assert r.estimate is not None, "a usable model has an estimate"
        while True:
            rooms, no_gpu = await self._gpu_rooms(r)
            resident = [x for x in self._records.values() if x is not r and x.state in RESIDENT]
            step = next_step(r.estimate, r.settings.n_gpu_layers, rooms, no_gpu, [Held.of(x) for x in resident],
                             self.ram_budget, self.settings.budgets.max_loaded)
            if step.refusal is not None:
                raise self._refuse(r, step.need, step.refusal, step.free)
            if step.wait:  # memory is on its way back: wait for it, then look again
                await asyncio.wait([x.unload_task for x in resident if x.unload_task is not None])
                continue
            if step.victim is None:
                r.placement = step.placement
                return
            where = "" if step.gpu is None else f" on GPU {step.gpu}"
            await self._unload(self._records[step.victim.name],
                               f"evicted (least recently used){where} to make room for {r.name}", step.cause)

    async def _gpu_rooms(self: Manager, r: Record) -> tuple[list[GPURoom], str]:
        """Each GPU's memory (NVML, off the loop) with corral's budget and what its other
        resident models hold there; and why there are none, when there are none."""
        memory, note = await asyncio.to_thread(lambda: (self.telemetry.gpu_memory(), self.telemetry.gpu_note()))
        others = [x for x in self._records.values() if x is not r]
        rooms = [GPURoom(index=i, free=free, total=total, budget=self.settings.budgets.vram_budget(total),
                         reserved=sum(x.vram_on(i) for x in others),
                         evictable=sum(x.vram_on(i) for x in others if x.evictable))
                 for i, (free, total) in sorted(memory.items())]
        return rooms, note

    def _refuse(self: Manager, r: Record, need: int, why: str, free: int) -> BudgetExceeded:
        message = (f"model {r.name!r} ({r.entry.path}): cannot load: {why}. Evict or unpin a model, "
                   "raise budgets.ram_bytes / vram_bytes / max_loaded, or lower n_ctx / n_parallel / "
                   f"n_gpu_layers (`corral plan {r.name}` shows what would fit)")
        self.bus.publish(Notice(model=r.name, level="error", message=message, cause="budget"))
        return BudgetExceeded(message, needed=need, free=free)


@dataclass(frozen=True)
class Held:
    """A resident model as admission weighs it: a copy, so a dry run can take models away."""

    name: str
    reserved: int
    vram: Mapping[int, int]
    evictable: bool
    last_used: float
    label: str  # "pinned", or its state: what a refusal says holds it
    leaving: bool  # unloading already

    @classmethod
    def of(cls, r: Record) -> Held:
        gpu = r.placement.gpu if r.placement is not None else None
        return cls(name=r.name, reserved=r.reserved, vram={} if gpu is None else {gpu: r.vram_on(gpu)},
                   evictable=r.evictable, last_used=r.last_used or 0.0,
                   label="pinned" if r.pinned else r.state.value, leaving=r.unload_task is not None)


@dataclass(frozen=True)
class Step:
    """What admission does next for a model: load it with `placement`, evict `victim` and look
    again, wait for models already unloading, or refuse (`refusal` says why)."""

    placement: Placement
    need: int  # RAM the placement takes
    free: int  # RAM budget left beside the resident models
    victim: Held | None = None
    cause: str = ""  # why the victim goes: "max_loaded" or "budget" (the eviction metric's reason)
    gpu: int | None = None  # the GPU the victim is evicted from
    wait: bool = False
    refusal: str | None = None


def next_step(estimate: MemoryEstimate, n_gpu_layers: GPULayers, rooms: list[GPURoom], no_gpu: str,
              resident: list[Held], ram_budget: int, max_loaded: int) -> Step:
    """One decision of admission, over numbers only: `_make_room` acts on it, a dry run
    (`Manager.plan`) takes the victim away on paper and asks again."""
    placement = plan(estimate, rooms, n_gpu_layers, no_gpu=no_gpu)
    need = placement.ram
    if need > ram_budget:
        return Step(placement, need, ram_budget, refusal=f"needs {format_bytes(need)} of RAM ({placement.reason}) but "
                                                          f"the whole RAM budget is {format_bytes(ram_budget)}")
    free = ram_budget - sum(x.reserved for x in resident)
    gpu = eviction_target(estimate, placement, rooms)
    if len(resident) < max_loaded and need <= free and gpu is None and placement.fits:
        return Step(placement, need, free)
    idle = [x for x in resident if x.evictable and (gpu is None or x.vram.get(gpu, 0) > 0)]
    if not idle and any(x.leaving for x in resident):
        return Step(placement, need, free, wait=True)
    if not idle:
        held = ", ".join(f"{x.name} ({x.label})" for x in resident)
        if len(resident) >= max_loaded:
            why = f"max_loaded = {max_loaded} reached"
        elif need > free:
            why = (f"needs {format_bytes(need)} of RAM ({placement.reason}) but only {format_bytes(free)} of the "
                   f"{format_bytes(ram_budget)} RAM budget is free")
        else:
            why = f"VRAM: {placement.reason}"
        return Step(placement, need, free, refusal=f"{why}; nothing can be evicted ({held or 'no model is loaded'})")
    victim = min(idle, key=lambda x: x.last_used)
    return Step(placement, need, free, victim=victim, gpu=gpu,
                cause="max_loaded" if len(resident) >= max_loaded else "budget")


def without(rooms: list[GPURoom], gone: Held) -> list[GPURoom]:
    """The GPUs as they would be once `gone` is unloaded: its VRAM free again."""
    return [replace(room, free=room.free + gone.vram.get(room.index, 0),
                    reserved=room.reserved - gone.vram.get(room.index, 0),
                    evictable=room.evictable - (gone.vram.get(room.index, 0) if gone.evictable else 0))
            for room in rooms]
