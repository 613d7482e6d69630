"""Embeddings and reranking: pooled vectors, or a reranker's scores, from a second context on a
model's weights.

Kept apart from the generation engine because nothing is shared but the weights: its own
small context, its own lock, and calls that block a worker thread instead of joining the
scheduler's batches (`Engine.embed_async` and `Engine.rerank_async` run them).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any, TypeVar

import llama_cpp
import numpy as np

from .errors import BadRequest, Cancelled
from .memory import EmbeddingShape
from .weights import ModelWeights, batch_add, new_context

T = TypeVar("T")


class Embedder:
    """A second, small context on the same weights that turns texts into pooled vectors, or,
    for a reranker, query and document pairs into scores.

    One L2-normalised vector per input, as OpenAI's /v1/embeddings returns, pooled as the GGUF
    declares (`ModelWeights.pooling`): the mean of the tokens' states, the first token's (CLS,
    BGE models) or the last token's (Qwen3-Embedding). A reranker's GGUF (rank pooling) makes no
    embeddings: its context pools with llama.cpp's own RANK pooling instead, which runs the
    GGUF's classifier head on the last token (causal models) or the first (encoders) and gives
    one score per pair, as llama-server's /v1/rerank does.
    Calls are serialised by a lock and block: run them in a worker thread, never on a loop.

    An embedding's pooling is ours, not llama.cpp's: the context outputs every token's state,
    decoded in chunks (`EmbeddingShape` says how long the context and its chunks are, and why),
    and the states are summed here; that is what llama.cpp's MEAN pooling averages. A
    reranker's prompt goes through the same chunks: a causal model's RANK pooling reads the
    last token, which the last chunk holds (an encoder reads its prompt in one pass). Flash
    attention keeps a chunk's attention scores from being materialised. A longer input than an
    encoder's one pass is refused with the limit.
    """

    def __init__(self, weights: ModelWeights, *, n_ctx: int, n_threads: int) -> None:
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
                           n_threads=self._threads, flash_attn=True, embeddings=True, rank=self.pooling == "rank")

    def embed(self, texts: list[str]) -> tuple[list[list[float]], int]:
        """Vectors for `texts` and the number of tokens they took."""
        if self.pooling == "rank":
            raise BadRequest("this model is a reranker (its GGUF declares rank pooling): it scores documents "
                             "against a query and makes no embeddings; send them to POST /v1/rerank, or use an "
                             "embedding model")
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

    def rerank(self, query: str, documents: list[str]) -> tuple[list[float], int]:
        """A relevance score per document, in the documents' order, and the tokens the pairs took.

        Each pair is one prompt: the GGUF's "rerank" template with {query} and {document}
        filled in, else BOS query EOS SEP document EOS as the vocabulary adds them; the score is
        the first value of the pooled output (a Qwen3 reranker's softmax gives P("yes") there)."""
        if self.pooling != "rank":
            raise BadRequest("this model is not a reranker (its GGUF does not declare rank pooling): "
                             "it makes embeddings (POST /v1/embeddings); use a reranker GGUF for /v1/rerank")
        if not query.strip():
            raise BadRequest("query is empty")
        with self._lock:
            if self._ctx is None:
                raise Cancelled("the model was unloaded")
            prompts = self._pairs(query, documents)
            scores = []
            for tokens in prompts:
                if self._stopping:
                    raise Cancelled("the model is unloading")
                for _ in self._decoded(tokens):
                    pass
                scores.append(float(llama_cpp.llama_get_embeddings_seq(self._ctx, 0)[0]))
            return scores, sum(map(len, prompts))

    def _pairs(self, query: str, documents: list[str]) -> list[list[int]]:
        """Each document's prompt as tokens (llama-server's format_prompt_rerank), checked
        against the context's length."""
        weights = self.weights
        template = weights.rerank_template
        if template is None:
            asked = weights.tokenize(query, add_special=False, parse_special=False)
            end = [weights.eos if weights.eos >= 0 else weights.sep] if weights.add_eos else []
            between = end + ([weights.sep] if weights.add_sep else [])
            if len(asked) >= self.n_ctx:
                raise BadRequest(f"query is {len(asked)} tokens but the reranking context holds {self.n_ctx}; "
                                 "shorten the query")
        prompts = []
        for i, document in enumerate(documents):
            if template is not None:  # one pass over the template, so a text holding "{query}" stays text
                text = re.sub(r"\{(query|document)\}", lambda m: query if m[1] == "query" else document, template)
                tokens = weights.tokenize(text, add_special=False, parse_special=True)
            else:
                tokens = ([weights.bos] if weights.add_bos else []) + asked + between
                tokens += weights.tokenize(document, add_special=False, parse_special=False) + end
            if len(tokens) > self.n_ctx:
                raise BadRequest(f"documents[{i}] with the query is {len(tokens)} tokens but the reranking context "
                                 f"holds {self.n_ctx}; shorten the document or the query")
            prompts.append(tokens)
        return prompts

    def _decoded(self, tokens: list[int]) -> Iterator[int]:
        """Decode `tokens` as one sequence from an empty cache, a chunk at a time; yields after
        each chunk with its token count, while its outputs are readable."""
        llama_cpp.llama_memory_clear(self._memory, True)
        batch = self._batch
        for start in range(0, len(tokens), self.chunk):
            batch.n_tokens = 0
            for pos, token in enumerate(tokens[start:start + self.chunk], start):
                batch_add(batch, token, pos, 0, True)
            rc = llama_cpp.llama_decode(self._ctx, batch)
            if rc != 0:
                raise RuntimeError(f"embedding decode failed (llama_decode returned {rc})")
            yield batch.n_tokens

    def _one(self, tokens: list[int]) -> list[float]:
        total = np.zeros(self.n_embd, dtype=np.float64)
        for n_tokens in self._decoded(tokens):
            rows = np.ctypeslib.as_array(llama_cpp.llama_get_embeddings(self._ctx), shape=(n_tokens, self.n_embd))
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
