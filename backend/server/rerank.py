"""The rerank dialect: `POST /v1/rerank` (also `/rerank` and `/v1/reranking`, as llama-server
routes it) between its wire JSON and `Backend.rerank`.

The request and answer take the Jina/Cohere shape llama-server answers with: `query`,
`documents` (strings) and `top_n` in; `results` of `index` and `relevance_score`, highest
first, out, each with `document: {"text"}` when `return_documents` asks for it. Errors take
OpenAI's shape, as every /v1 route's do. Only pydantic and the standard library are imported.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field

from ..generation import Reranking
from .openai import KeepAlive, _Body

PATHS = ("/v1/rerank", "/rerank", "/v1/reranking")


class RerankRequest(_Body):
    model: str = Field(min_length=1, max_length=256)
    query: str
    documents: Annotated[list[str], Field(min_length=1, max_length=2048)]
    top_n: int | None = Field(None, ge=1)
    return_documents: bool = False
    keep_alive: KeepAlive = None


def rerank_response(body: RerankRequest, result: Reranking) -> dict[str, Any]:
    results = []
    for ranked in result.results:
        item: dict[str, Any] = {"index": ranked.index, "relevance_score": ranked.relevance_score}
        if body.return_documents:
            item["document"] = {"text": body.documents[ranked.index]}
        results.append(item)
    return {"model": body.model, "object": "list",
            "usage": {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens},
            "results": results}
