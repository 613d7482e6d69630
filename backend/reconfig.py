"""Applying a new configuration to a running manager: only what changed, reloading a model
whose build settings changed once its requests finish, retiring models the config dropped.

A mixin of `Manager` (manager.py), kept apart because it is its own concern: it touches the
manager's records through the same methods its other verbs use."""

from __future__ import annotations

import asyncio
import contextlib
import functools
from typing import TYPE_CHECKING

from .catalog import Catalog
from .config import AliasConfig, ConfigError, Settings, catalog_dirs
from .errors import CorralError, ModelBusy
from .events import Notice, PinChanged
from .memory import default_ram_budget, format_bytes
from .records import Record, State
from .stores import scan_stores

if TYPE_CHECKING:
    from .manager import Manager

RELOAD_KEYS = ("n_ctx", "n_parallel", "n_batch", "n_ubatch", "n_threads", "n_gpu_layers", "flash_attn", "type_k", "type_v",
               "max_queue")


class Reconfiguration:
    async def apply_settings(self: Manager, new: Settings) -> list[str]:
        """Make `new` the running configuration, touching only what changed; returns what was
        done, one line each. A config that cannot apply raises ConfigError and changes nothing.

        A changed keep_alive, pin, priority or budget applies at once. A change to how a
        loaded model is built (n_ctx, n_parallel, ...) reloads it in the background after its
        in-flight requests finish; requests arriving meanwhile wait for the new load. Requests
        already running keep the settings they started with."""
        old = self.settings
        catalog = self.catalog
        if _catalog_sources(new) != _catalog_sources(old):
            catalog = catalog_for(new)
        entries = await asyncio.to_thread(catalog.refresh)  # one scan: it checks aliases and is adopted
        names = sorted({entry.name for entry in entries})
        for alias in new.aliases:
            self._check_alias(alias, names)
        self.settings, self.catalog = new, catalog
        self._aliases = {a.name: a for a in new.aliases}
        actions: list[str] = []
        if new.budgets != old.budgets:
            self.ram_budget = new.budgets.ram_bytes or default_ram_budget(new.budgets.ram_fraction)
            self.prefixes.budget(new.budgets.saved_kv_ram, new.budgets.saved_kv_disk)
            actions.append(f"budgets applied (RAM budget {format_bytes(self.ram_budget)}, "
                           f"max_loaded {new.budgets.max_loaded})")
        self._adopt(entries)
        for name, record in list(self._records.items()):
            actions += self._retire(record) if name not in names else self._reconfigure(record, old, new)
        preloaded = set(self._preload_names(old))
        for name in self._preload_names(new):
            if name not in preloaded:
                asyncio.create_task(self._preload(name))
                actions.append(f"{name}: preloading")
        if new.server != old.server:
            actions.append("server settings apply when `corral serve` next starts")
        self._notify()
        return actions

    def _check_alias(self: Manager, alias: AliasConfig, names: list[str]) -> None:
        if alias.name in names:
            raise ConfigError(f"alias {alias.name!r}: a model of that name is in the catalog; rename the alias")
        if alias.model not in names:
            raise ConfigError(f"alias {alias.name!r}: its model {alias.model!r} is not in the catalog "
                              f"(known: {', '.join(names) or 'none'}); fix `model` or add the model")

    def _reconfigure(self: Manager, r: Record, old: Settings, new: Settings) -> list[str]:
        store = self.catalog.get(r.name).store
        settings = new.effective(r.name, store.defaults if store else None)
        entry, old_entry = new.model_config_for(r.name), old.model_config_for(r.name)
        template = ((entry.chat_format if entry else None) or settings.chat_format,
                    entry.chat_template if entry else None)
        rebuild = [k for k in RELOAD_KEYS if getattr(settings, k) != getattr(r.settings, k)]
        if template != (r.chat_format, r.chat_template):
            rebuild.append("chat template")
        if r.engine is not None and self.catalog.get(r.name).path != r.entry.path:
            rebuild.append("path")
        actions = []
        if settings.keep_alive != r.settings.keep_alive:
            actions.append(f"{r.name}: keep_alive {r.settings.keep_alive:g} s → {settings.keep_alive:g} s")
        r.settings, (r.chat_format, r.chat_template) = settings, template
        r.priority = entry.priority if entry else 0
        pinned = bool(entry and entry.pinned)
        if pinned != bool(old_entry and old_entry.pinned) and pinned != r.pinned:
            r.pinned = pinned
            self.bus.publish(PinChanged(model=r.name, pinned=pinned))
            self._save_state()
            actions.append(f"{r.name}: {'pinned' if pinned else 'unpinned'}")
        if r.state in (State.READY, State.BUSY):
            self._set_expiry(r)
        if rebuild and r.engine is not None:
            asyncio.create_task(self._reload(r, ", ".join(rebuild)), name=f"reload-{r.name}")
            actions.append(f"{r.name}: reloading for {', '.join(rebuild)} once its requests finish")
        elif rebuild:
            r.estimate = self._estimate(r.entry, settings)
            actions.append(f"{r.name}: {', '.join(rebuild)} apply at its next load")
        return actions

    async def _reload(self: Manager, r: Record, why: str) -> None:
        await self._unload_when_drained(r, f"reload for {why}")
        r.entry = self.catalog.get(r.name)
        await self._preload(r.name, f"reload for {why}")

    async def _unload_when_drained(self: Manager, r: Record, why: str) -> None:
        """Drain however long it takes (the operator's config asked for it), then unload."""
        if r.load_task and not r.load_task.done():
            with contextlib.suppress(CorralError):
                await asyncio.shield(r.load_task)
        while r.state in (State.READY, State.BUSY):
            try:
                await self.evict(r.name, force=True, why=f"unloaded for {why}", cause="config")
            except ModelBusy:
                self.bus.publish(Notice(model=r.name, level="warning",
                                        message=f"{why} is waiting for requests to finish"))

    def _retire(self: Manager, r: Record) -> list[str]:
        """A model the new config no longer has: it goes once its requests finish."""
        if r.state in (State.AVAILABLE, State.FAILED) and r.load_task is None:
            del self._records[r.name]
            return [f"{r.name}: removed"]

        async def unload_then_forget() -> None:
            with contextlib.suppress(CorralError):
                await self._unload_when_drained(r, "removal from the config")
            if self._records.get(r.name) is r and r.state in (State.AVAILABLE, State.FAILED):
                del self._records[r.name]
                self._notify()

        asyncio.create_task(unload_then_forget(), name=f"retire-{r.name}")
        return [f"{r.name}: no longer configured; unloading once its requests finish"]


def catalog_for(settings: Settings) -> Catalog:
    """The catalog `settings` describe: config entries, the default, model folders (the pull
    folder among them), stores."""
    return Catalog(catalog_dirs(settings), {m.name: m.path for m in settings.models}, settings.include_default_model,
                   stores=functools.partial(scan_stores, settings.stores.model_dump()))


def _catalog_sources(settings: Settings) -> tuple[object, ...]:
    return (tuple(settings.model_dirs), tuple((m.name, m.path) for m in settings.models),
            settings.include_default_model, settings.stores)
