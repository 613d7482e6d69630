"""How much memory a model will need, estimated from GGUF metadata before loading.

Admission decisions are made on the estimate; after a load the measured figure replaces it
(see `Manager`), and both stay visible so an operator can judge the estimate.
"""

from __future__ import annotations

from dataclasses import dataclass

import psutil

from .ggufmeta import GGUFInfo

KV_BYTES_PER_ELEMENT = 2  # f16 K and V caches
LOGIT_BYTES = 4  # f32
FIXED_OVERHEAD = 4 * 2**20  # graph metadata, sampler state, tokenizer tables


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int
    kv_cache: int
    compute: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.compute

    def to_dict(self) -> dict[str, int]:
        return {"weights": self.weights, "kv_cache": self.kv_cache, "compute": self.compute,
                "total": self.total}


def kv_cache_bytes(info: GGUFInfo, n_ctx: int) -> int:
    """K and V for every layer over the whole (unified) context: n_ctx is shared by all
    sequences, and sliding-window layers are kept full size (swa_full) so prefixes can be reused."""
    per_token = info.n_layer * info.n_kv_head * (info.head_dim_k + info.head_dim_v)
    return per_token * n_ctx * KV_BYTES_PER_ELEMENT


def compute_bytes(info: GGUFInfo, n_ctx: int, n_parallel: int, n_ubatch: int, flash_attn: bool) -> int:
    """llama.cpp's compute buffer is sized for the worst graph (a full micro-batch of prompt):
    activations, attention scores over the context (unless flash attention tiles them), and
    one row of logits per sequence in the output buffer."""
    n_ubatch = min(n_ubatch, n_ctx)
    n_ff = _int_meta(info, f"{info.architecture}.feed_forward_length", info.n_embd * 4)
    activations = n_ubatch * (4 * info.n_embd + 2 * n_ff) * 4
    scores = 0 if flash_attn else n_ubatch * max(info.n_head, 1) * n_ctx * 4
    logits = max(info.vocab_size, 1) * (n_parallel + 1) * LOGIT_BYTES
    return activations + scores + logits + FIXED_OVERHEAD


def _int_meta(info: GGUFInfo, key: str, default: int) -> int:
    value = info.metadata.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def estimate(info: GGUFInfo, *, n_ctx: int, n_parallel: int, n_ubatch: int = 512,
             flash_attn: bool = False) -> MemoryEstimate:
    return MemoryEstimate(
        weights=info.tensor_bytes,
        kv_cache=kv_cache_bytes(info, n_ctx),
        compute=compute_bytes(info, n_ctx, n_parallel, n_ubatch, flash_attn),
    )


def process_rss() -> int:
    return psutil.Process().memory_info().rss


def default_ram_budget(fraction: float) -> int:
    """A fraction of the memory available now (not total): what other programs already use
    is not ours to plan with."""
    return int(psutil.virtual_memory().available * fraction)


def format_bytes(n: int | float | None) -> str:
    if n is None:
        return "n/a"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"
