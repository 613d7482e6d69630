"""What `corral bench` sends and what comes back: the scenario mix of requests and one
request's outcome (ok, refused with its Retry-After, or an error), streamed or whole."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import httpx

from corral.backend.remote import sse_events


SCENARIOS = ("short_chat", "long_prompt", "stream", "embeddings")
Verdict = Literal["ok", "refused", "error"]

_WORDS = ("the old map showed a long road through green hills to a small town by the sea where "
          "people made bread and boats every day and children ran to the water when the sun came "
          "up over the quiet harbour while birds sang in tall trees near the market square").split()
_QUESTIONS = ("name three colours of the sky", "what is a good name for a small dog",
              "say hello in two languages", "list four kinds of fruit", "what do bees make",
              "give a word that rhymes with tree", "how many days are in a week", "name a large river")


@dataclass(frozen=True)
class Call:
    """One HTTP request of one scenario."""

    scenario: str
    path: str
    body: dict[str, Any]
    stream: bool = False


@dataclass
class Workload:
    """Builds the requests: which scenario comes k-th is drawn from a seeded RNG, so a rerun
    with the same seed sends the same mix in the same order; every prompt is unique to its
    request so a server's prefix cache cannot turn the load test into a cache test."""

    model: str
    weights: dict[str, float]
    max_tokens: int
    ignore_eos: bool
    response_cache: bool = False  # off: every step repeats the same requests, and hits would not decode
    long_words: int = 256

    def picker(self, seed: str) -> Callable[[int], Call]:
        """The k-th request of one step (or soak); `seed` names the step so steps differ."""
        rng = random.Random(seed)
        names = [n for n in SCENARIOS if self.weights.get(n)]
        weights = [self.weights[n] for n in names]
        return lambda k: self.call(rng.choices(names, weights)[0], k)

    def call(self, scenario: str, k: int) -> Call:
        generation = {"model": self.model, "max_tokens": self.max_tokens, "temperature": 0}
        if self.ignore_eos:
            generation["ignore_eos"] = True
        if not self.response_cache:
            generation["cache"] = False
        if scenario == "short_chat":
            return Call(scenario, "/v1/chat/completions", {**generation, "messages": self._question(k)})
        if scenario == "stream":
            return Call(scenario, "/v1/chat/completions",
                        {**generation, "messages": self._question(k), "stream": True,
                         "stream_options": {"include_usage": True}}, stream=True)
        if scenario == "long_prompt":
            return Call(scenario, "/v1/completions", {**generation, "prompt": self.text(k, self.long_words)})
        if scenario == "embeddings":
            return Call(scenario, "/v1/embeddings", {"model": self.model, "input": self.text(k, 12)})
        raise ValueError(f"unknown scenario {scenario!r}")

    @staticmethod
    def _question(k: int) -> list[dict[str, str]]:
        return [{"role": "user", "content": f"Request {k}: {_QUESTIONS[k % len(_QUESTIONS)]}?"}]

    @staticmethod
    def text(k: int, words: int) -> str:
        """`words` common words in an order of k's own (a different opening for nearly every k)."""
        return " ".join(random.Random(k).choices(_WORDS, k=words))


@dataclass(frozen=True)
class Outcome:
    """What one request came to, as the client saw it."""

    scenario: str
    status: Verdict
    latency_s: float
    ttft_s: float | None = None  # streams only: until the first text arrived
    tokens: int = 0  # generated tokens (embeddings: 0)
    error: str | None = None  # the class: "http 500", "timeout", "connection", "stream error", ...
    detail: str | None = None  # the server's message or the exception, shortened
    retry_after_s: float | None = None
    prompt_tokens: int | None = None


def error_message(response: httpx.Response) -> str:
    """The server's error message (OpenAI's error shape), else the start of the body."""
    try:
        error = response.json().get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
    except (ValueError, AttributeError):
        pass
    return response.text[:200] or response.reason_phrase


def _retry_after(response: httpx.Response) -> float | None:
    try:
        return max(0.0, float(response.headers.get("retry-after", "")))
    except ValueError:
        return None


def _refusal_or_error(call: Call, response: httpx.Response, started: float) -> Outcome:
    """A non-2xx answer: 429 is the server protecting itself (refused), the rest are errors."""
    latency = time.perf_counter() - started
    if response.status_code == 429:
        return Outcome(call.scenario, "refused", latency, detail=error_message(response),
                       retry_after_s=_retry_after(response))
    return Outcome(call.scenario, "error", latency, error=f"http {response.status_code}",
                   detail=error_message(response)[:200])


def _usage(data: dict[str, Any], key: str) -> int | None:
    usage = data.get("usage")
    value = usage.get(key) if isinstance(usage, dict) else None
    return int(value) if isinstance(value, (int, float)) else None


async def _whole(client: httpx.AsyncClient, call: Call, started: float) -> Outcome:
    response = await client.post(call.path, json=call.body)
    if response.status_code >= 300:
        return _refusal_or_error(call, response, started)
    data = response.json()
    latency = time.perf_counter() - started
    return Outcome(call.scenario, "ok", latency, tokens=_usage(data, "completion_tokens") or 0,
                   prompt_tokens=_usage(data, "prompt_tokens"))


async def _streamed(client: httpx.AsyncClient, call: Call, started: float) -> Outcome:
    """Read an SSE stream to its end: TTFT is the first chunk carrying text, tokens come from the
    usage on the last chunk (or the count of text chunks when a server sends no usage)."""
    ttft: float | None = None
    pieces = 0
    tokens: int | None = None
    async with client.stream("POST", call.path, json=call.body) as response:
        if response.status_code >= 300:
            await response.aread()
            return _refusal_or_error(call, response, started)
        async for _, _, data in sse_events(response):
            if data.strip() == "[DONE]":
                break
            chunk = json.loads(data)
            error = chunk.get("error")
            if error:
                detail = error.get("message", error) if isinstance(error, dict) else error
                return Outcome(call.scenario, "error", time.perf_counter() - started, ttft, pieces,
                               error="stream error", detail=str(detail)[:200])
            for choice in chunk.get("choices") or []:
                text = (choice.get("delta") or {}).get("content") or choice.get("text")
                if text:
                    pieces += 1
                    if ttft is None:
                        ttft = time.perf_counter() - started
            tokens = _usage(chunk, "completion_tokens") or tokens
    return Outcome(call.scenario, "ok", time.perf_counter() - started, ttft,
                   tokens if tokens is not None else pieces)


async def send(client: httpx.AsyncClient, call: Call, timeout: float) -> Outcome:
    """Send one request and classify what happened; a load test reports failures, it never
    stops at them, so every exception becomes an error Outcome with its class."""
    started = time.perf_counter()

    def failed(kind: str, exc: BaseException) -> Outcome:
        text = str(exc).strip() or type(exc).__name__
        return Outcome(call.scenario, "error", time.perf_counter() - started, error=kind, detail=text[:200])

    try:
        async with asyncio.timeout(timeout):
            if call.stream:
                return await _streamed(client, call, started)
            return await _whole(client, call, started)
    except (TimeoutError, httpx.TimeoutException) as exc:
        return failed("timeout", exc if str(exc) else TimeoutError(f"no complete answer in {timeout:g} s"))
    except httpx.TransportError as exc:
        return failed("connection", exc)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:  # a body that is not the JSON expected
        return failed("bad response", exc)


# -- watching the host -------------------------------------------------------------------------
