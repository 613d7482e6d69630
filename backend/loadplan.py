"""A dry run of admission: what loading a model (with its settings, or others) would take.

`corral plan MODEL`, `GET /api/models/{name}/plan` and the console's details view answer the
operator's questions before a load: how the estimate breaks down, how much of the budget is
left, which models would be evicted and why, or why the model cannot fit and which setting
would make it fit. The answers come from the same `next_step` that `_make_room` acts on
(admission.py): here each victim is taken away on paper and the question asked again, so the
plan and the real load cannot disagree about the rules.

A mixin of `Manager` (manager.py), like admission.py and reconfig.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from .admission import Held, Step, next_step, without
from .config import ModelDefaults, check_model_values
from .errors import BadRequest, ModelUnusable
from .memory import MemoryEstimate, format_bytes
from .placement import GPURoom
from .snapshot import PLANNABLE, Eviction, LoadPlan
from .records import RESIDENT

if TYPE_CHECKING:
    from .manager import Manager

SMALLEST_CTX = 512


@dataclass
class _Outcome:
    last: Step
    evictions: list[Eviction]
    waits_for: list[str]


def simulate(need: MemoryEstimate, n_gpu_layers: Any, rooms: list[GPURoom], no_gpu: str, resident: list[Held],
             ram_budget: int, max_loaded: int) -> _Outcome:
    """Admission's loop on paper: evict (or wait for) what `next_step` says until it fits or
    refuses; models already unloading are taken as gone."""
    evictions: list[Eviction] = []
    waits: list[str] = []
    for _ in range(len(resident) + 2):
        step = next_step(need, n_gpu_layers, rooms, no_gpu, resident, ram_budget, max_loaded)
        if step.wait:
            waits += [x.name for x in resident if x.leaving]
            for gone in [x for x in resident if x.leaving]:
                rooms = without(rooms, gone)
            resident = [x for x in resident if not x.leaving]
            continue
        if step.victim is None:
            return _Outcome(step, evictions, waits)
        why = ("max_loaded reached" if step.cause == "max_loaded" else "RAM budget" if step.gpu is None
               else f"VRAM on GPU {step.gpu}")
        evictions.append(Eviction(step.victim.name, step.victim.reserved, f"least recently used idle model ({why})"))
        rooms = without(rooms, step.victim)
        resident = [x for x in resident if x is not step.victim]
    raise AssertionError("admission's dry run did not settle")  # each round removes a model


class Planning:
    async def plan(self: Manager, name: str, overrides: dict[str, Any] | None = None) -> LoadPlan:
        """A dry run of loading `name` now, with `overrides` of its PLANNABLE settings; nothing
        is loaded or evicted. A refusal or eviction comes with settings that would avoid it."""
        r = self.record(name)
        unknown = sorted(set(overrides or {}) - set(PLANNABLE))
        if unknown:
            raise BadRequest(f"cannot plan with {', '.join(unknown)}: the settings a plan can change are "
                             f"{', '.join(PLANNABLE)}")
        settings = self._planned_settings(r.settings, overrides or {}, r.name)
        need = self._estimate(r.entry, settings)
        if need is None:
            raise ModelUnusable(f"model {r.name!r} ({r.entry.path}): {r.entry.error}; fix or replace the file")
        rooms, no_gpu = await self._gpu_rooms(r)
        resident = [Held.of(x) for x in self._records.values() if x is not r and x.state in RESIDENT]
        budgets = self.settings.budgets

        def attempt(s: ModelDefaults) -> _Outcome:
            estimate = self._estimate(r.entry, s)
            assert estimate is not None
            return simulate(estimate, s.n_gpu_layers, rooms, no_gpu, resident, self.ram_budget, budgets.max_loaded)

        outcome = attempt(settings)
        step = outcome.last
        suggestions: list[str] = []
        if step.refusal is not None or outcome.evictions:
            suggestions = _suggestions(settings, attempt, avoid_evicting=step.refusal is None)
            if step.refusal is not None:
                suggestions += _budget_suggestions(step, resident, budgets.max_loaded)
        p = step.placement
        return LoadPlan(
            model=r.name, state=r.state.value,
            settings={**{k: getattr(settings, k) for k in PLANNABLE}, "n_ubatch": settings.n_ubatch or settings.n_batch},
            estimate=need.to_dict(),
            ram_bytes=p.ram, vram_bytes=p.vram, gpu=p.gpu, n_gpu_layers=p.n_gpu_layers, placement=p.reason,
            ram_budget=self.ram_budget, ram_reserved=sum(x.reserved for x in resident),
            max_loaded=budgets.max_loaded, loaded=len(resident), fits=step.refusal is None,
            evictions=tuple(outcome.evictions), waits_for=tuple(outcome.waits_for), refusal=step.refusal,
            suggestions=tuple(suggestions))

    @staticmethod
    def _planned_settings(current: ModelDefaults, overrides: dict[str, Any], name: str) -> ModelDefaults:
        """The model's settings with `overrides`, checked by the config file's own rules."""
        try:
            settings = ModelDefaults.model_validate({**current.model_dump(), **overrides})
            check_model_values(f"plan for {name}", settings)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise BadRequest(f"plan for {name}: {problems}") from None
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        return settings


def _suggestions(settings: ModelDefaults, attempt: Any, *, avoid_evicting: bool) -> list[str]:
    """Single changes to the model's own settings that make it fit (or, where it fits by
    evicting, fit without evicting): the largest n_ctx, the most sequences, a quantized KV cache."""
    def good(s: ModelDefaults) -> bool:
        outcome = attempt(s)
        return outcome.last.refusal is None and not (avoid_evicting and outcome.evictions)

    found = []
    n_ctx = settings.n_ctx // 2
    while n_ctx >= SMALLEST_CTX:
        if good(settings.model_copy(update={"n_ctx": n_ctx})):
            found.append(f"n_ctx = {n_ctx}")
            break
        n_ctx //= 2
    for n_parallel in range(settings.n_parallel - 1, 0, -1):
        if good(settings.model_copy(update={"n_parallel": n_parallel})):
            found.append(f"n_parallel = {n_parallel}")
            break
    for kv in ("q8_0", "q4_0"):
        if settings.flash_attn and (settings.type_k, settings.type_v) != (kv, kv) \
                and good(settings.model_copy(update={"type_k": kv, "type_v": kv})):
            found.append(f'type_k = type_v = "{kv}"')
            break
    if (settings.n_ubatch or settings.n_batch) > 128 and good(settings.model_copy(update={"n_ubatch": 128})):
        found.append("n_ubatch = 128")
    return found


def _budget_suggestions(step: Step, resident: list[Held], max_loaded: int) -> list[str]:
    """What the operator could change beside the model: the budget, max_loaded, a pin."""
    kept = [x for x in resident if not x.evictable]
    found = []
    if step.need > step.free + sum(x.reserved for x in resident if x.evictable):
        found.append(f"budgets.ram_bytes >= {format_bytes(step.need + sum(x.reserved for x in kept))}")
    if len(kept) >= max_loaded:
        found.append(f"max_loaded = {len(kept) + 1}")
    pinned = [x for x in kept if x.label == "pinned"]
    if pinned:
        found.append("unpin or evict " + ", ".join(f"{x.name} ({format_bytes(x.reserved)})" for x in pinned))
    return found
