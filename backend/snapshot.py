"""Plain, frozen pictures of backend state that cross every boundary: console, HTTP, notebook.

They carry only data (no engine handles), serialise to dicts for the admin API, and come back
from dicts in the remote backend, so the console renders a local and a remote server alike.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from .telemetry import GPUStats, HostStats


@dataclass(frozen=True)
class ModelInfo:
    name: str
    state: str  # available | loading | ready | busy | unloading | failed
    source: str  # default | dir | config
    path: str | None
    usable: bool
    error: str | None
    file_size: int | None
    architecture: str | None
    quantization: str | None
    parameters: int | None
    context_length: int | None  # trained context
    n_ctx: int  # context this model loads with
    n_parallel: int
    pinned: bool
    keep_alive_s: float  # negative: never expires
    ttl_left_s: float | None  # None: no expiry pending (busy, pinned, forever, or not loaded)
    in_flight: int  # requests running or queued
    active: int
    queued: int
    tokens_per_s: float
    estimate_bytes: int | None
    estimate_detail: dict[str, int] | None
    measured_bytes: int | None  # resident memory the load added (RSS delta after warm-up)
    measured_vram: dict[int, int] | None  # VRAM the load took, per GPU index (None without GPU)
    load_seconds: float | None
    load_percent: int | None
    last_used: float | None  # unix time
    chat_template: str | None  # which template chats use (gguf / config / fallback:<name>)

    @property
    def loaded(self) -> bool:
        return self.state in ("ready", "busy")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelInfo:
        values = {f.name: data.get(f.name) for f in fields(cls)}
        if values["measured_vram"]:  # JSON turned the GPU indexes into strings
            values["measured_vram"] = {int(k): v for k, v in values["measured_vram"].items()}
        return cls(**values)


@dataclass(frozen=True)
class Status:
    models: tuple[ModelInfo, ...]
    host: HostStats
    ram_budget: int
    ram_reserved: int  # measured (or estimated) memory of loaded and loading models
    max_loaded: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "models": [m.to_dict() for m in self.models],
            "host": asdict(self.host),
            "ram_budget": self.ram_budget,
            "ram_reserved": self.ram_reserved,
            "max_loaded": self.max_loaded,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Status:
        host = dict(data["host"])
        host["gpus"] = tuple(GPUStats(**g) for g in host.get("gpus", ()))
        return cls(
            models=tuple(ModelInfo.from_dict(m) for m in data["models"]),
            host=HostStats(**host),
            ram_budget=data["ram_budget"],
            ram_reserved=data["ram_reserved"],
            max_loaded=data["max_loaded"],
        )
