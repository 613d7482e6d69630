"""`corral serve`: the backend over HTTP — OpenAI-compatible /v1/*, the admin /api/*, /health,
/metrics.

- app.py: `create_app`, the shared state and the one route table of every dialect
- middleware.py: request ids, the body limit, auth, JSON bodies, errors in each dialect's shape
- streams.py: answering a generation whole or streamed, whatever the dialect
- openai.py: OpenAI's wire JSON ⇄ `GenerationRequest` and `Chunk` (no web framework)
- admin.py: /api/* and /metrics
- serving.py: `serve` and `bind`: the socket, signals and the drain

The names below load on first use, so that `corral.backend.server.openai`, which
`RemoteBackend` uses, imports without FastAPI or uvicorn.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .app import create_app
    from .serving import bind, serve

__all__ = ["bind", "create_app", "serve"]
_HOMES = {"create_app": "app", "bind": "serving", "serve": "serving"}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{home}"), name)
