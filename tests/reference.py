"""A plain greedy loop over the same llama.cpp calls and settings as the engine.

The engine's output is checked against this: no batching, no scheduler, nothing of ours but
the tokenizer call, so a bug in the engine's bookkeeping (positions, logits indices, sequence
ids) shows up as different tokens.
"""

from __future__ import annotations

import llama_cpp
import numpy as np

from corral.backend.weights import ModelWeights


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
