"""Embeddings: pooled vectors from a second context on a generation model's weights.

Kept apart from the generation engine because nothing is shared but the weights: its own
small context, its own lock, and calls that block a worker thread instead of joining the
scheduler's batches (`Engine.embed_async` runs them).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

import llama_cpp
import numpy as np

from .errors import BadRequest, Cancelled
from .memory import EmbeddingShape
from .weights import ModelWeights, batch_add, new_context

T = TypeVar("T")


class Embedder:
    """A second, small context on the same weights that turns texts into pooled vectors.

    One L2-normalised vector per input, as OpenAI's /v1/embeddings returns, pooled as the GGUF
    declares (`ModelWeights.pooling`): the mean of the tokens' states, the first token's (CLS,
    BGE models) or the last token's (Qwen3-Embedding). A reranker's GGUF is refused: it scores
    pairs and makes no embeddings.
    Calls are serialised by a lock and block: run them in a worker thread, never on a loop.

    The pooling is ours, not llama.cpp's: the context outputs every token's state, decoded in
    chunks (`EmbeddingShape` says how long the context and its chunks are, and why), and the
    states are summed here; that is what llama.cpp's MEAN pooling averages. Flash attention
    keeps a chunk's attention scores from being materialised. A longer input than an
    encoder's one pass is refused with the limit.
    """

    def __init__(self, weights: ModelWeights, *, n_ctx: int, n_threads: int) -> None:
        if weights.pooling == "rank":
            raise BadRequest("this model is a reranker (its GGUF declares rank pooling): it scores query and "
                             "document pairs and makes no embeddings, and corral does not serve reranking; use "
                             "an embedding model")
        self.pooling = weights.pooling
        self.weights = weights.retain()
        shape = {"n_ctx": n_ctx, "n_ctx_train": weights.n_ctx_train, "n_vocab": weights.n_vocab}
        self.n_ctx, self.chunk = EmbeddingShape.of(**shape, causal=True)
        self._threads = n_threads
        try:
            self._ctx = self._open()
            if not llama_cpp.llama_get_causal_attn(self._ctx):
                one_pass = EmbeddingShape.of(**shape, causal=False)
                if (self.n_ctx, self.chunk) != one_pass:
                    llama_cpp.llama_free(self._ctx)
                    self.n_ctx, self.chunk = one_pass
                    self._ctx = self._open()
        except Exception:
            self.weights.release()
            raise
        # the width llama.cpp gives each output row: n_embd_out, which a GGUF may set apart from n_embd
        self.n_embd = llama_cpp.llama_model_n_embd_out(weights.handle)
        self._memory = llama_cpp.llama_get_memory(self._ctx)
        self._batch = llama_cpp.llama_batch_init(self.chunk, 0, 1)
        self._lock = threading.Lock()
        self._stopping = False

    def _open(self) -> llama_cpp.llama_context_p:
        return new_context(self.weights, n_ctx=self.n_ctx, n_batch=self.chunk, n_seq_max=1,
                           n_threads=self._threads, flash_attn=True, embeddings=True)

    def embed(self, texts: list[str]) -> tuple[list[list[float]], int]:
        """Vectors for `texts` and the number of tokens they took."""
        for i, text in enumerate(texts):
            if not text.strip():
                raise BadRequest(f"input[{i}] is empty")
        with self._lock:  # the weights stay alive while we hold it (close takes it too)
            if self._ctx is None:
                raise Cancelled("the model was unloaded")
            tokenized = [self.weights.tokenize(text, add_special=True) for text in texts]
            for i, tokens in enumerate(tokenized):
                if len(tokens) > self.n_ctx:
                    raise BadRequest(f"input[{i}] is {len(tokens)} tokens but the embedding context "
                                     f"holds {self.n_ctx}; split the text")
            vectors = []
            for tokens in tokenized:
                if self._stopping:  # the model is unloading: do not make it wait for the whole batch
                    raise Cancelled("the model is unloading")
                vectors.append(self._one(tokens))
            return vectors, sum(map(len, tokenized))

    def _one(self, tokens: list[int]) -> list[float]:
        llama_cpp.llama_memory_clear(self._memory, True)
        batch = self._batch
        total = np.zeros(self.n_embd, dtype=np.float64)
        for start in range(0, len(tokens), self.chunk):
            batch.n_tokens = 0
            for pos, token in enumerate(tokens[start:start + self.chunk], start):
                batch_add(batch, token, pos, 0, True)
            rc = llama_cpp.llama_decode(self._ctx, batch)
            if rc != 0:
                raise RuntimeError(f"embedding decode failed (llama_decode returned {rc})")
            rows = np.ctypeslib.as_array(llama_cpp.llama_get_embeddings(self._ctx), shape=(batch.n_tokens, self.n_embd))
            if self.pooling == "mean":
                total += rows.sum(axis=0, dtype=np.float64)
            elif self.pooling == "cls":
                total = rows[0].astype(np.float64)
                break  # the first token's state is all it takes
            elif self.pooling == "last":
                total = rows[-1].astype(np.float64)  # the final chunk's last row is the text's last token
        norm = float(np.linalg.norm(total))  # the mean's direction: dividing by the count first changes nothing
        return (total / norm if norm > 0 else total).tolist()

    def close(self) -> None:
        self._stopping = True  # read between inputs by a running embed()
        with self._lock:
            if self._ctx is None:
                return
            llama_cpp.llama_batch_free(self._batch)
            llama_cpp.llama_free(self._ctx)
            self._ctx = None
        self.weights.release()


def in_own_thread(fn: Callable[..., T], *args: Any, name: str) -> Future[T]:
    """Run `fn(*args)` on a new thread that ends with it; the future carries its outcome
    (`Engine.embed_async` says why embeddings never run on a pool thread)."""
    future: Future[T] = Future()

    def work() -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(fn(*args))
        except BaseException as exc:
            future.set_exception(exc)

    threading.Thread(target=work, name=name, daemon=True).start()
    return future
