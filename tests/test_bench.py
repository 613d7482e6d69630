"""`corral bench URL` against a real `corral serve` (tiny random models, an API key), plus its
request classification on a mocked transport and its answers to bad input.

The live runs are small (two levels, a handful of requests, 8 tokens each) so the module takes
a few seconds; what they prove is the shape of the report and that a healthy server at low
concurrency yields zero errors, not any speed.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from corral.console.bench import main
from corral.console.bench_measure import COLUMNS
from corral.console.bench_traffic import SCENARIOS, Call, Workload, send
from support import Server, free_port, start_server, write_config

KEY = "bench-test-key-0123"
MODEL = "tiny-bench"
HEADER = ["conc", "reqs", "QPS", "tok/s", "lat_p50", "lat_p99", "TTFT_p50", "TTFT_p99", "err%", "refused",
          "peak_q", "CPU%", "RAM"]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_gguf: Callable[..., Path]) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("bench")
    config = write_config(root / "corral.toml", {
        "include_default_model": False,
        "defaults": {"n_ctx": 512, "n_parallel": 2, "n_threads": 1, "keep_alive": -1},
        "models": [{"name": MODEL, "path": str(tiny_gguf(MODEL))}]})
    running = start_server(root, config, api_key=KEY)
    yield running
    assert running.stop() == 0, running.log()


def bench(url: str, *args: str) -> int:
    return main([url, "--max-tokens", "8", "--step-seconds", "20", "--timeout", "20s", *args])


def table(text: str) -> tuple[list[str], list[list[str]]]:
    """The header and the rows of the printed table (every cell is one word)."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:1] in (["conc"], ["elapsed"]))
    rows = []
    for line in lines[start + 1:]:
        cells = line.split()
        if not cells or not (cells[0].isdigit() or cells[0] == "total" or ":" in cells[0][:3]):
            break
        rows.append(cells)
    return lines[start].split(), rows


def test_steps_print_the_table_and_write_json(server: Server, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    report = tmp_path / "bench.json"
    assert bench(server.url, "--api-key", KEY, "--levels", "1,2", "--requests", "8", "--json", str(report)) == 0
    out = capsys.readouterr().out
    head, rows = table(out)
    assert head == HEADER == [title for title, _, _ in COLUMNS]
    assert [row[0] for row in rows] == ["1", "2"]
    for row in rows:
        cells = dict(zip(head, row))
        assert cells["reqs"] == "8" and cells["err%"] == "0.0" and cells["refused"] == "0"
        assert float(cells["tok/s"]) > 0 and float(cells["QPS"]) > 0
        assert cells["peak_q"] != "-" and cells["CPU%"] != "-" and cells["RAM"].endswith("G")
    assert "server /api/ps" in out

    data = json.loads(report.read_text())
    assert data["model"] == MODEL and not data["interrupted"]
    assert data["monitor"]["host"] == data["monitor"]["queue"] == "server /api/ps"
    assert data["settings"]["levels"] == [1, 2] and data["settings"]["api_key_set"] is True
    assert KEY not in report.read_text()
    assert [r["concurrency"] for r in data["rows"]] == [1, 2]
    for row in data["rows"]:
        assert row["requests"] == row["ok"] == 8 and row["errors"] == 0 and row["error_rate"] == 0
        assert row["tok_s"] > 0 and row["tokens"] > 0 and row["latency_p50_ms"] > 0
        assert sum(s["requests"] for s in row["scenarios"].values()) == 8
        assert set(row["scenarios"]) <= set(SCENARIOS)
    sent = {name for row in data["rows"] for name in row["scenarios"]}
    assert "stream" in sent and any(r["ttft_p50_ms"] for r in data["rows"])


def test_soak_rows_per_interval_then_a_total(server: Server, capsys: pytest.CaptureFixture[str]) -> None:
    assert bench(server.url, "--api-key", KEY, "--duration", "2s", "--report-every", "1s", "--concurrency", "2",
                 "--json", "-") == 0
    captured = capsys.readouterr()
    head, rows = table(captured.err)  # with --json -, the table goes to stderr and stdout is only JSON
    assert head[0] == "elapsed" and head[1:] == HEADER
    data = json.loads(captured.out)
    labels = [r["label"] for r in data["rows"]]
    assert labels[-1] == "soak total" and labels.count("soak") >= 2 and rows[-1][0] == "total"
    total = data["rows"][-1]
    assert total["errors"] == 0 and total["requests"] == sum(r["requests"] for r in data["rows"][:-1])
    assert 2 <= total["elapsed_s"] < 20


@pytest.mark.parametrize("args, says", [
    (["--api-key", "wrong-key-0000"], "refused the API key (HTTP 401)"),
    ([], "refused the API key (HTTP 401)"),
    (["--api-key", KEY, "--model", "nope"], f"unknown model 'nope'; the server lists: {MODEL}"),
    (["--api-key", KEY, "--json", "/no/such/folder/x.json"], "does not exist"),
])
def test_bad_input_is_one_line_and_exit_2(server: Server, args: list[str], says: str,
                                          capsys: pytest.CaptureFixture[str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CORRAL_API_KEY", raising=False)
    assert bench(server.url, *args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("corral bench: ") and says in err and "\n" not in err


def test_unreachable_server_in_a_subprocess_without_the_model_stack() -> None:
    """The real command line: one line, exit 2, no traceback, and neither llama_cpp nor textual loaded."""
    script = ("import atexit, sys\n"
              "atexit.register(lambda: print('heavy:', sorted(m for m in sys.modules "
              "if m.split('.')[0] in ('llama_cpp', 'textual')), file=sys.stderr))\n"
              "from corral.console.bench import main\n"
              "sys.exit(main(sys.argv[1:]))\n")
    url = f"http://127.0.0.1:{free_port()}"
    done = subprocess.run([sys.executable, "-c", script, url], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines[0].startswith(f"corral bench: cannot reach {url}") and lines[1:] == ["heavy: []"]


@pytest.mark.parametrize("args", [["--levels", "1,x"], ["--levels", "0"], ["--scenarios", "chat=1"],
                                  ["--scenarios", "stream=0"], ["--duration", "soon"], ["--timeout", "-1"]])
def test_bad_options_exit_2(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["http://127.0.0.1:1", *args])
    assert exit_.value.code == 2 and "corral bench: error: argument" in capsys.readouterr().err


def test_bad_url_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["127.0.0.1:8377"]) == 2
    assert "URL must look like http://HOST:PORT" in capsys.readouterr().err


def test_the_mix_is_seeded_and_weighted() -> None:
    workload = Workload("m", {"short_chat": 3, "stream": 1, "long_prompt": 0, "embeddings": 1}, 8, True)
    picks = [workload.picker("7:step:4") for _ in range(2)]
    first = [picks[0](k).scenario for k in range(400)]
    assert [picks[1](k).scenario for k in range(400)] == first
    assert "long_prompt" not in first and 0.45 < first.count("short_chat") / 400 < 0.75
    assert Workload.text(1, 20) != Workload.text(2, 20) and len(Workload.text(3, 20).split()) == 20


def mocked(handler: Callable[[httpx.Request], httpx.Response]) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.MockTransport(handler), base_url="http://bench.test")


def run_send(handler: Callable[[httpx.Request], httpx.Response], call: Call, timeout: float = 5.0) -> object:
    async def go() -> object:
        async with mocked(handler) as client:
            return await send(client, call, timeout)
    return asyncio.run(go())


CHAT = Call("short_chat", "/v1/chat/completions", {"model": "m"})
STREAM = Call("stream", "/v1/chat/completions", {"model": "m", "stream": True}, stream=True)


def test_a_429_is_refused_with_its_retry_after() -> None:
    outcome = run_send(lambda r: httpx.Response(429, headers={"retry-after": "3"},
                                                json={"error": {"message": "queue is full"}}), CHAT)
    assert (outcome.status, outcome.retry_after_s, outcome.error, outcome.detail) == ("refused", 3.0, None,
                                                                                      "queue is full")


def test_errors_are_classified() -> None:
    def broken(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    server_error = run_send(lambda r: httpx.Response(500, json={"error": {"message": "boom"}}), CHAT)
    assert (server_error.status, server_error.error, server_error.detail) == ("error", "http 500", "boom")
    assert run_send(broken, CHAT).error == "connection"
    assert run_send(lambda r: httpx.Response(200, text="not json"), CHAT).error == "bad response"

    async def slow(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(5)
        return httpx.Response(200, json={})
    timed_out = run_send(slow, CHAT, timeout=0.05)
    assert timed_out.error == "timeout" and "0.05" in timed_out.detail


def test_a_stream_gives_ttft_tokens_and_stream_errors() -> None:
    def sse(*chunks: dict[str, object]) -> Callable[[httpx.Request], httpx.Response]:
        body = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
        return lambda r: httpx.Response(200, text=body, headers={"content-type": "text/event-stream"})

    piece = {"choices": [{"delta": {"content": "hi"}, "finish_reason": None}]}
    last = {"choices": [{"delta": {}, "finish_reason": "length"}], "usage": {"completion_tokens": 5}}
    ok = run_send(sse(piece, piece, last), STREAM)
    assert ok.status == "ok" and ok.tokens == 5 and ok.ttft_s is not None and ok.ttft_s <= ok.latency_s
    no_usage = run_send(sse(piece, piece, {"choices": [{"delta": {}, "finish_reason": "stop"}]}), STREAM)
    assert no_usage.tokens == 2
    failed = run_send(sse(piece, {"choices": [], "error": {"message": "engine failure"}}), STREAM)
    assert (failed.status, failed.error, failed.detail) == ("error", "stream error", "engine failure")


def test_requests_bypass_the_response_cache_unless_asked() -> None:
    """Every step repeats the same requests; answered from corral's cache they would not decode."""
    mix = {"short_chat": 1, "stream": 1, "long_prompt": 1, "embeddings": 0}
    for scenario in ("short_chat", "stream", "long_prompt"):
        assert Workload("m", mix, 8, True).call(scenario, 0).body["cache"] is False
        assert "cache" not in Workload("m", mix, 8, True, response_cache=True).call(scenario, 0).body
