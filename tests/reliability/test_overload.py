"""Overload (issue 8): more clients than slots and queue together. Whatever cannot be queued is
refused at once with a 429 and Retry-After, never a 5xx; every accepted request runs to its
end (no timeouts), and the queue drains back to 0."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from reliability.support import model_entry
from support import Server, assert_idle, slow_config, start_server

TIGHT = "tight"  # the slow model's file with 2 slots and a queue of 2: 4 requests at most
CLIENTS = 24
TOKENS = 24


@pytest.fixture(scope="module")
def crowded(tmp_path_factory: pytest.TempPathFactory, models: tuple[Path, Path]) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("overload")
    config = slow_config(root, *models)
    config.write_text(config.read_text() + model_entry(TIGHT, models[1], n_ctx=1024, n_parallel=2, max_queue=2))
    running = start_server(root, config)
    yield running
    assert running.stop() == 0, running.log()


async def one_request(client: httpx.AsyncClient, k: int) -> tuple[int, str]:
    """Half streaming, half whole; the verdict is (status, how it ended)."""
    body = {"model": TIGHT, "prompt": f"Request {k} says", "max_tokens": TOKENS, "ignore_eos": True}
    if k % 2:
        async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
            if response.status_code != 200:
                await response.aread()
                return response.status_code, refusal(response)
            lines = [line async for line in response.aiter_lines() if line.startswith("data: ")]
            return 200, "complete" if lines[-1] == "data: [DONE]" and '"finish_reason":"length"' in lines[-2] \
                else f"cut short: {lines[-2:]}"
    response = await client.post("/v1/completions", json=body)
    if response.status_code != 200:
        return response.status_code, refusal(response)
    done = response.json()["usage"]["completion_tokens"] == TOKENS
    return 200, "complete" if done else f"short: {response.text[:200]}"


def refusal(response: httpx.Response) -> str:
    """A 429 must say when to come back and why, in JSON; anything else is reported as is."""
    if response.status_code == 429 and int(response.headers["retry-after"]) >= 1 \
            and "queue is full" in response.json()["error"]["message"]:
        return "refused"
    return f"unexpected: {response.text[:200]}"


async def test_beyond_the_queue_is_429_only_and_the_accepted_all_finish(crowded: Server) -> None:
    limits = httpx.Limits(max_connections=CLIENTS + 4)
    async with httpx.AsyncClient(base_url=crowded.url, trust_env=False, limits=limits,
                                 timeout=httpx.Timeout(120)) as client:
        assert (await client.post(f"/api/models/{TIGHT}/load")).status_code == 200
        for wave in range(2):  # a second wave shows nothing was left behind by the first
            verdicts = Counter(await asyncio.gather(*(one_request(client, k) for k in range(CLIENTS))))
            assert set(verdicts) <= {(200, "complete"), (429, "refused")}, verdicts
            assert verdicts[(200, "complete")] >= 4 and verdicts[(429, "refused")] >= 1, verdicts
        metrics = (await client.get("/metrics")).text
    assert f'corral_queue_depth{{model="{TIGHT}"}} 0.0' in metrics
    with crowded.http() as http:
        assert_idle(http, TIGHT)
