"""One-call helpers for notebooks and scripts: connect, print a stream, gather recent events.

    from corral.backend import connect, print_stream
    backend = connect()                               # in-process; connect(URL) for a server
    print_stream(backend.sync.complete("gemma-3-270m", "Once upon a time", max_tokens=40))

Every helper works in plain code and inside Jupyter's running loop: the async ones are
awaited in a cell, the blocking ones wait on a loop thread of the backend, never the kernel's.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import AsyncIterable, Iterable
from typing import IO, TYPE_CHECKING, Any

from .display import EventLog
from .errors import CorralError

if TYPE_CHECKING:
    from .local import LocalBackend
    from .protocol import Backend
    from .generation import Chunk, RequestStats
    from .remote import RemoteBackend


def connect(url: str | None = None, *, api_key: str | None = None, **options: Any) -> LocalBackend | RemoteBackend:
    """The backend a notebook works with: without `url`, models run in this process
    (`LocalBackend(**options)`: `settings`, `config`; the default config file honours
    $CORRAL_CONFIG); with one, they run in the `corral serve` there (`RemoteBackend`, with
    `api_key` or else $CORRAL_API_KEY; `timeout` in `options`). Both have the same async
    methods, a blocking `sync` twin of them, `close()` and `with`.

    llama.cpp is loaded only when a local backend starts, never by a remote one."""
    if url is None:
        from .local import LocalBackend

        return LocalBackend(**options)
    from .remote import RemoteBackend

    return RemoteBackend(url, api_key=api_key or os.environ.get("CORRAL_API_KEY") or None, **options)


def print_stream(chunks: Iterable[Chunk], file: IO[str] | None = None) -> RequestStats | None:
    """Print a blocking stream (`backend.sync.complete(...)`) token by token as it arrives,
    then a newline; return the request's stats (None for a request that never ran). A stream
    that ends in an error raises it, after the text that came before."""
    out = file or sys.stdout  # looked up per call: Jupyter replaces sys.stdout per cell
    last = None
    for chunk in chunks:
        _write(out, chunk)
        last = chunk
    return _finish(out, last)


async def aprint_stream(chunks: AsyncIterable[Chunk], file: IO[str] | None = None) -> RequestStats | None:
    """`print_stream` for an async stream: `await aprint_stream(backend.complete(...))`."""
    out = file or sys.stdout
    last = None
    async for chunk in chunks:
        _write(out, chunk)
        last = chunk
    return _finish(out, last)


def _write(out: IO[str], chunk: Chunk) -> None:
    if chunk.text:
        out.write(chunk.text)
        out.flush()  # a token shows when it comes, not when a buffer fills


def _finish(out: IO[str], last: Chunk | None) -> RequestStats | None:
    out.write("\n")
    out.flush()
    if last is not None and last.finish_reason == "error":
        raise CorralError(f"the generation failed: {last.error or 'no reason given'}")
    return last.stats if last is not None else None


async def recent_events(backend: Backend, *, after_seq: int = 0, idle_s: float = 0.5,
                        limit: int = 200) -> EventLog:
    """The events the backend still holds after `after_seq` (its replay ring) and any that
    follow, until none comes for `idle_s`; the newest `limit` of them, as a table.

    `backend.events()` never ends by itself (it is a live feed), which a notebook cell
    cannot wait on; this reads what is there and stops."""
    log = EventLog()
    feed: Any = backend.events(after_seq)  # both backends' feeds have aclose
    async with contextlib.aclosing(feed) as events:
        with contextlib.suppress(asyncio.TimeoutError, StopAsyncIteration):
            while True:
                log.append(await asyncio.wait_for(anext(events), idle_s))
    return EventLog(log[-limit:])
