"""corral's backend: the model manager, usable from scripts, notebooks, the console and the server.

    from corral.backend import LocalBackend
    with LocalBackend() as backend:
        print(backend.sync.text("gemma-3-270m", "Once upon a time", max_tokens=40))

In a notebook, `connect()` (or `connect(URL)` for a `corral serve`) gives the backend, and
models, status and events show as tables (see notebook.py and display.py).

Names are imported on first use, so `import corral.backend.events` (the console does) never
loads llama.cpp; only a backend that runs models does.
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING, Any

# A library does not print: without this, llama.cpp warnings routed into logging would reach
# the terminal through logging's last-resort handler and corrupt the console.
logging.getLogger("corral").addHandler(logging.NullHandler())

_EXPORTS = {
    "Backend": "protocol", "LocalBackend": "local", "SyncBackend": "protocol", "RemoteBackend": "remote",
    "Settings": "config", "load_settings": "config",
    "Chunk": "generation", "Embeddings": "generation", "RequestStats": "generation",
    "SamplingParams": "generation", "Reranking": "generation", "Ranked": "generation",
    "CorralError": "errors", "Event": "events", "ModelInfo": "snapshot", "Status": "snapshot",
    "RequestInfo": "inflight",
    "connect": "notebook", "print_stream": "notebook", "aprint_stream": "notebook",
    "recent_events": "notebook", "ModelTable": "display", "EventLog": "display",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)


if TYPE_CHECKING:
    from .local import LocalBackend
    from .protocol import Backend, SyncBackend
    from .config import Settings, load_settings
    from .display import EventLog, ModelTable
    from .errors import CorralError
    from .events import Event
    from .generation import Chunk, Embeddings, Ranked, RequestStats, Reranking, SamplingParams
    from .inflight import RequestInfo
    from .notebook import aprint_stream, connect, print_stream, recent_events
    from .remote import RemoteBackend
    from .snapshot import ModelInfo, Status
