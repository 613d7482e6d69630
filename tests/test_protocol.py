"""One protocol suite, two backends: `LocalBackend` in-process and `RemoteBackend` over HTTP.

The console drives either one through the same `Backend` protocol, so every behaviour it
relies on is asserted here against both: the remote one talks to a real `corral serve`
subprocess on 127.0.0.1, so these tests also pin down the wire format between
backend/server/ and backend/remote.py. Remote-only tests at the end cover what only a
network has: reconnecting event streams, API keys, unreachable servers, closing a stream.

Backends are module-scoped (each starts once) and every test leaves the models it touched
in a state the others accept, so the tests pass in any order.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from corral.backend.local import LocalBackend
from corral.backend.protocol import Backend
from corral.backend.config import settings_from_dict
from corral.backend.errors import (BadRequest, CorralError, ModelNotFound, ModelPinned, QueueFull,
                                   ServerUnreachable, Unauthorized)
from corral.backend.events import Event, Notice, PinChanged, RequestFinished, StateChanged
from corral.backend.generation import Chunk, Embeddings
from corral.backend.remote import RemoteBackend
from support import TINY, Server, free_port, start_server, tiny_settings, write_config

pytestmark = pytest.mark.asyncio(loop_scope="module")

NAMES = list(TINY)  # conftest's `tiny_models`
N_EMBD = 64  # write_tiny_llama's default embedding width
GREEDY = {"temperature": 0.0, "ignore_eos": True}


# -- a real `corral serve` --------------------------------------------------------------------

@contextlib.contextmanager
def serving(root: Path, model_dir: Path, **kw: Any) -> Iterator[Server]:
    """`corral serve` on tiny-a/b/c until the block ends."""
    server = start_server(root, write_config(root / "corral.toml", tiny_settings(model_dir)), **kw)
    try:
        yield server
    finally:
        server.stop()


# -- fixtures ---------------------------------------------------------------------------------

@pytest_asyncio.fixture(scope="module", loop_scope="module", params=["local", "remote"])
async def backend(request: pytest.FixtureRequest, tiny_models: Path) -> AsyncIterator[Any]:
    if request.param == "local":
        chosen: Any = LocalBackend(settings_from_dict(tiny_settings(tiny_models)))
    else:
        chosen = RemoteBackend(request.getfixturevalue("tiny_server").url)
    async with chosen:
        yield chosen


# -- helpers ----------------------------------------------------------------------------------

async def collect(stream: AsyncIterator[Chunk]) -> list[Chunk]:
    return [chunk async for chunk in stream]


class EventReader:
    """Reads a backend's events in a task, so a test can act and then look for the result."""

    def __init__(self, stream: AsyncIterator[Event]) -> None:
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.seen: list[Event] = []
        self._stream = stream
        self._task = asyncio.create_task(self._pump())

    async def _pump(self) -> None:
        try:
            async for event in self._stream:
                await self.queue.put(event)
        finally:
            await self._stream.aclose()  # type: ignore[attr-defined]

    async def expect(self, match: Callable[[Event], bool], timeout: float = 10.0) -> Event:
        """The next event that matches, skipping others; fails with what was seen instead."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            left = deadline - loop.time()
            try:
                event = await asyncio.wait_for(self.queue.get(), max(left, 0.001))
            except TimeoutError:
                raise AssertionError(f"no matching event within {timeout} s; saw {self.seen[-20:]}") from None
            self.seen.append(event)
            if match(event):
                return event

    async def subscribed(self, backend: Any, model: str = "tiny-c") -> PinChanged:
        """Toggle a pin until the reader sees it: from then on nothing published is missed.

        A remote stream connects only once it is iterated, so a test that acts right after
        starting the reader could act before the subscription exists."""
        try:
            for attempt in range(100):
                await backend.pin(model, attempt % 2 == 0)
                with contextlib.suppress(AssertionError):
                    found = await self.expect(lambda e: isinstance(e, PinChanged) and e.model == model, 0.2)
                    assert isinstance(found, PinChanged)
                    return found
            raise AssertionError(f"the event stream never showed a pin change; saw {self.seen}")
        finally:
            await backend.pin(model, False)

    async def ended(self, timeout: float) -> None:
        """Wait for the stream to end by itself."""
        await asyncio.wait_for(asyncio.shield(self._task), timeout)

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


@contextlib.asynccontextmanager
async def reading(backend: Any, after_seq: int | None = None) -> AsyncIterator[EventReader]:
    reader = EventReader(backend.events(after_seq))
    try:
        yield reader
    finally:
        await reader.close()


# -- the shared suite -------------------------------------------------------------------------

async def test_it_is_a_backend(backend: Any) -> None:
    assert isinstance(backend, Backend)
    assert backend.kind in ("local", "remote")
    assert backend.label == ("embedded" if backend.kind == "local" else backend.url)


async def test_models_lists_the_tiny_models(backend: Any) -> None:
    models = await backend.models()
    assert [m.name for m in models] == NAMES
    assert all(m.usable and m.error is None and m.n_ctx == 256 and m.n_parallel == 2 for m in models)
    assert all(m.architecture == "llama" and m.file_size for m in models)


async def test_models_say_whether_they_have_a_chat_template_of_their_own(backend: Any) -> None:
    """Known before any load (the console opens a model without one in completion mode): the
    tiny GGUFs carry none and config names none."""
    assert {m.name: m.has_chat_template for m in await backend.models()} == dict.fromkeys(NAMES, False)


async def test_load_makes_a_model_ready(backend: Any) -> None:
    info = await backend.load("tiny-a")
    assert info.name == "tiny-a" and info.state == "ready" and info.loaded
    assert info.measured_bytes is not None and info.load_seconds is not None


async def test_load_sets_a_keep_alive(backend: Any) -> None:
    """A duration string and a number string (seconds) alike, also over HTTP's query string."""
    kept = await backend.load("tiny-b", keep_alive="10m")
    assert kept.state == "ready" and kept.keep_alive_s == 600 and kept.ttl_left_s
    forever = await backend.load("tiny-b", keep_alive="-1")  # as the suite's other tests expect
    assert forever.keep_alive_s == -1 and forever.ttl_left_s is None


async def test_status_shows_states_and_host_stats(backend: Any) -> None:
    await backend.load("tiny-a")
    status = await backend.status()
    states = {m.name: m.state for m in status.models}
    assert states["tiny-a"] == "ready" and set(states) == set(NAMES)
    assert status.host.ram_total > 0 and status.host.cpu_count >= 1 and status.host.gpu_note
    assert status.max_loaded == 3 and 0 < status.ram_reserved < status.ram_budget


async def test_pin_and_unpin(backend: Any) -> None:
    await backend.load("tiny-b")
    pinned = await backend.pin("tiny-b")
    assert pinned.pinned and pinned.state == "ready"
    assert {m.name: m.pinned for m in await backend.models()}["tiny-b"] is True
    with pytest.raises(ModelPinned, match="tiny-b"):
        await backend.evict("tiny-b")
    unpinned = await backend.pin("tiny-b", False)
    assert not unpinned.pinned and unpinned.state == "ready"


async def test_complete_streams_text_and_ends_with_stats(backend: Any) -> None:
    chunks = await collect(backend.complete("tiny-a", "Once upon a time", max_tokens=8, **GREEDY))
    *pieces, last = chunks
    assert pieces and all(c.finish_reason is None and c.stats is None for c in pieces)
    assert "".join(c.text for c in chunks)
    assert last.finish_reason == "length" and last.error is None and last.stats is not None
    assert last.stats.completion_tokens == 8 and last.stats.prompt_tokens > 0
    assert last.stats.ttft_s is not None and 0 <= last.stats.ttft_s <= last.stats.duration_s
    assert last.stats.queue_wait_s >= 0


async def test_chat_streams_a_reply(backend: Any) -> None:
    chunks = await collect(backend.chat("tiny-a", [{"role": "user", "content": "hello"}], max_tokens=5,
                                        **GREEDY))
    assert chunks[-1].finish_reason == "length" and chunks[-1].stats.completion_tokens == 5
    assert "".join(c.text for c in chunks)


async def test_two_concurrent_completes(backend: Any) -> None:
    first, second = await asyncio.gather(
        collect(backend.complete("tiny-a", "the sun is", max_tokens=12, **GREEDY)),
        collect(backend.complete("tiny-a", "a little dog", max_tokens=7, **GREEDY)),
    )
    assert first[-1].stats.completion_tokens == 12 and second[-1].stats.completion_tokens == 7
    alone = await collect(backend.complete("tiny-a", "a little dog", max_tokens=7, **GREEDY))
    assert "".join(c.text for c in second) == "".join(c.text for c in alone)  # f32: batching is exact


async def test_unknown_model_names_the_known_ones(backend: Any) -> None:
    with pytest.raises(ModelNotFound) as caught:
        await collect(backend.complete("no-such-model", "hi", max_tokens=2))
    assert "'no-such-model'" in caught.value.message and "tiny-a, tiny-b, tiny-c" in caught.value.message
    assert caught.value.known == NAMES and caught.value.http_status == 404
    with pytest.raises(ModelNotFound, match="tiny-a, tiny-b, tiny-c"):
        await backend.load("no-such-model")


async def test_bad_options_are_bad_requests(backend: Any) -> None:
    with pytest.raises(BadRequest, match="temperature"):
        await collect(backend.complete("tiny-a", "hi", temperature=-1.0))
    with pytest.raises(BadRequest, match="unknown option"):
        await collect(backend.chat("tiny-a", [{"role": "user", "content": "hi"}], max_tokenz=3))


async def test_evict_makes_a_model_available(backend: Any) -> None:
    await backend.load("tiny-c")
    evicted = await backend.evict("tiny-c")
    assert evicted.state == "available" and not evicted.loaded
    assert {m.name: m.state for m in await backend.models()}["tiny-c"] == "available"


async def test_events_show_a_load(backend: Any) -> None:
    await backend.evict("tiny-c", force=True)
    async with reading(backend) as reader:
        await reader.subscribed(backend)
        await backend.load("tiny-c")
        loading = await reader.expect(lambda e: isinstance(e, StateChanged) and e.model == "tiny-c")
        ready = await reader.expect(lambda e: isinstance(e, StateChanged) and e.model == "tiny-c")
    assert isinstance(loading, StateChanged) and isinstance(ready, StateChanged)
    assert (loading.old, loading.new, ready.old, ready.new) == ("available", "loading", "loading", "ready")
    assert 0 < loading.seq < ready.seq and loading.ts <= ready.ts


async def test_events_resume_after_a_sequence_number(backend: Any) -> None:
    async with reading(backend) as reader:
        mark = await reader.subscribed(backend)
    async with reading(backend, after_seq=mark.seq - 1) as replay:
        again = await replay.expect(lambda e: True)
    assert (again.seq, again.ts, again) == (mark.seq, mark.ts, mark)


async def test_request_and_session_ids_reach_the_events(backend: Any) -> None:
    async with reading(backend) as reader:
        await reader.subscribed(backend)
        chunks = await collect(backend.complete("tiny-a", "the sky", max_tokens=3, request_id="req-42",
                                                session_id="notebook-7", **GREEDY))
        finished = await reader.expect(lambda e: isinstance(e, RequestFinished) and e.request_id == "req-42")
    assert isinstance(finished, RequestFinished)
    assert finished.session_id == "notebook-7" and finished.model == "tiny-a"
    assert finished.finish_reason == "length" and finished.completion_tokens == 3
    assert finished.prompt_tokens == chunks[-1].stats.prompt_tokens


async def test_embed_gives_one_vector_per_input(backend: Any) -> None:
    result = await backend.embed("tiny-b", ["the sun", "a dog went to the park", "hello"])
    assert isinstance(result, Embeddings) and len(result.vectors) == 3
    assert all(len(v) == N_EMBD and all(isinstance(x, float) for x in v) for v in result.vectors)
    assert result.vectors[0] != result.vectors[1] and result.prompt_tokens >= 3
    again = await backend.embed("tiny-b", ["the sun"])
    assert again.vectors[0] == pytest.approx(result.vectors[0], rel=1e-4, abs=1e-5)


# -- remote only ------------------------------------------------------------------------------

async def test_remote_text_equals_local_text(tiny_server: Server, tiny_models: Path) -> None:
    """The wire loses nothing: greedy output over HTTP is the in-process output, byte for byte."""
    prompt, options = "Once upon a time there was", {"max_tokens": 24, **GREEDY}
    async with RemoteBackend(tiny_server.url) as remote:
        remote_chunks = await collect(remote.complete("tiny-b", prompt, **options))
        remote_chat = await collect(remote.chat("tiny-b", [{"role": "user", "content": prompt}], **options))
    async with LocalBackend(settings_from_dict(tiny_settings(tiny_models))) as local:
        local_chunks = await collect(local.complete("tiny-b", prompt, **options))
        local_chat = await collect(local.chat("tiny-b", [{"role": "user", "content": prompt}], **options))
    assert "".join(c.text for c in remote_chunks) == "".join(c.text for c in local_chunks)
    assert "".join(c.text for c in remote_chat) == "".join(c.text for c in local_chat)
    assert remote_chunks[-1].stats.prompt_tokens == local_chunks[-1].stats.prompt_tokens


async def test_tools_schemas_and_logprobs_come_through_both_backends_alike(tmp_path: Path,
                                                                            tiny_models: Path) -> None:
    """The Python API takes the request's fields and yields the same structured chunks, in
    process and over the wire: a grammar-held tool call, a schema-held answer, logprobs. (A
    context of 2,048 and room for 600 tokens: the tools' description fills the tiny
    vocabulary's 256, and random weights spend many tokens on whitespace the grammar allows.)"""
    settings = tiny_settings(tiny_models, defaults={"n_ctx": 2048, "n_parallel": 2, "n_threads": 1,
                                                    "keep_alive": -1})
    tool = {"type": "function", "function": {"name": "pick", "parameters": {
        "type": "object", "properties": {"n": {"type": "integer", "minimum": 1, "maximum": 9}}, "required": ["n"]}}}
    chat = [{"role": "user", "content": "pick a number"}]
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}

    async def run(backend: Any) -> tuple[Any, ...]:
        called = await collect(backend.chat("tiny-b", chat, tools=[tool], tool_choice="required",
                                            parallel_tool_calls=False, max_tokens=600, **GREEDY))
        shaped = await collect(backend.complete("tiny-b", "answer:", max_tokens=600, response_format={
            "type": "json_schema", "json_schema": {"name": "ok", "schema": schema}}, **GREEDY))
        scored = await collect(backend.complete("tiny-b", "Once upon a time", max_tokens=4, logprobs=True,
                                                top_logprobs=3, **GREEDY))
        calls = [d for c in called for d in c.tool_calls]
        arguments = "".join(d.arguments for d in calls)
        logprobs = [lp for c in scored for lp in c.logprobs]
        return (called[-1].finish_reason, [d.name for d in calls if d.name], json.loads(arguments),
                json.loads("".join(c.text for c in shaped)),
                [(lp.token, round(lp.logprob, 4), [t.token for t in lp.top]) for lp in logprobs])

    server = start_server(tmp_path, write_config(tmp_path / "corral.toml", settings))
    try:
        async with RemoteBackend(server.url) as remote:
            over_http = await run(remote)
    finally:
        assert server.stop() == 0, server.log()
    async with LocalBackend(settings_from_dict(settings)) as local:
        in_process = await run(local)
    assert over_http == in_process
    finish, names, arguments, shaped, logprobs = in_process
    assert finish == "tool_calls" and names == ["pick"] and 1 <= arguments["n"] <= 9
    assert isinstance(shaped["ok"], bool) and len(logprobs) == 4 and all(len(top) == 3 for *_, top in logprobs)


async def test_server_side_validation_maps_to_bad_request(tiny_server: Server) -> None:
    async with RemoteBackend(tiny_server.url) as remote:
        with pytest.raises(BadRequest) as caught:
            await collect(remote.chat("tiny-a", [{"role": "robot", "content": "hi"}], max_tokens=2))
    assert caught.value.http_status == 400 and "messages[0].role" in caught.value.message


@pytest.mark.parametrize("stop", ["crash", "graceful"])
async def test_events_reconnect_after_a_server_restart(stop: str, tmp_path: Path, tiny_models: Path) -> None:
    """A crash cuts the connection; a graceful stop (SIGTERM) ends the stream first."""
    with serving(tmp_path, tiny_models) as running:
        async with RemoteBackend(running.url) as remote, reading(remote) as reader:
            await reader.subscribed(remote, "tiny-a")  # the stream is up and has seen events
            if stop == "crash":
                running.proc.kill()
            assert running.stop() == (-9 if stop == "crash" else 0)
            lost = await reader.expect(lambda e: isinstance(e, Notice) and e.level == "warning")
            assert running.url in lost.message and "reconnecting" in lost.message
            running.state_file.unlink()  # a cold start: no warm-restart loads before ours
            # a new process on the same port: its seq counts from 1 again
            with serving(tmp_path, tiny_models, port=running.port):
                await remote.load("tiny-c")
                loading = await reader.expect(lambda e: isinstance(e, StateChanged) and e.model == "tiny-c")
                ready = await reader.expect(lambda e: isinstance(e, StateChanged) and e.model == "tiny-c")
                assert (loading.new, ready.new) == ("loading", "ready")
                assert loading.seq == 1  # resuming after the old process's seq would have hidden it
                assert any(isinstance(e, Notice) and e.level == "info" and "reconnected" in e.message
                           for e in reader.seen)
                # the old process's events are not delivered twice, the new one's exactly once
                seqs = [e.seq for e in reader.seen if e.seq and e.ts >= lost.ts]
                assert len(seqs) == len(set(seqs)) and seqs == sorted(seqs)


async def test_api_key_is_required_and_accepted(tmp_path: Path, tiny_models: Path) -> None:
    with serving(tmp_path, tiny_models, api_key="s3cret-key") as running:
        async with RemoteBackend(running.url, api_key="s3cret-key") as keyed:
            assert [m.name for m in await keyed.models()] == NAMES
            assert (await keyed.load("tiny-a")).state == "ready"
            chunks = await collect(keyed.complete("tiny-a", "the", max_tokens=2, **GREEDY))
            assert chunks[-1].stats.completion_tokens == 2
        for key in (None, "wrong"):
            async with RemoteBackend(running.url, api_key=key) as anonymous:  # /health needs no key
                with pytest.raises(CorralError) as caught:
                    await anonymous.models()
                assert isinstance(caught.value, Unauthorized)
                assert caught.value.code == "unauthorized" and caught.value.http_status == 401
                assert caught.value.message
                with pytest.raises(CorralError, match=re.escape(caught.value.message)):
                    await anext(anonymous.events())  # not retried: a key does not appear by waiting


async def test_an_unreachable_server_is_a_clear_error() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    remote = RemoteBackend(url, timeout=2.0)
    for call in (remote.status(), remote.load("tiny-a"), collect(remote.complete("tiny-a", "hi")),
                 remote.ready()):
        with pytest.raises(CorralError) as caught:
            await call
        assert isinstance(caught.value, ServerUnreachable) and caught.value.http_status == 503
        assert caught.value.message.startswith(f"cannot reach corral server at {url}: ")
    await remote.aclose()
    with pytest.raises(CorralError, match="closed"):
        await remote.status()


Canned = tuple[bytes, bool]  # the raw response, and whether to hold the connection open after it


def sse_response(*frames: bytes | dict[str, Any], hold_open: bool = False) -> Canned:
    """A chunked text/event-stream response; dict frames are events, with their `id:` line."""
    body = b""
    for frame in frames:
        if isinstance(frame, dict):
            frame = b"id: %d\nevent: %s\ndata: %s\n\n" % (frame.get("seq", 0), frame["type"].encode(),
                                                         json.dumps(frame).encode())
        body += b"%x\r\n%s\r\n" % (len(frame), frame)
    if not hold_open:
        body += b"0\r\n\r\n"
    return (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"transfer-encoding: chunked\r\n\r\n" + body, hold_open)


class CannedServer:
    """A minimal HTTP/1.1 server giving each new connection the next canned response (the last
    one repeats) and telling when a held connection is hung up: it checks what the client does
    on the wire, apart from corral's server."""

    def __init__(self, *responses: Canned) -> None:
        self.responses = responses
        self.requests: list[bytes] = []
        self.hung_up = asyncio.Event()
        self.url = ""
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> CannedServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()

    def header(self, index: int, name: str) -> str | None:
        for line in self.requests[index].split(b"\r\n\r\n")[0].decode().split("\r\n")[1:]:
            key, _, value = line.partition(":")
            if key.strip().lower() == name.lower():
                return value.strip()
        return None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), 0)
        self.requests.append(head + await reader.readexactly(length))
        response, hold_open = self.responses[min(len(self.requests), len(self.responses)) - 1]
        writer.write(response)
        await writer.drain()
        if hold_open:  # a generation or event stream that goes on: wait for the client to leave
            await reader.read()
            self.hung_up.set()
        writer.close()


async def test_leaving_a_stream_early_closes_the_response() -> None:
    """The disconnect is the server's only signal to cancel a generation and free its slot."""
    piece = b'data: {"choices": [{"index": 0, "text": "once", "finish_reason": null}]}\n\n'
    for leave in ("break", "aclose"):
        async with CannedServer(sse_response(piece, hold_open=True)) as canned:
            remote = RemoteBackend(canned.url)
            stream = remote.complete("m", "hi", max_tokens=500, request_id="r-1", session_id="s-1")
            if leave == "break":
                async for chunk in stream:
                    assert chunk.text == "once"
                    break
                del stream  # what a plain `break` leaves behind: the loop finalises the generator
            else:
                assert (await anext(stream)).text == "once"
                await stream.aclose()
            await asyncio.wait_for(canned.hung_up.wait(), 5)
            await remote.aclose()
        assert canned.requests[0].startswith(b"POST /v1/completions ")
        assert (canned.header(0, "X-Request-Id"), canned.header(0, "X-Session-Id")) == ("r-1", "s-1")
        sent = json.loads(canned.requests[0].split(b"\r\n\r\n", 1)[1])
        assert sent == {"model": "m", "prompt": "hi", "stream": True, "max_tokens": 500,
                        "stream_options": {"include_usage": True}}


async def test_a_stream_cut_before_its_final_chunk_is_an_error() -> None:
    piece = b'data: {"choices": [{"index": 0, "text": "once", "finish_reason": null}]}\n\n'
    async with CannedServer(sse_response(piece)) as canned:
        remote = RemoteBackend(canned.url)
        with pytest.raises(CorralError, match="without its final chunk"):
            await collect(remote.complete("m", "hi"))
        await remote.aclose()


async def test_queue_full_keeps_the_message_and_retry_after() -> None:
    message = "model 'tiny-a': queue is full (9 waiting); retry after 3 s"
    body = json.dumps({"error": {"message": message, "type": "queue_full", "code": "queue_full",
                                 "request_id": "x"}}).encode()
    response = (b"HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/json\r\nretry-after: 3\r\n"
                b"content-length: %d\r\n\r\n%s" % (len(body), body))
    async with CannedServer((response, False)) as canned:
        remote = RemoteBackend(canned.url)
        with pytest.raises(QueueFull) as caught:
            await collect(remote.chat("tiny-a", [{"role": "user", "content": "hi"}]))
        await remote.aclose()
    error = caught.value
    assert (error.message, str(error), error.retry_after, error.depth, error.model, error.http_status) == (
        message, message, 3.0, 9, "tiny-a", 429)


def event(seq: int, ts: float, **extra: Any) -> dict[str, Any]:
    return {"type": "pin", "seq": seq, "ts": ts, "model": "m", "pinned": True, **extra}


async def test_event_reconnects_skip_what_was_seen_and_follow_a_restart() -> None:
    """Every reconnect replays the ring: a resumed server's old events are skipped, a restarted
    server's (seq from 1 again, but later in time) are kept, and a ring that moved on past what
    was missed becomes a Dropped with the count this reader lost."""
    dropped = {"type": "dropped", "seq": 0, "ts": 30.0, "count": 0}
    async with CannedServer(
        sse_response(event(5, 5.0), event(6, 6.0)),  # then the connection drops
        sse_response({**dropped, "count": 3}, event(4, 4.0), event(5, 5.0), event(6, 6.0), event(7, 7.0)),
        sse_response(event(1, 10.0), event(2, 11.0)),  # a restarted server
        sse_response({**dropped, "count": 9}, event(10, 20.0), hold_open=True),  # 3..9 lost
    ) as canned:
        remote = RemoteBackend(canned.url)
        async with reading(remote, after_seq=4) as reader:
            await reader.expect(lambda e: e.seq == 10)
        await remote.aclose()
    got = [(type(e).__name__, e.seq, getattr(e, "count", None)) for e in reader.seen if not isinstance(e, Notice)]
    assert got == [("PinChanged", 5, None), ("PinChanged", 6, None), ("PinChanged", 7, None),
                   ("PinChanged", 1, None), ("PinChanged", 2, None), ("Dropped", 0, 7), ("PinChanged", 10, None)]
    notices = [e.level for e in reader.seen if isinstance(e, Notice)]
    assert notices == ["warning", "info"] * 3 and all(e.ts > 0 for e in reader.seen)
    assert [canned.header(i, "Last-Event-ID") for i in range(4)] == ["4", "0", "0", "0"]


async def test_aclose_ends_an_open_event_stream() -> None:
    async with CannedServer(sse_response(event(1, 1.0), hold_open=True)) as canned:
        remote = RemoteBackend(canned.url)
        async with reading(remote) as reader:
            await reader.expect(lambda e: e.seq == 1)
            await remote.aclose()
            await reader.ended(5)  # on its own, without a Notice about reconnecting
        assert reader.queue.empty() and canned.hung_up.is_set()


async def test_importing_the_remote_backend_loads_neither_llama_cpp_nor_textual() -> None:
    """`corral attach` imports it in the console: it must stay free of llama.cpp and the UI."""
    code = ("import sys, corral.backend.remote; "
            "print(sorted(m for m in ('llama_cpp', 'textual') if m in sys.modules))")
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", code, stdout=subprocess.PIPE,
                                                stderr=subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    assert out.decode().strip() == "[]"
