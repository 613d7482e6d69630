"""Plain, frozen pictures of backend state that cross every boundary: console, HTTP, notebook.

They carry only data (no engine handles), serialise to dicts for the admin API, and come back
from dicts in the remote backend, so the console renders a local and a remote server alike.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

from .display import repr_html, rich_renderable
from .memory import format_bytes
from .telemetry import GPUStats, HostStats


def percentile(values: Sequence[float], q: float) -> float | None:
    """The `q`-th percentile (0-100) of `values` by the nearest-rank method, None when empty.

    Nearest rank, not interpolation: with the few dozen requests a console shows, every
    figure is then a latency that really happened."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


@dataclass(frozen=True)
class RequestPercentiles:
    """TTFT, latency and speed over a model's recent requests (the manager keeps a bounded
    ring per model), for the console's details view and /api/ps."""

    count: int  # requests in the window
    ttft_p50: float | None
    ttft_p90: float | None
    ttft_p99: float | None
    latency_p50: float | None  # whole request: queue wait + prefill + decode
    latency_p90: float | None
    latency_p99: float | None
    tokens_per_s_p50: float | None

    @classmethod
    def of(cls, ttfts: Sequence[float], latencies: Sequence[float],
           speeds: Sequence[float]) -> RequestPercentiles:
        """Percentiles of the samples given (requests without a first token or a speed are
        counted in `latencies` only)."""
        return cls(count=len(latencies),
                   ttft_p50=percentile(ttfts, 50), ttft_p90=percentile(ttfts, 90),
                   ttft_p99=percentile(ttfts, 99),
                   latency_p50=percentile(latencies, 50), latency_p90=percentile(latencies, 90),
                   latency_p99=percentile(latencies, 99),
                   tokens_per_s_p50=percentile(speeds, 50))


STORE_SOURCES = ("ollama", "huggingface", "lmstudio")  # other tools' stores, in the clash rule's order


@dataclass(frozen=True)
class StoreInfo:
    """What a model's store keeps beside its file: an ollama manifest's params, system and
    template layers (stores.py). The defaults and the system prompt apply to the model."""

    manifest: str  # the manifest file the model was found by
    params: dict[str, Any] = field(default_factory=dict)  # the params layer as ollama wrote it
    defaults: dict[str, Any] = field(default_factory=dict)  # what corral applies of it, by corral's names
    system: str | None = None  # system prompt for chats that bring none
    template: str | None = None  # ollama's Go prompt template; chats use the GGUF's own template

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> StoreInfo | None:
        return None if data is None else cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})


@dataclass(frozen=True)
class NameClash:
    """Another file the catalog found under a model's name, left unused by the clash rule
    (catalog.py): listed so that a person sees it and can give it a name of its own."""

    source: str
    path: str | None
    reason: str


@dataclass(frozen=True)
class ModelInfo:
    name: str
    state: str  # available | loading | ready | busy | unloading | failed
    source: str  # config | default | dir | ollama | huggingface | lmstudio | alias
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
    has_chat_template: bool | None = None  # its own template (the GGUF's or config's); None: unknown
    oldest_wait_s: float = 0.0  # how long the longest-waiting queued request has waited
    requests: RequestPercentiles | None = None  # over recent requests; None before the first
    priority: int = 0  # waiting loads start highest first
    load_position: int | None = None  # 1 = next to load, while waiting behind another load
    alias_of: str | None = None  # a virtual model: the base model whose weights it shares
    placement: str | None = None  # why its layers went where they did (while loaded, or failed)
    gpu: int | None = None  # the GPU index holding its offloaded layers; None on CPU
    gpu_layers: int | None = None  # n_gpu_layers it was loaded with
    gpu_layers_total: int | None = None  # n_gpu_layers that offloads all of it (blocks + output)
    vram_estimate_bytes: int | None = None  # VRAM planned for those layers
    short_name: str | None = None  # a store model's file part, where it names no other model
    store: StoreInfo | None = None  # what its store keeps beside the file (an ollama manifest)
    clashes: tuple[NameClash, ...] = ()  # other files under this name that lost the clash rule
    kv_types: str = "f16"  # the KV cache's element types: "f16", or K/V such as "q8_0/q8_0"
    parked_bytes: int = 0  # idle sequences' KV parked beside its cache, counted against the budget too
    kind: str | None = None  # what it serves (kinds.py): chat, embedding or rerank; None: header unread

    _repr_html_ = repr_html  # Jupyter and Rich show a table (display.py)
    __rich__ = rich_renderable

    @property
    def loaded(self) -> bool:
        return self.state in ("ready", "busy")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelInfo:
        values = {f.name: data.get(f.name) for f in fields(cls) if f.name in data or f.default is MISSING}
        if values["measured_vram"]:  # JSON turned the GPU indexes into strings
            values["measured_vram"] = {int(k): v for k, v in values["measured_vram"].items()}
        if values.get("requests") is not None:
            values["requests"] = RequestPercentiles(**values["requests"])
        if "store" in values:
            values["store"] = StoreInfo.from_dict(values["store"])
        if "clashes" in values:
            values["clashes"] = tuple(NameClash(**clash) for clash in values["clashes"] or ())
        return cls(**values)  # fields a server from before them did not send keep their defaults


@dataclass(frozen=True)
class ModelDetails:
    """The facts of one catalog model's file, for clients that show or compare a model (its
    header, its sha256): heavier than ModelInfo, so asked for one model at a time."""

    name: str
    path: str | None
    file_size: int | None
    modified_at: float | None  # the file's mtime, unix time
    digest: str | None  # sha256 (hex) of the whole file; None when it cannot be read
    architecture: str | None
    parameters: int | None
    quantization: str | None  # the GGUF file type, e.g. "Q8_0"
    context_length: int | None  # trained context
    n_ctx: int  # context this model loads with
    chat_template: str | None  # the template text its config or GGUF gives; None: a fallback is used
    metadata: dict[str, str | int | float | bool]  # the GGUF header's scalars, long strings cut
    alias_of: str | None = None  # an alias describes its base model's file under its own name
    source: str | None = None  # where the catalog found it (ModelInfo.source)
    store: StoreInfo | None = None  # what its store keeps beside the file (an ollama manifest)
    kind: str | None = None  # what it serves (kinds.py): chat, embedding or rerank; None: header unread

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelDetails:
        values = {f.name: data.get(f.name) for f in fields(cls) if f.name in data or f.default is MISSING}
        if "store" in values:
            values["store"] = StoreInfo.from_dict(values["store"])
        return cls(**values)


@dataclass(frozen=True)
class Status:
    models: tuple[ModelInfo, ...]
    host: HostStats
    ram_budget: int
    ram_reserved: int  # measured (or estimated) memory of loaded and loading models
    max_loaded: int

    _repr_html_ = repr_html  # Jupyter and Rich show tables of the host and the models (display.py)
    __rich__ = rich_renderable

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


# the settings a plan may try other values of (all decide how a model is built)
PLANNABLE = ("n_ctx", "n_parallel", "n_batch", "n_ubatch", "type_k", "type_v", "flash_attn", "n_gpu_layers")


@dataclass(frozen=True)
class Eviction:
    model: str
    bytes: int  # RAM it gives back
    reason: str


@dataclass(frozen=True)
class LoadPlan:
    """What loading `model` with `settings` would take, as admission would decide it now."""

    model: str
    state: str  # its state now; a loaded model's plan is for loading it again with `settings`
    settings: dict[str, Any]  # the PLANNABLE settings the plan is for
    estimate: dict[str, int]  # weights, kv_cache, compute, embeddings, total
    ram_bytes: int  # RAM the placement takes
    vram_bytes: int
    gpu: int | None
    n_gpu_layers: int
    placement: str  # where it would go, and why
    ram_budget: int
    ram_reserved: int  # held by the other resident models
    max_loaded: int
    loaded: int  # other resident models
    fits: bool
    evictions: tuple[Eviction, ...] = ()
    waits_for: tuple[str, ...] = ()  # models already unloading that it would wait for
    refusal: str | None = None
    suggestions: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoadPlan:
        values = {f.name: data[f.name] for f in fields(cls) if f.name in data}
        values["evictions"] = tuple(Eviction(**e) for e in values.get("evictions") or ())
        values["waits_for"] = tuple(values.get("waits_for") or ())
        values["suggestions"] = tuple(values.get("suggestions") or ())
        return cls(**values)

    def render(self) -> str:
        """The plan as an operator reads it: `corral plan` prints this."""
        e = self.estimate
        lines = [f"{self.model} ({self.state}): " + ", ".join(f"{k} {v}" for k, v in self.settings.items()),
                 f"estimate {format_bytes(e['total'])}: weights {format_bytes(e['weights'])}, KV cache "
                 f"{format_bytes(e['kv_cache'])}, compute {format_bytes(e['compute'])}, embeddings "
                 f"{format_bytes(e.get('embeddings', 0))}",
                 f"placement: {self.placement} (RAM {format_bytes(self.ram_bytes)}"
                 + (f", VRAM {format_bytes(self.vram_bytes)} on GPU {self.gpu})" if self.vram_bytes else ")"),
                 f"RAM budget {format_bytes(self.ram_budget)}: {format_bytes(self.ram_reserved)} held by "
                 f"{self.loaded} other model(s), {format_bytes(self.ram_budget - self.ram_reserved)} free; "
                 f"max_loaded {self.max_loaded}"]
        lines += [f"waits for {name} to finish unloading" for name in self.waits_for]
        lines += [f"evicts {x.model} ({format_bytes(x.bytes)}): {x.reason}" for x in self.evictions]
        if self.fits:
            lines.append("fits" + (" after evicting " + ", ".join(x.model for x in self.evictions)
                                   if self.evictions else " without evicting anything"))
        else:
            lines.append(f"does not fit: {self.refusal}")
        lines += [f"would fit: {s}" for s in self.suggestions]
        return "\n".join(lines)
