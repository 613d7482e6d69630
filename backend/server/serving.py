"""Running the app: the listening socket, signals, and a drain that ends every stream.

uvicorn's `Server.run()` re-raises SIGTERM (exit 143) and waits forever on open SSE streams,
so `serve()` runs `Server.serve()` under its own signal handling: health turns 503, event
streams end, in-flight generations get a bounded grace, then the backend is closed, which ends
whatever still runs with a final "cancelled" chunk.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from ..errors import CorralError
from .app import ServerState, create_app
from .stored import Store

if TYPE_CHECKING:
    from ..protocol import Backend

log = logging.getLogger("corral.server")

DEFAULT_GRACE_S = 10.0


def _quiet_server(config: Any) -> Any:
    """uvicorn's server without its signal capture: `serve()` owns SIGTERM/SIGINT.

    uvicorn's own handlers re-raise the signal after shutdown (exit status 143) and would wait
    forever on open SSE streams. uvicorn is imported here, not at the top: building the app
    (tests, notebooks) does not need it."""
    import uvicorn

    class QuietServer(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Any:
            yield

        def install_signal_handlers(self) -> None:  # the same hook's name before uvicorn 0.29
            return

    return QuietServer(config)


def bind(host: str, port: int, flag: str = "--port") -> socket.socket:
    """Bind the listening socket ourselves: a clear error when the port is taken, and the real
    port when 0 was asked for."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise CorralError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise CorralError(f"cannot listen on {host}:{port}: {exc.strerror or exc}; choose another {flag} "
                          "or stop the program using it") from None
    return sock


async def serve(backend: Backend, *, host: str = "127.0.0.1", port: int = 8377, api_key: str | None = None,
                grace_s: float = DEFAULT_GRACE_S, ollama_port: int | None = None, stored: Store | None = None,
                on_listening: Callable[[str, int, int, int | None], None] | None = None) -> None:
    """Serve until SIGTERM/SIGINT, then drain and return (the caller exits 0).

    On the first signal: health → 503 draining, uvicorn stops accepting, /api/events streams
    end, and running generations get `grace_s` to finish; after that the backend is closed,
    which ends each with a final "cancelled" chunk (streams then send `[DONE]`). A second
    signal skips the grace. `ollama_port` (0: a free one) also listens, with ollama's API at
    ollama's own paths; `stored` keeps the Responses API's stored responses. `on_listening(host, port, n_models, ollama_port)` runs once the sockets
    are open and the catalog is scanned.
    """
    import uvicorn

    sockets = [bind(host, port)]
    if ollama_port is not None:
        try:
            sockets.append(bind(host, ollama_port, "--ollama-port"))
        except CorralError:
            sockets[0].close()
            raise
    port = sockets[0].getsockname()[1]
    ollama_port = sockets[1].getsockname()[1] if ollama_port is not None else None
    app = create_app(backend, api_key=api_key, ollama_port=ollama_port, stored=stored)
    state: ServerState = app.state.corral
    config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="on", ws="none",
                            timeout_keep_alive=5, server_header=False)
    server = _quiet_server(config)
    loop = asyncio.get_running_loop()
    stop, hurry = asyncio.Event(), asyncio.Event()

    def on_signal(signum: int) -> None:
        if stop.is_set():
            log.warning("second %s: ending running requests now", signal.Signals(signum).name)
            hurry.set()
        else:
            log.info("%s: shutting down (grace %.0f s for running requests)", signal.Signals(signum).name, grace_s)
            stop.set()

    def on_hangup() -> None:  # the Unix way to say "read your config again"
        reloading = asyncio.ensure_future(backend.reload_config("signal"))
        reloading.add_done_callback(_log_reload)

    handled = (signal.SIGTERM, signal.SIGINT)
    for signum in handled:
        loop.add_signal_handler(signum, on_signal, signum)
    loop.add_signal_handler(signal.SIGHUP, on_hangup)
    serving = asyncio.create_task(server.serve(sockets=sockets), name="corral-uvicorn")
    announce = asyncio.create_task(_announce(server, backend, host, (port, ollama_port), on_listening))
    try:
        stopper = asyncio.ensure_future(stop.wait())
        await asyncio.wait({serving, stopper}, return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        if serving.done():  # uvicorn stopped on its own (a startup failure): report it
            announce.cancel()
            serving.result()
            return
        announce.cancel()
        state.begin_drain()  # /health says 503 draining and new generations are refused ...
        await _until(state.wait_idle(grace_s), hurry)
        server.should_exit = True  # ... until the grace is over; then uvicorn stops listening
        if state.in_flight:
            log.warning("%d request(s) still running after the grace period; ending them", state.in_flight)
            # every engine ends its requests with a final "cancelled" chunk; bounded, and a second
            # signal stops waiting (an embedding batch cannot be interrupted mid-decode)
            await _until(backend.aclose(), hurry, timeout=grace_s)
        # Streams have their last chunk by now; give their connections a moment to flush.
        done, _ = await asyncio.wait({serving}, timeout=2.0 if hurry.is_set() else grace_s + 5)
        if not done:
            log.warning("connections still open; closing them")
            server.force_exit = True  # uvicorn then skips the app's lifespan shutdown: run it here
        with contextlib.suppress(asyncio.CancelledError):
            await serving
        if server.force_exit:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.lifespan.shutdown(), 5)
    finally:
        for signum in (*handled, signal.SIGHUP):
            loop.remove_signal_handler(signum)
        for sock in sockets:
            with contextlib.suppress(Exception):
                sock.close()


def _log_reload(task: asyncio.Future[Any]) -> None:
    """A SIGHUP reload has no caller to answer: its outcome goes to the log (and, from the
    backend, to the event stream)."""
    if task.cancelled():
        return
    error = task.exception()
    if error is not None:
        log.error("SIGHUP reload: %s", error)
    else:
        log.info("SIGHUP reload: config version %d", task.result().number)


async def _until(work: Awaitable[Any], hurry: asyncio.Event, timeout: float | None = None) -> bool:
    """Await `work` unless `hurry` is set (a second signal) or `timeout` passes; True when it finished."""
    task = asyncio.ensure_future(work)
    hurried = asyncio.ensure_future(hurry.wait())
    try:
        await asyncio.wait({task, hurried}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        hurried.cancel()
    if not task.done():
        task.cancel()
        return False
    return True


async def _announce(server: Any, backend: Backend, host: str, ports: tuple[int, int | None],
                    on_listening: Callable[[str, int, int, int | None], None] | None) -> None:
    """Tell the caller once requests can be served; a backend that fails to start is reported by
    /health and the log instead (the server stays up so an operator can see why)."""
    while not server.started:
        await asyncio.sleep(0.02)
    try:
        await backend.ready()
        count = len(await backend.models())
    except Exception:
        return  # ServerState.wait_ready has logged it
    if on_listening is not None:
        on_listening(host, ports[0], count, ports[1])
