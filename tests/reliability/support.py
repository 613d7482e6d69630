"""What the reliability tests share: config entries, and a stream that must come through a fault.

"The server stays up and others are unaffected" is shown, not assumed: each fault test opens a
streaming request on the slow model, waits for its first token, causes the fault, and then
requires that stream to end normally, with every token it asked for.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from support import HELLO, SLOW, Server, toml

STREAM_TOKENS = 500  # several seconds on the slow model: it is still running while a fault happens


def model_entry(name: str, path: Path, **options: Any) -> str:
    """A `[[models]]` table for the config file, appended after the ones `slow_config` writes."""
    return toml({"models": [{"name": name, "path": str(path), **options}]})


class InFlight:
    """One streaming chat on the slow model, read to its end in a thread."""

    def __init__(self, server: Server, max_tokens: int = STREAM_TOKENS) -> None:
        self.server = server
        self.max_tokens = max_tokens
        self.started = threading.Event()
        self.chunks: list[dict[str, Any]] = []
        self.lines: list[str] = []
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._read, name="in-flight-stream", daemon=True)

    def _read(self) -> None:
        body = {"model": SLOW, "messages": HELLO, "stream": True, "max_tokens": self.max_tokens,
                "ignore_eos": True, "stream_options": {"include_usage": True}}
        try:
            with self.server.http() as client, client.stream("POST", "/v1/chat/completions", json=body,
                                                             timeout=httpx.Timeout(30, read=120)) as response:
                assert response.status_code == 200, response.read()
                for line in response.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    self.lines.append(line)
                    if line != "data: [DONE]":
                        self.chunks.append(json.loads(line[6:]))
                    self.started.set()
        except BaseException as exc:  # reported by finish(), in the test's thread
            self.error = exc
        finally:
            self.started.set()

    def running(self) -> bool:
        return self.thread.is_alive()

    def finish(self) -> None:
        """Wait for the end of the stream and require a normal one: every token, `length`, [DONE]."""
        self.thread.join(timeout=300)
        assert not self.thread.is_alive(), "the in-flight stream never ended"
        if self.error is not None:
            raise AssertionError(f"the in-flight stream failed: {self.error!r}") from self.error
        assert self.lines[-1] == "data: [DONE]"
        finals = [c for c in self.chunks if c["choices"] and c["choices"][0]["finish_reason"]]
        assert [c["choices"][0]["finish_reason"] for c in finals] == ["length"], finals
        assert self.chunks[-1]["usage"]["completion_tokens"] == self.max_tokens


@contextmanager
def stream_survives(server: Server, max_tokens: int = STREAM_TOKENS) -> Iterator[InFlight]:
    """Inside the block a stream on the slow model is running; on leaving, the block's work must
    have happened while it still ran, and it must then end normally."""
    flight = InFlight(server, max_tokens)
    flight.thread.start()
    assert flight.started.wait(60) and flight.error is None, flight.error
    yield flight
    assert flight.running(), "the stream ended before the fault was over: raise STREAM_TOKENS"
    flight.finish()
