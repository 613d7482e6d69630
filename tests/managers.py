"""Managers for tests: settings over a model folder, an event recorder, and starting managers
that are always closed (the `running` fixture in conftest.py)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from corral.backend.config import settings_from_dict
from corral.backend.events import Event, EventBus, StateChanged
from corral.backend.manager import Manager
from ggufs import write_tiny_llama


def make_settings(model_dir: Path | None, **sections: Any) -> Any:
    data: dict[str, Any] = {
        "include_default_model": False,
        "model_dirs": [str(model_dir)] if model_dir else [],
        "defaults": {"n_ctx": 256, "n_parallel": 2, "n_threads": 1, "keep_alive": -1},
    }
    for key, value in sections.items():
        if isinstance(value, dict):
            data.setdefault(key, {}).update(value)
        else:
            data[key] = value
    return settings_from_dict(data)


class Recorder:
    """Collects every event the bus publishes, in order."""

    def __init__(self, bus: EventBus) -> None:
        self.events: list[Event] = []
        self._task = asyncio.create_task(self._run(bus))

    async def _run(self, bus: EventBus) -> None:
        async for event in bus.subscribe():
            self.events.append(event)

    def states(self, model: str) -> list[tuple[str, str]]:
        return [(e.old, e.new) for e in self.events if isinstance(e, StateChanged) and e.model == model]

    def reasons(self, model: str) -> list[str]:
        return [e.reason for e in self.events if isinstance(e, StateChanged) and e.model == model]

    async def settle(self) -> None:
        """Let published events reach the recorder (they hop through call_soon_threadsafe)."""
        for _ in range(5):
            await asyncio.sleep(0.01)

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        async def poll() -> None:
            while not predicate():
                await asyncio.sleep(0.02)

        await asyncio.wait_for(poll(), timeout)

    def close(self) -> None:
        self._task.cancel()


@contextlib.asynccontextmanager
async def started() -> AsyncIterator[Callable[..., Any]]:
    """Start managers for a test and always close them (models unloaded, threads joined): the
    `running` fixture (conftest.py)."""
    started: list[tuple[Manager, Recorder]] = []

    async def start(settings: Any, make: Callable[[Any, EventBus], Manager] = Manager) -> tuple[Any, Recorder]:
        bus = EventBus()
        recorder = Recorder(bus)
        await asyncio.sleep(0)  # let the recorder subscribe before anything is published
        manager = make(settings, bus)
        await manager.start()
        started.append((manager, recorder))
        return manager, recorder

    yield start
    for manager, recorder in started:
        await manager.close()
        recorder.close()


def state(manager: Manager, name: str) -> str:
    return manager.info(manager.record(name)).state


def kv_heavy_dir(root: Path) -> Path:
    """Models whose KV cache (64 MiB at n_ctx 16384) dwarfs everything else, so the measured
    resident memory of a load is large and stable."""
    for seed, name in enumerate(("big-a", "big-b", "big-c")):
        write_tiny_llama(root / f"{name}.gguf", name=name, seed=seed, n_layer=4, n_embd=256, n_head=4,
                         n_kv_head=4, n_ff=256, context_length=16384)
    return root
