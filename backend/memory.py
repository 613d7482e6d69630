"""How much memory a model will need, estimated from GGUF metadata before loading.

Admission decisions are made on the estimate; after a load the measured figure replaces it
(see `Manager`), and both stay visible so an operator can judge the estimate. The process's
own side lives here too: its RSS, and the glibc call that makes RSS follow evictions.
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass
from typing import Any

import psutil

from .ggufmeta import GGUFInfo

# bytes per KV cache element of each type llama.cpp takes (config.KVType): q8_0 and q4_0 keep
# blocks of 32 values with one f16 scale (34 and 18 bytes a block)
KV_BYTES_PER_ELEMENT = {"f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}
LOGIT_BYTES = 4  # f32
FIXED_OVERHEAD = 14 * 2**20  # once per model: graph metadata, threads' stacks and work buffers, samplers
# llama.cpp's vocabulary in host memory (each token's text and attributes, the lookup maps):
# measured 42 MiB of RSS for gemma-3's 262,144 tokens, beside 248 MiB of tensors.
VOCAB_BYTES_PER_TOKEN = 160


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a model needs, and how they divide over llama.cpp's offloadable layers.

    llama.cpp counts `n_layer + 1` offloadable layers: `n_gpu_layers = k` puts the last k
    blocks (with their share of the KV cache) on the GPU, and only k = n_layer + 1 adds the
    output head; the token embeddings always stay in RAM. `vram(k)` and `ram(k)` give the
    two sides of such a split, so placement can plan a partial offload.
    """

    weights: int  # tensors, and the vocabulary that stays in RAM
    kv_cache: int
    compute: int
    embeddings: int = 0  # the embeddings context (`Embedder`): its KV cache, compute and outputs
    n_layer: int = 0
    layer_weights: int = 0  # one repeating block
    head_weights: int = 0  # the output head; a tied head is a GPU copy of the token embeddings
    head_tied: bool = True

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.compute + self.embeddings

    @property
    def gpu_layers_total(self) -> int:
        """The `n_gpu_layers` that offloads everything (llama.cpp's own count)."""
        return self.n_layer + 1

    def _blocks(self, n_gpu_layers: int) -> tuple[int, bool]:
        """(blocks on the GPU, whether the output head is) for `n_gpu_layers`."""
        k = min(max(n_gpu_layers, 0), self.gpu_layers_total)
        return min(k, self.n_layer), k > self.n_layer

    def vram(self, n_gpu_layers: int) -> int:
        """GPU memory for `n_gpu_layers`: their weights and KV, plus a compute buffer once any
        layer is there (llama.cpp sizes it for the worst graph whatever the split)."""
        blocks, head = self._blocks(n_gpu_layers)
        if blocks == 0 and not head:
            return 0
        kv_per_layer = self.kv_cache // self.n_layer if self.n_layer else 0
        return (blocks * (self.layer_weights + kv_per_layer) + (self.head_weights if head else 0) + self.compute
                + self.embeddings)

    def ram(self, n_gpu_layers: int) -> int:
        """Host memory for `n_gpu_layers`: what is not offloaded, plus the host compute and
        output buffers (kept whole: llama.cpp always has a host graph for the CPU part)."""
        blocks, head = self._blocks(n_gpu_layers)
        kv_left = self.kv_cache * (self.n_layer - blocks) // self.n_layer if self.n_layer else self.kv_cache
        moved = blocks * self.layer_weights + (self.head_weights if head and not self.head_tied else 0)
        return max(self.weights - moved, 0) + kv_left + self.compute + self.embeddings

    def to_dict(self) -> dict[str, int]:
        return {"weights": self.weights, "kv_cache": self.kv_cache, "compute": self.compute,
                "embeddings": self.embeddings, "total": self.total}


def kv_cache_bytes(info: GGUFInfo, n_ctx: int, type_k: str = "f16", type_v: str = "f16") -> int:
    """K and V for every layer over the whole (unified) context: n_ctx is shared by all
    sequences, and sliding-window layers are kept full size (swa_full) so prefixes can be reused."""
    heads = info.n_layer * info.n_kv_head
    per_token = heads * (info.head_dim_k * KV_BYTES_PER_ELEMENT[type_k] + info.head_dim_v * KV_BYTES_PER_ELEMENT[type_v])
    return int(per_token * n_ctx)


def compute_bytes(info: GGUFInfo, n_ctx: int, n_outputs: int, n_ubatch: int, flash_attn: bool,
                  fixed: int = FIXED_OVERHEAD) -> int:
    """The part of llama.cpp's compute buffer a graph actually touches, and its output buffer.

    llama.cpp reserves the compute buffer for its worst graph, a micro-batch whose every token
    outputs logits (514.5 MiB at n_ubatch 512 for gemma-3's 262,144-token vocabulary), but the
    pages are only touched as far as the graphs run reach, and a graph allocates from the
    buffer's start: one micro-batch of activations (the widths that are alive together in an
    FFN and an attention block), the attention mask over the context (f16; one more for
    sliding-window layers) or, without flash attention, the scores themselves, and logits only
    for the rows asked for (`n_outputs`: one per sequence here), which the output buffer then
    holds again. The per-token widths and the fixed part were fitted to the peaks that
    tests/benchmarks/memory_matrix.py measures."""
    n_ubatch = min(n_ubatch, n_ctx)
    n_ff = _int_meta(info, f"{info.architecture}.feed_forward_length", info.n_embd * 4)
    activations = n_ubatch * (5 * info.n_embd + 3 * n_ff) * 4
    masks = 2 if info.sliding_window else 1
    attention = n_ubatch * n_ctx * (2 * masks if flash_attn else 4 * (masks + max(info.n_head, 1)))
    logits = max(info.vocab_size, 1) * (n_outputs + 1) * LOGIT_BYTES
    return activations + attention + logits + fixed


class EmbeddingShape:
    """The size of the embeddings context (`Embedder`) and of the chunks it decodes, worked out
    here so the estimate counts exactly what it will open.

    An embeddings context outputs every token, and llama.cpp sizes its output buffer and
    compute graph with a row of logits per output token (n_vocab floats: 1 MiB each for
    gemma-3's 262,144): one pass over a 2,048-token text would reserve 2 GiB. So texts go
    through in chunks whose logits fit in LOGITS_BYTES (at least MIN_CHUNK and at most
    MAX_CHUNK tokens, so activations stay bounded for a small vocabulary too). A model
    without causal attention (an encoder such as BERT or EmbeddingGemma) must see a text in
    one micro-batch, so its context is as long as ONE_PASS_LOGITS_BYTES allows: 2,048 tokens
    for BERT's 30,522-token vocabulary, 256 for EmbeddingGemma's 262,144."""

    MAX_CTX = 2048
    MIN_CTX = 64
    LOGITS_BYTES = 32 * 2**20
    ONE_PASS_LOGITS_BYTES = 256 * 2**20
    MIN_CHUNK = 16
    MAX_CHUNK = 512

    @classmethod
    def of(cls, *, n_ctx: int, n_ctx_train: int, n_vocab: int, causal: bool) -> tuple[int, int]:
        """(context length, tokens per chunk)."""
        context = max(cls.MIN_CTX, min(n_ctx, n_ctx_train or n_ctx, cls.MAX_CTX))
        per_token = 4 * max(n_vocab, 1)
        if not causal:
            one_pass = min(context, max(cls.MIN_CTX, cls.ONE_PASS_LOGITS_BYTES // per_token))
            return one_pass, one_pass
        return context, min(context, cls.MAX_CHUNK, max(cls.MIN_CHUNK, cls.LOGITS_BYTES // per_token))


# architectures llama.cpp runs with bidirectional attention unless the GGUF says otherwise
ENCODERS = frozenset({"bert", "nomic-bert", "nomic-bert-moe", "jina-bert-v2", "jina-bert-v3", "modern-bert",
                      "neo-bert", "t5encoder"})


def causal_attention(info: GGUFInfo) -> bool:
    value = info.metadata.get(f"{info.architecture}.attention.causal")
    return value if isinstance(value, bool) else info.architecture not in ENCODERS


def embeddings_bytes(info: GGUFInfo, n_ctx: int) -> int:
    """The embeddings context a model opens at its first embedding request: an f16 KV cache
    for its length, a chunk's compute (flash attention) and its outputs (logits and states)."""
    context, chunk = EmbeddingShape.of(n_ctx=n_ctx, n_ctx_train=info.context_length or n_ctx,
                                       n_vocab=info.vocab_size, causal=causal_attention(info))
    outputs = chunk * (max(info.vocab_size, 1) + info.n_embd) * LOGIT_BYTES
    return kv_cache_bytes(info, context) + compute_bytes(info, context, chunk, chunk, True, fixed=0) + outputs


def _int_meta(info: GGUFInfo, key: str, default: int) -> int:
    value = info.metadata.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def block_parameters(info: GGUFInfo) -> int:
    """Parameters of one transformer block of the usual shape (attention, gated FFN or
    experts, two norms), from the header's dimensions."""
    a = info.architecture
    experts = _int_meta(info, f"{a}.expert_count", 0)
    n_ff = _int_meta(info, f"{a}.expert_feed_forward_length" if experts else f"{a}.feed_forward_length",
                     _int_meta(info, f"{a}.feed_forward_length", info.n_embd * 4))
    head_dims = info.head_dim_k + info.head_dim_v
    attention = info.n_embd * (info.n_head + info.n_kv_head) * head_dims
    ffn = 3 * info.n_embd * n_ff * max(experts, 1) + info.n_embd * experts
    return attention + ffn + 2 * info.n_embd


def weight_split(info: GGUFInfo) -> tuple[int, int, bool]:
    """(bytes of one block, bytes of the output head, whether the head is tied).

    The header reader keeps totals, not per-tensor sizes, so the split is worked out from
    the dimensions: the embeddings are vocab x n_embd at the file's average bytes per
    parameter, and a file holding about two such matrices beyond its blocks has a separate
    output head; the rest divides evenly over the blocks."""
    if info.n_layer <= 0 or info.parameter_count <= 0:
        return 0, 0, True
    embedding = info.vocab_size * info.n_embd
    outside = info.parameter_count - info.n_layer * block_parameters(info)
    tied = outside < 1.5 * embedding
    head = min(int(embedding * info.tensor_bytes / info.parameter_count), info.tensor_bytes)
    blocks = max(info.tensor_bytes - head * (1 if tied else 2), 0)
    return blocks // info.n_layer, head, tied


def estimate(info: GGUFInfo, *, n_ctx: int, n_parallel: int, n_ubatch: int = 512,
             flash_attn: bool = False, type_k: str = "f16", type_v: str = "f16") -> MemoryEstimate:
    layer, head, tied = weight_split(info)
    return MemoryEstimate(
        weights=info.tensor_bytes + max(info.vocab_size, 0) * VOCAB_BYTES_PER_TOKEN,
        kv_cache=kv_cache_bytes(info, n_ctx, type_k, type_v),
        compute=compute_bytes(info, n_ctx, n_parallel, n_ubatch, flash_attn),
        embeddings=embeddings_bytes(info, n_ctx),
        n_layer=max(info.n_layer, 0), layer_weights=layer, head_weights=head, head_tied=tied,
    )


def process_rss() -> int:
    return psutil.Process().memory_info().rss


@functools.cache
def _malloc_trim() -> Any:
    """glibc's `malloc_trim`, or None on a C library without it (musl, macOS). Looked up in the
    process's own symbols, not by `find_library` (which runs ldconfig), and only when first
    needed."""
    try:
        function = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError, TypeError):  # TypeError: no CDLL(None) on Windows
        return None
    function.restype, function.argtypes = ctypes.c_int, (ctypes.c_size_t,)
    return function


def return_free_memory() -> None:
    """Give the pages malloc holds free back to the OS.

    llama.cpp allocates a context's KV cache and compute buffers with malloc. Once glibc has
    freed one large mmapped block it raises its mmap threshold, so later buffers of a few MiB
    come from the heap arenas, and freeing them leaves the pages resident. Without a trim, an
    evicted model's memory stays in RSS and the RAM budget counts it as used."""
    malloc_trim = _malloc_trim()
    if malloc_trim is not None:
        malloc_trim(0)


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
