"""The Backend protocol: the one interface the console, the server and notebooks use, and its
blocking twin for scripts.

`LocalBackend` (local.py) runs the model manager in-process; `RemoteBackend` (remote.py)
speaks to a `corral serve`. Both run their coroutines on a `LoopThread` of their own, so a
caller on any loop (Textual's, uvicorn's, Jupyter's) can await them, and `SyncBackend` can
block on them from plain code without deadlocking the caller's loop.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, runtime_checkable

from .generation import Chunk, Embeddings, Reranking
from .inflight import RequestInfo
from .modellog import LogLine
from .pull.status import PullStatus
from .snapshot import LoadPlan, ModelDetails, ModelInfo, Status

if TYPE_CHECKING:
    from .events import Event
    from .request import GenerationRequest
    from .versions import ConfigVersion

T = TypeVar("T")


@runtime_checkable
class Backend(Protocol):
    """What every face of corral may do with a backend, local or remote."""

    kind: str  # "local" or "remote"
    label: str  # shown in the console header: "embedded" or the server URL

    async def models(self) -> list[ModelInfo]: ...
    async def status(self) -> Status: ...
    async def load(self, name: str, keep_alive: float | str | None = None) -> ModelInfo: ...
    async def details(self, name: str) -> ModelDetails: ...
    async def plan(self, name: str, **overrides: Any) -> LoadPlan: ...
    async def logs(self, name: str) -> list[LogLine]: ...
    async def evict(self, name: str, *, force: bool = False) -> ModelInfo: ...
    async def pin(self, name: str, pinned: bool = True) -> ModelInfo: ...
    def complete(self, model: str, prompt: str, **options: Any) -> AsyncIterator[Chunk]: ...
    def chat(self, model: str, messages: list[dict[str, Any]], **options: Any) -> AsyncIterator[Chunk]: ...
    def generate(self, request: GenerationRequest) -> AsyncIterator[Chunk]: ...
    async def embed(self, model: str, inputs: list[str], **options: Any) -> Embeddings: ...
    async def rerank(self, model: str, query: str, documents: list[str], top_n: int | None = None,
                     **options: Any) -> Reranking: ...
    async def count_tokens(self, request: GenerationRequest) -> int: ...
    async def requests(self) -> list[RequestInfo]: ...
    async def cancel_request(self, request_id: str, by: str = "python") -> list[RequestInfo]: ...
    async def unload_all(self) -> None: ...
    async def rescan(self) -> list[ModelInfo]: ...
    def pull(self, source: str, *, name: str | None = None, sha256: str | None = None,
             directory: str | None = None) -> AsyncIterator[PullStatus]: ...
    async def cancel_pull(self, pull_id: str) -> PullStatus: ...
    async def pulls(self) -> list[PullStatus]: ...
    async def remove(self, name: str) -> list[str]: ...
    def events(self, after_seq: int | None = None) -> AsyncIterator[Event]: ...
    async def ready(self) -> None: ...
    async def warmed(self) -> None: ...
    async def reload_config(self, source: str = "api") -> ConfigVersion: ...
    async def rollback_config(self, number: int, source: str = "api") -> ConfigVersion: ...
    async def config_versions(self) -> list[ConfigVersion]: ...
    async def aclose(self) -> None: ...


class LoopThread:
    """An event loop running in a daemon thread of its own.

    A caller blocks on a future of this loop, never on its own loop, so blocking calls work
    from plain code and from inside a running loop alike (a Jupyter cell runs on the kernel's)."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self.thread.start()

    def submit(self, coro: Coroutine[Any, Any, T]) -> Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def stop(self) -> None:
        """Stop the loop and its thread (idempotent); the loop is closed once the thread ended."""
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        if not self.thread.is_alive():
            self.loop.close()


class SyncBackend:
    """Blocking twins of a backend's methods for scripts (and notebooks that prefer them).

    Each call runs through `submit` on a loop other than the caller's: LocalBackend's own
    loop, or a private one that RemoteBackend starts for its `sync`."""

    def __init__(self, backend: Backend, submit: Callable[[Coroutine[Any, Any, Any]], Future[Any]]) -> None:
        self._backend = backend
        self._submit = submit

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self._submit(coro).result()

    def models(self) -> list[ModelInfo]:
        return self._run(self._backend.models())

    def status(self) -> Status:
        return self._run(self._backend.status())

    def load(self, name: str, keep_alive: float | str | None = None) -> ModelInfo:
        return self._run(self._backend.load(name, keep_alive))

    def details(self, name: str) -> ModelDetails:
        return self._run(self._backend.details(name))

    def plan(self, name: str, **overrides: Any) -> LoadPlan:
        return self._run(self._backend.plan(name, **overrides))

    def logs(self, name: str) -> list[LogLine]:
        return self._run(self._backend.logs(name))

    def evict(self, name: str, *, force: bool = False) -> ModelInfo:
        return self._run(self._backend.evict(name, force=force))

    def pin(self, name: str, pinned: bool = True) -> ModelInfo:
        return self._run(self._backend.pin(name, pinned))

    def requests(self) -> list[RequestInfo]:
        return self._run(self._backend.requests())

    def cancel_request(self, request_id: str, by: str = "python") -> list[RequestInfo]:
        return self._run(self._backend.cancel_request(request_id, by))

    def complete(self, model: str, prompt: str, **options: Any) -> Iterator[Chunk]:
        return self._iterate(self._backend.complete(model, prompt, **options))

    def chat(self, model: str, messages: list[dict[str, Any]], **options: Any) -> Iterator[Chunk]:
        return self._iterate(self._backend.chat(model, messages, **options))

    def generate(self, request: GenerationRequest) -> Iterator[Chunk]:
        return self._iterate(self._backend.generate(request))

    def embed(self, model: str, inputs: list[str] | str, **options: Any) -> Embeddings:
        return self._run(self._backend.embed(model, inputs, **options))

    def rerank(self, model: str, query: str, documents: list[str], top_n: int | None = None,
               **options: Any) -> Reranking:
        return self._run(self._backend.rerank(model, query, documents, top_n, **options))

    def count_tokens(self, request: GenerationRequest) -> int:
        return self._run(self._backend.count_tokens(request))

    def pull(self, source: str, *, name: str | None = None, sha256: str | None = None,
             directory: str | None = None) -> Iterator[PullStatus]:
        return self._iterate(self._backend.pull(source, name=name, sha256=sha256, directory=directory))

    def cancel_pull(self, pull_id: str) -> PullStatus:
        return self._run(self._backend.cancel_pull(pull_id))

    def pulls(self) -> list[PullStatus]:
        return self._run(self._backend.pulls())

    def remove(self, name: str) -> list[str]:
        return self._run(self._backend.remove(name))

    def reload_config(self, source: str = "api") -> ConfigVersion:
        return self._run(self._backend.reload_config(source))

    def rollback_config(self, number: int, source: str = "api") -> ConfigVersion:
        return self._run(self._backend.rollback_config(number, source))

    def config_versions(self) -> list[ConfigVersion]:
        return self._run(self._backend.config_versions())

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run any coroutine on the loop the twins use and wait for it (scripts, tests)."""
        return self._run(coro)

    def text(self, model: str, prompt: str, **options: Any) -> str:
        """The whole completion as one string."""
        return "".join(chunk.text for chunk in self.complete(model, prompt, **options))

    def _iterate(self, stream: AsyncIterator[T]) -> Iterator[T]:
        try:
            while True:
                try:
                    yield self._run(stream.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            self._run(stream.aclose())
