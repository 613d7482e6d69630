"""Tables for Jupyter and Rich (display.py) and the notebook helpers that print streams and
gather events (notebook.py), on hand-made snapshots: no model, no kernel."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from dataclasses import replace

import pytest
from rich.console import Console

from corral.backend import EventLog, ModelTable, aprint_stream, print_stream, recent_events
from corral.backend.errors import CorralError
from corral.backend.events import Event, Notice, RequestFinished, StateChanged
from corral.backend.generation import Chunk, RequestStats
from corral.backend.snapshot import ModelInfo, Status
from corral.backend.telemetry import GPUStats, HostStats

MODEL = ModelInfo(
    name="qwen<b>", state="ready", source="dir", path="/models/qwen.gguf", usable=True, error=None,
    file_size=400 * 2**20, architecture="qwen2", quantization="Q4_K_M", parameters=494_000_000,
    context_length=32768, n_ctx=4096, n_parallel=4, pinned=True, keep_alive_s=300.0, ttl_left_s=None,
    in_flight=1, active=1, queued=0, tokens_per_s=52.5, estimate_bytes=600 * 2**20,
    estimate_detail=None, measured_bytes=512 * 2**20, measured_vram=None, load_seconds=1.2,
    load_percent=None, last_used=None, chat_template="gguf")
BROKEN = replace(MODEL, name="broken", state="available", usable=False, error="truncated file & more",
                 measured_bytes=None, pinned=False, in_flight=0, tokens_per_s=0.0)
HOST = HostStats(ts=0.0, cpu_percent=12.0, cpu_count=8, physical_cores=4, ram_used=8 * 2**30,
                 ram_total=32 * 2**30, ram_available=24 * 2**30, process_rss=900 * 2**20,
                 gpus=(GPUStats(0, "RTX 4090", None, 35.0, 2**30, 24 * 2**30, 50.0, 100.0, 450.0),), gpu_note="")
STATUS = Status(models=(MODEL, BROKEN), host=HOST, ram_budget=20 * 2**30, ram_reserved=512 * 2**20, max_loaded=3)
EVENTS = [StateChanged(seq=1, ts=1_700_000_000.25, model="qwen<b>", old="loading", new="ready", reason="loaded"),
          RequestFinished(seq=2, ts=1_700_000_001.0, model="qwen<b>", request_id="r1", finish_reason="stop",
                          prompt_tokens=5, completion_tokens=7, ttft_s=0.0123456, duration_s=0.2,
                          tokens_per_s=31.0)]


def rich_text(renderable: object) -> str:
    console = Console(record=True, width=200, file=io.StringIO())
    console.print(renderable)
    return console.export_text()


def test_a_model_list_is_one_html_table_with_every_value_escaped() -> None:
    html = ModelTable([MODEL, BROKEN])._repr_html_()
    assert html.startswith('<table class="corral"><caption>models</caption>') and html.count("<tr>") == 3
    assert "<td>qwen&lt;b&gt;</td>" in html and "<b>" not in html
    assert "<td>unusable: truncated file &amp; more</td>" in html
    assert "<td>494M</td>" in html and "<td>512.0 MiB</td>" in html and "<td>~600.0 MiB</td>" in html
    assert "<td>52.5</td>" in html and "<td>yes</td>" in html


def test_a_model_alone_shows_its_details() -> None:
    html = MODEL._repr_html_()
    assert "<caption>qwen&lt;b&gt;</caption>" in html
    assert "<td>4096 (trained 32768), 4 slots</td>" in html
    assert "<td>estimate 600.0 MiB, measured 512.0 MiB</td>" in html
    assert "error" not in html and "<td>error</td>" in BROKEN._repr_html_()


def test_status_shows_the_host_then_the_models() -> None:
    html = STATUS._repr_html_()
    host, models = html.split("<caption>models</caption>")
    assert "<caption>host</caption>" in host and "<thead>" not in host  # label/value rows
    assert "<td>12 % of 8 threads (4 cores)</td>" in host
    assert "<td>512.0 MiB of a 20.0 GiB budget</td>" in host and "<td>1 of at most 3</td>" in host
    assert "<td>GPU 0</td><td>RTX 4090: 35 % busy, 1.0 GiB of 24.0 GiB</td>" in host
    assert "qwen&lt;b&gt;" in models and "broken" in models
    no_gpu = replace(STATUS, host=replace(HOST, gpus=(), gpu_note="no GPU (NVML library not found)"))
    assert "<td>GPU</td><td>no GPU (NVML library not found)</td>" in no_gpu._repr_html_()


def test_events_are_rows_with_their_own_fields_as_details() -> None:
    html = EventLog(EVENTS)._repr_html_()
    assert html.count("<tr>") == 3 and "<caption>events</caption>" in html
    assert "<td>old=loading new=ready reason=loaded</td>" in html
    assert "ttft_s=0.0123 duration_s=0.2 tokens_per_s=31" in html and "<td>r1</td>" in html
    one = EVENTS[0]._repr_html_()
    assert one.count("<tr>") == 2 and "<td>state</td>" in one
    assert ".250</td>" in one  # milliseconds, local time
    unstamped = Notice(level="warning", message="lost <the> stream")._repr_html_()
    assert "<td></td><td></td><td>notice</td>" in unstamped and "lost &lt;the&gt; stream" in unstamped


def test_rich_renders_the_same_tables() -> None:
    assert "qwen<b>" in rich_text(ModelTable([MODEL])) and "Q4_K_M" in rich_text(MODEL)
    status = rich_text(STATUS)
    assert "host" in status and "RTX 4090" in status and "broken" in status
    assert "request_finished" in rich_text(EventLog(EVENTS)) and "loading" in rich_text(EVENTS[0])


class Recorder(io.StringIO):
    """stdout that remembers what each flush made visible."""

    def __init__(self) -> None:
        super().__init__()
        self.flushed: list[str] = []

    def flush(self) -> None:
        self.flushed.append(self.getvalue())


STATS = RequestStats(prompt_tokens=3, completion_tokens=2, queue_wait_s=0.0, ttft_s=0.01, duration_s=0.02)
CHUNKS = [Chunk("Once"), Chunk(" upon"), Chunk("", "length", STATS)]


def test_print_stream_shows_each_token_as_it_comes_and_returns_the_stats() -> None:
    out = Recorder()
    assert print_stream(iter(CHUNKS), file=out) == STATS
    assert out.flushed == ["Once", "Once upon", "Once upon\n"]


async def test_aprint_stream_does_the_same_for_an_async_stream() -> None:
    async def stream() -> AsyncIterator[Chunk]:
        for chunk in CHUNKS:
            yield chunk

    out = Recorder()
    assert await aprint_stream(stream(), file=out) == STATS
    assert out.flushed == ["Once", "Once upon", "Once upon\n"]


def test_print_stream_raises_a_failed_generation_after_its_text(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(CorralError, match="the generation failed: decode error"):
        print_stream([Chunk("partial"), Chunk("", "error", None, "decode error")])
    assert capsys.readouterr().out == "partial\n"  # sys.stdout as it is at the call


class Feed:
    """A backend's live event feed: what it holds, then silence (it never ends by itself)."""

    def __init__(self, events: list[Event]) -> None:
        self.events, self.after, self.closed = events, None, False

    def events_after(self, after_seq: int | None) -> AsyncIterator[Event]:
        self.after = after_seq
        return self._read()

    async def _read(self) -> AsyncIterator[Event]:
        try:
            for event in self.events:
                yield event
            await asyncio.Event().wait()
        finally:
            self.closed = True


async def test_recent_events_reads_until_the_feed_goes_quiet() -> None:
    feed = Feed(EVENTS * 3)
    backend = type("FakeBackend", (), {"events": lambda self, after_seq=None: feed.events_after(after_seq)})()
    log = await asyncio.wait_for(recent_events(backend, idle_s=0.05, limit=4), 5)
    assert isinstance(log, EventLog) and log == (EVENTS * 3)[-4:]
    assert feed.after == 0 and feed.closed
