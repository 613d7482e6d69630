"""The load/evict storm (issue 8): 100 load and evict cycles across three tiny models while
requests keep arriving for them. No deadlock, every request answered or refused cleanly, and
the server's resident memory back within 5 % of its baseline after warm-up (the figure is
printed: `pytest -s` shows it)."""

from __future__ import annotations

import threading
from collections import Counter

import httpx
import psutil

from support import TINY, Server, assert_idle

CYCLES = 100
# The warm-up fills what is bounded but starts empty (the 1,024-event replay ring, each model's
# recent-request samples, malloc's per-thread arenas): seen here, RSS rises ~15 % over the
# first 50 cycles with traffic and is flat after, so growth past the baseline would be a leak.
WARMUP_CYCLES = 200
CLEAN_REFUSALS = {409, 429, 503}  # busy, queue full, shutting down: said in JSON, never a 5xx crash


def cycle(http: httpx.Client, k: int) -> None:
    """Load one tiny model and evict it again (forced: an evict refused for a request in flight
    would leave nothing to measure)."""
    name = TINY[k % len(TINY)]
    loaded = http.post(f"/api/models/{name}/load")
    assert loaded.status_code == 200, loaded.text
    evicted = http.post(f"/api/models/{name}/evict", params={"force": "true"})
    assert evicted.status_code == 200, evicted.text


class Traffic:
    """Clients sending short requests to the three models until told to stop."""

    def __init__(self, server: Server, clients: int = 2) -> None:
        self.server = server
        self.stop = threading.Event()
        self.verdicts: Counter[str] = Counter()
        self.threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(clients)]

    def _client(self, i: int) -> None:
        with self.server.http() as http:
            k = i
            while not self.stop.is_set():
                k += 1
                body = {"model": TINY[k % len(TINY)], "prompt": f"storm {k}", "max_tokens": 8, "ignore_eos": True}
                try:
                    response = http.post("/v1/completions", json=body)
                except httpx.HTTPError as exc:
                    self.verdicts[f"transport: {exc!r}"] += 1
                    continue
                self.verdicts[verdict(response)] += 1

    def __enter__(self) -> Traffic:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=120)
        assert not any(thread.is_alive() for thread in self.threads), "a client is stuck: deadlock?"


def settled_rss(http: httpx.Client, process: psutil.Process) -> int:
    """RSS once the traffic is over and nothing is loaded: the clients' requests auto-load
    models, so one may be loaded when they stop, and its context would count as growth."""
    for name in TINY:
        assert_idle(http, name)
    assert http.post("/api/unload-all").status_code == 200
    return process.memory_info().rss


def verdict(response: httpx.Response) -> str:
    if response.status_code == 200:
        return "answered" if response.json()["usage"]["completion_tokens"] == 8 else f"short: {response.text}"
    if response.status_code in CLEAN_REFUSALS and response.json()["error"]["message"]:
        return "refused"
    return f"{response.status_code}: {response.text[:200]}"


def test_load_evict_storm_under_traffic(server: Server) -> None:
    process = psutil.Process(server.proc.pid)
    with server.http() as http:
        with Traffic(server) as warmup:
            for k in range(WARMUP_CYCLES):
                cycle(http, k)
        baseline = settled_rss(http, process)
        with Traffic(server) as storm:
            for k in range(CYCLES):
                cycle(http, k)
        after = settled_rss(http, process)
    verdicts = warmup.verdicts + storm.verdicts
    assert set(verdicts) <= {"answered", "refused"}, verdicts
    assert storm.verdicts["answered"] > 0
    growth = after / baseline - 1
    print(f"\nstorm: {CYCLES} load/evict cycles, {storm.verdicts['answered']} requests answered, "
          f"{storm.verdicts['refused']} refused; RSS {baseline / 2**20:.1f} MiB after warm-up, "
          f"{after / 2**20:.1f} MiB after the storm ({100 * growth:+.1f} %)")
    assert growth <= 0.05, f"RSS grew {100 * growth:.1f} % over {CYCLES} cycles"
