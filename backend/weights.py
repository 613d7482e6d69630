"""A loaded model's weights, shared by every context that decodes with them.

DESIGN.md keeps weights apart from contexts: the generation `Engine`, its `Embedder` and any
later virtual model each open a context of their own on one reference-counted `llama_model`,
so none of them costs a second load. The llama.cpp helpers that every context needs (the
one-time backend set-up, `new_context` with its settings chosen on purpose, `batch_add`) live
here too, beside the weights they work on.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import threading
from collections.abc import Callable

import llama_cpp

from . import llamalog
from .chat import ChatTemplate, choose_template
from .errors import BadRequest, FileRejected, LoadFailed

log = logging.getLogger("corral.engine")

_backend_lock = threading.Lock()
_backend_ready = False


def init_backend() -> None:
    """Once per process: our log callback first, then llama.cpp's backend."""
    global _backend_ready
    with _backend_lock:
        if not _backend_ready:
            llamalog.install()
            llama_cpp.llama_backend_init()
            _backend_ready = True


@functools.cache
def cpu_has_amx() -> bool:
    """Whether this CPU advertises AMX (Sapphire Rapids and later Xeons).

    There llama.cpp moves quantized weights into AMX buffers, and its AMX matrix multiply
    crashes the process (SIGSEGV in ggml_backend_amx_mul_mat, llama.cpp #20824): seen here with
    the default model (Q4_K_M) at the first decode, in corral and in llama-server alike. So on
    such a CPU weights load without llama.cpp's extra buffer types (no AMX, no repacking), as
    llama-server's `--no-repack` does."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return "amx_int8" in line.split()
    except OSError:  # not Linux: no AMX build of llama.cpp to worry about
        pass
    return False


def model_meta(model: llama_cpp.llama_model_p, key: str) -> str | None:
    """A loaded model's GGUF metadata value as text, whole however long (a chat template runs
    to kilobytes); None when the file has no such key."""
    size = 256
    while True:
        buf = ctypes.create_string_buffer(size)
        n = llama_cpp.llama_model_meta_val_str(model, key.encode(), buf, size)
        if n < 0:
            return None
        if n < size:
            return buf.value.decode("utf-8", errors="replace")
        size = n + 1  # llama.cpp says how long the value is: read it again, whole


ProgressFn = Callable[[float], None]

# Turn delimiters of the chat formats in use (gemma, chatml, llama 3, phi 3); a vocabulary that
# has one as a single control token gets it as a stop token for chat requests.
TURN_MARKERS = ("<start_of_turn>", "<end_of_turn>", "<|im_start|>", "<|im_end|>", "<|start_header_id|>",
                "<|eot_id|>", "<|end|>", "<|user|>", "<|assistant|>")


class ModelWeights:
    """A loaded `llama_model`, shared by reference count; freed when the last user releases it."""

    def __init__(self, path: str, *, n_gpu_layers: int = 0, main_gpu: int | None = None,
                 progress: ProgressFn | None = None) -> None:
        init_backend()
        self.path = path
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = n_gpu_layers
        if main_gpu is not None:  # placement chose one GPU: keep llama.cpp from splitting over all
            params.split_mode = llama_cpp.LLAMA_SPLIT_MODE_NONE
            params.main_gpu = main_gpu
        params.use_mmap = True
        params.use_extra_bufts = not cpu_has_amx()

        def on_progress(fraction: float, _user: ctypes.c_void_p) -> bool:
            if progress is not None:
                try:
                    progress(fraction)
                except Exception:  # a UI callback must never abort a load
                    log.exception("load progress callback failed")
            return True

        callback = llama_cpp.llama_progress_callback(on_progress)
        params.progress_callback = callback
        with llamalog.capture() as captured:
            model = llama_cpp.llama_model_load_from_file(path.encode(), params)
        if not model:
            lines = captured.problems()
            detail = "; ".join(lines) if lines else "llama.cpp gave no reason"
            raise FileRejected(f"{path}: llama.cpp could not load this file: {detail}")
        self._model = model
        self.vocab = llama_cpp.llama_model_get_vocab(model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.n_ctx_train = llama_cpp.llama_model_n_ctx_train(model)
        self.bos = llama_cpp.llama_vocab_bos(self.vocab)
        self.eos = llama_cpp.llama_vocab_eos(self.vocab)
        self.add_bos = bool(llama_cpp.llama_vocab_get_add_bos(self.vocab))
        self.add_eos = bool(llama_cpp.llama_vocab_get_add_eos(self.vocab))
        self.sep = llama_cpp.llama_vocab_sep(self.vocab)
        self.add_sep = bool(llama_cpp.llama_vocab_get_add_sep(self.vocab))
        # A recurrent state is one per sequence, not cells by position: it cannot be cut or shared
        # at a prefix.
        self.recurrent = bool(llama_cpp.llama_model_is_recurrent(model) or llama_cpp.llama_model_is_hybrid(model))
        self._refs = 1
        self._lock = threading.Lock()
        self._prototypes: dict[tuple[object, ...], llama_cpp.llama_sampler_p] = {}

    @property
    def handle(self) -> llama_cpp.llama_model_p:
        return self._model

    def retain(self) -> ModelWeights:
        with self._lock:
            if self._refs <= 0:
                raise RuntimeError("weights already freed")
            self._refs += 1
        return self

    def prototype(self, key: tuple[object, ...], make: Callable[[], llama_cpp.llama_sampler_p]) -> llama_cpp.llama_sampler_p:
        """A sampler kept for these weights' life, to be cloned (llama_sampler_clone) per
        request: DRY reads the whole vocabulary when it is made (110 ms on the default model's
        262,144 tokens) and a clone costs 0.07 ms. `make` runs once per `key`."""
        with self._lock:
            if key not in self._prototypes:
                self._prototypes[key] = make()
            return self._prototypes[key]

    def release(self) -> None:
        with self._lock:
            self._refs -= 1
            free = self._refs == 0
        if free:
            for sampler in self._prototypes.values():
                llama_cpp.llama_sampler_free(sampler)
            self._prototypes.clear()
            llama_cpp.llama_model_free(self._model)
            self._model = None

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool = True) -> list[int]:
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError:
            raise BadRequest("the text contains a lone surrogate (\\ud800-\\udfff), which is not text") from None
        capacity = len(data) + 16
        buf = (llama_cpp.llama_token * capacity)()
        n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, capacity, add_special, parse_special)
        if n < 0:
            capacity = -n
            buf = (llama_cpp.llama_token * capacity)()
            n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, capacity, add_special, parse_special)
        return list(buf[:n])

    def piece(self, token: int, special: bool = False) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, 64, 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, -n, 0, special)
        return buf.raw[:n]

    def detokenize(self, tokens: list[int]) -> str:
        return b"".join(self.piece(t) for t in tokens).decode("utf-8", errors="replace")

    def byte_token(self, byte: int) -> int | None:
        """A token whose text is exactly this one byte (a byte-fallback or byte-level token),
        or None; a lazy grammar replays the part of a token its trigger cut through these."""
        return self._byte_tokens.get(byte)

    @functools.cached_property
    def _byte_tokens(self) -> dict[int, int]:
        """Byte tokens sit near the start of a vocabulary: the scan usually ends within the
        first few hundred ids, and only a vocabulary lacking some byte reads all of it."""
        found: dict[int, int] = {}
        for token in range(self.n_vocab):
            piece = self.piece(token)
            if len(piece) == 1:
                found.setdefault(piece[0], token)
                if len(found) == 256:
                    break
        return found

    def is_eog(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self.vocab, token))

    @functools.cached_property
    def turn_tokens(self) -> frozenset[int]:
        """Control tokens that open or close a chat turn in this vocabulary. A chat answer ends
        at any of them: a small or base model that skips its end-of-turn token goes on to write
        the user's next turn itself, and that text is not the assistant's answer."""
        return self.control_tokens(TURN_MARKERS)

    def control_tokens(self, markers: tuple[str, ...] | list[str]) -> frozenset[int]:
        """The markers this vocabulary holds as single control tokens."""
        found = set()
        for marker in markers:
            tokens = self.tokenize(marker, add_special=False, parse_special=True)
            if len(tokens) == 1 and llama_cpp.llama_vocab_is_control(self.vocab, tokens[0]):
                found.add(tokens[0])
        return frozenset(found)

    def meta(self, key: str) -> str | None:
        return model_meta(self._model, key)

    @functools.cached_property
    def pooling(self) -> str:
        """How the GGUF says a text's vector is made from its tokens' states: "mean", "cls"
        (the first token, as BGE models), "last" (the last token, as Qwen3-Embedding) or "rank"
        (a reranker's score); "mean" where it says nothing."""
        arch = self.meta("general.architecture") or ""
        value = self.meta(f"{arch}.pooling_type")
        return {"2": "cls", "3": "last", "4": "rank"}.get(value or "", "mean")

    @functools.cached_property
    def rerank_template(self) -> str | None:
        """A reranker's prompt for one pair, with {query} and {document} in it, where its GGUF
        has one (tokenizer.chat_template.rerank, as Qwen3-Reranker's converters write)."""
        raw = llama_cpp.llama_model_chat_template(self._model, b"rerank")
        return raw.decode("utf-8", errors="replace") if raw else None

    def gguf_chat_template(self) -> str | None:
        raw = llama_cpp.llama_model_chat_template(self._model, None)
        return raw.decode("utf-8", errors="replace") if raw else None

    def chat_template(self, architecture: str, *, config_format: str | None = None,
                      config_template: str | None = None) -> ChatTemplate:
        special = lambda t: self.piece(t, special=True).decode("utf-8", "replace") if t >= 0 else ""  # noqa: E731
        return choose_template(
            gguf_template=self.gguf_chat_template(), architecture=architecture,
            bos_token=special(self.bos), eos_token=special(self.eos),
            config_format=config_format, config_template=config_template,
        )


KV_TYPES = {"f16": llama_cpp.GGML_TYPE_F16, "q8_0": llama_cpp.GGML_TYPE_Q8_0, "q4_0": llama_cpp.GGML_TYPE_Q4_0}


def new_context(weights: ModelWeights, *, n_ctx: int, n_batch: int, n_seq_max: int, n_threads: int,
                flash_attn: bool, embeddings: bool = False, rank: bool = False, n_ubatch: int | None = None,
                type_k: str = "f16", type_v: str = "f16") -> llama_cpp.llama_context_p:
    """A llama.cpp context with every setting that matters chosen on purpose (DESIGN.md).
    `embeddings` outputs every token's state, or with `rank` a reranker's scores per sequence."""
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = n_ctx
    params.n_batch = n_batch
    params.n_ubatch = min(n_ubatch or n_batch, n_batch)
    params.n_seq_max = n_seq_max
    params.n_threads = params.n_threads_batch = n_threads
    params.flash_attn_type = 1 if flash_attn else 0
    params.type_k, params.type_v = KV_TYPES[type_k], KV_TYPES[type_v]
    params.swa_full = True  # full-size sliding-window cache: prefixes stay reusable
    params.kv_unified = True  # all sequences share n_ctx instead of n_ctx / n_seq_max each
    params.no_perf = True
    if embeddings:
        params.embeddings = True
        # per-token states (`Embedder` pools them), or llama.cpp's RANK pooling and classifier head
        params.pooling_type = llama_cpp.LLAMA_POOLING_TYPE_RANK if rank else llama_cpp.LLAMA_POOLING_TYPE_NONE
    with llamalog.capture() as captured:
        ctx = llama_cpp.llama_init_from_model(weights.handle, params)
    if not ctx:
        detail = "; ".join(captured.problems()) or "llama.cpp gave no reason"
        raise LoadFailed(f"{weights.path}: could not create a context (n_ctx {n_ctx}): {detail}")
    return ctx


def batch_add(batch: llama_cpp.llama_batch, token: int, pos: int, seq_id: int, logits: bool) -> None:
    """Append one token of one sequence to a llama_batch."""
    i = batch.n_tokens
    batch.token[i] = token
    batch.pos[i] = pos
    batch.n_seq_id[i] = 1
    batch.seq_id[i][0] = seq_id
    batch.logits[i] = logits
    batch.n_tokens = i + 1
