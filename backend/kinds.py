"""What a model serves, read from its GGUF header before any load: chat (text generation),
embeddings, or reranking; and the clear refusal of a request the model cannot serve.

A GGUF that declares a pooling type (mean, CLS, last) or an encoder without causal attention
(BERT, nomic-bert, ...) makes embeddings and was never trained to continue text; one that
declares rank pooling is a reranker, whose classifier head scores a query and document pair.
Any other model chats, and may embed too (its states, mean-pooled).
"""

from __future__ import annotations

from .errors import BadRequest
from .ggufmeta import GGUFInfo
from .memory import causal_attention

CHAT, EMBEDDING, RERANK = "chat", "embedding", "rerank"
# the finish reason of the RequestFinished event that ends an embeddings or a reranking request
FINISH_REASONS = {EMBEDDING: "embeddings", RERANK: "rerank"}

# llama.cpp's enum llama_pooling_type: 0 none, 1 mean, 2 cls, 3 last, 4 rank
_EMBEDDING_POOLING = (1, 2, 3)
_RANK_POOLING = 4

# the kinds that can serve each kind of request
_SERVED_BY = {CHAT: (CHAT,), EMBEDDING: (CHAT, EMBEDDING), RERANK: (RERANK,)}

_WHAT = {  # what a model of each kind is, and what it serves instead
    CHAT: "is a chat model: it generates text (chat and completions) and embeddings",
    EMBEDDING: "is an embedding model: it makes embeddings (POST /v1/embeddings, ollama's /api/embed)",
    RERANK: "is a reranker: it scores documents against a query (POST /v1/rerank)",
}
_ASKED = {CHAT: "cannot chat or complete text; use a chat model",
          EMBEDDING: "cannot make embeddings; use an embedding model",
          RERANK: "cannot rerank; use a reranker GGUF (one that declares rank pooling)"}


def model_kind(info: GGUFInfo | None) -> str | None:
    """CHAT, EMBEDDING or RERANK; None where the header could not be read."""
    if info is None:
        return None
    pooling = info.metadata.get(f"{info.architecture}.pooling_type")
    if pooling == _RANK_POOLING:
        return RERANK
    if pooling in _EMBEDDING_POOLING or not causal_attention(info):
        return EMBEDDING
    return CHAT


def check_serves(model: str, kind: str | None, asked: str) -> None:
    """BadRequest naming `model` and what it serves instead, where its kind cannot serve a
    request of kind `asked`; a model of unknown kind passes (its load reports the file)."""
    if kind is not None and kind not in _SERVED_BY[asked]:
        raise BadRequest(f"model {model!r} {_WHAT[kind]}; it {_ASKED[asked]}")
