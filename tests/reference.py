"""References computed straight through llama.cpp's low-level API: a plain greedy loop over the
same calls and settings as the engine, and the pooled vectors and reranker scores llama.cpp's
own pooling gives, which the embeddings context must agree with.

The engine's output is checked against this: no batching, no scheduler, nothing of ours but
the tokenizer call, so a bug in the engine's bookkeeping (positions, logits indices, sequence
ids) shows up as different tokens.
"""

from __future__ import annotations

from pathlib import Path

import llama_cpp
import numpy as np

from corral.backend.weights import ModelWeights, batch_add


def greedy_reference(path: str, prompt: str, n_tokens: int, *, n_ctx: int = 256, n_threads: int = 1) -> str:
    text, _ = reference_steps(path, prompt, n_tokens, n_ctx=n_ctx, n_threads=n_threads)
    return text


def reference_steps(path: str, prompt: str, n_tokens: int, *, n_ctx: int = 256,
                    n_threads: int = 1) -> tuple[str, list[tuple[int, np.ndarray]]]:
    """The greedy text, and each of its tokens with a copy of the logits row it was chosen from."""
    weights = ModelWeights(path)
    params = llama_cpp.llama_context_default_params()
    params.n_ctx, params.n_batch, params.n_ubatch, params.n_seq_max = n_ctx, 512, 512, 1
    params.n_threads = params.n_threads_batch = n_threads
    params.flash_attn_type, params.swa_full, params.kv_unified = 1, True, True
    ctx = llama_cpp.llama_init_from_model(weights.handle, params)
    tokens = weights.tokenize(prompt, add_special=True)
    pending = (llama_cpp.llama_token * len(tokens))(*tokens)  # the batch points into this array
    batch = llama_cpp.llama_batch_get_one(pending, len(tokens))
    out: list[tuple[int, np.ndarray]] = []
    for _ in range(n_tokens):
        assert llama_cpp.llama_decode(ctx, batch) == 0
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, -1), shape=(weights.n_vocab,)).copy()
        token = int(np.argmax(logits))
        if weights.is_eog(token):
            break
        out.append((token, logits))
        pending = (llama_cpp.llama_token * 1)(token)
        batch = llama_cpp.llama_batch_get_one(pending, 1)
    text = weights.detokenize([token for token, _ in out])
    llama_cpp.llama_free(ctx)
    weights.release()
    return text, out


def llama_cpp_pooled(path: Path, tokens: list[int], pooling: int) -> list[float]:
    """The vector llama.cpp's own pooling gives `tokens` (a context pooling as `pooling` says),
    L2-normalised: what the Embedder's pooling must agree with."""
    weights = ModelWeights(str(path))
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = params.n_batch = params.n_ubatch = 512
    params.embeddings, params.pooling_type = True, pooling
    ctx = llama_cpp.llama_init_from_model(weights.handle, params)
    batch = llama_cpp.llama_batch_init(512, 0, 1)
    try:
        for pos, token in enumerate(tokens):
            batch_add(batch, token, pos, 0, True)
        assert llama_cpp.llama_decode(ctx, batch) == 0
        n = llama_cpp.llama_model_n_embd_out(weights.handle)
        vector = np.ctypeslib.as_array(llama_cpp.llama_get_embeddings_seq(ctx, 0), shape=(n,)).astype(np.float64)
        return (vector / np.linalg.norm(vector)).tolist()
    finally:
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_free(ctx)
        weights.release()


def llama_cpp_rank_scores(path: Path, prompts: list[list[int]]) -> list[float]:
    """Each prompt's score as llama.cpp's own RANK pooling gives it (one decode of the whole
    prompt, the first value of the sequence's pooled output), as llama-server's send_rerank reads it."""
    weights = ModelWeights(str(path))
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = params.n_batch = params.n_ubatch = 512
    params.embeddings, params.pooling_type = True, llama_cpp.LLAMA_POOLING_TYPE_RANK
    ctx = llama_cpp.llama_init_from_model(weights.handle, params)
    batch = llama_cpp.llama_batch_init(512, 0, 1)
    scores = []
    try:
        for tokens in prompts:
            llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
            batch.n_tokens = 0
            for pos, token in enumerate(tokens):
                batch_add(batch, token, pos, 0, True)
            assert llama_cpp.llama_decode(ctx, batch) == 0
            scores.append(llama_cpp.llama_get_embeddings_seq(ctx, 0)[0])
        return scores
    finally:
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_free(ctx)
        weights.release()
