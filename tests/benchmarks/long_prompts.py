"""Long prompts: `corral serve` against llama-server on prefill-heavy work, in one run.

    .venv/bin/python -m tests.benchmarks.long_prompts [--passes N] [--json results.json]
    .venv/bin/python -m tests.benchmarks.long_prompts --quick     # checks the script itself

Both servers run at the same time on free 127.0.0.1 ports with the default model and equal
settings (serving.py's make_servers: unified KV, full-size SWA cache, flash attention on,
n_batch = n_ubatch, same threads, n_ctx 32768), are warmed up (short requests, then one long
prompt), and each scenario is measured on each server in turn (the order rotates per scenario
and pass):

1. long1: one ~4,400-token prompt, streaming /v1/completions, max_tokens 4: wall time, TTFT.
2. long4: four different such prompts at once: wall time until all four end, each TTFT.
3. prefill_beside_decode: 7 streams decoding (short prompts), then one ~4,400-token prompt
   arrives: the running streams' inter-token gaps while the newcomer is prefilled (from its
   arrival to its first token) and the newcomer's TTFT.
4. shared_prefix: 8 clients, a ~1,500-token system prompt shared by all, a different short
   question each, 4 requests per client back to back (streaming /v1/chat/completions,
   max_tokens 8): TTFT p50/p90 and the prompt tokens each server took from its cache.
5. the decode ceiling (ceiling.py's bare llama_decode loop at 1 and 8 streams), for reference.

long1 and long4 run on servers with 4 slots; prefill_beside_decode and shared_prefix need 8
and run on a second pair started with 8 slots (one pair at a time). Every request is greedy
(temperature 0, repeat_penalty 1, ignore_eos) and has `cache: false` on corral (its response
cache). No two completion prompts of a run share a prefix beyond BOS (each starts with its own
opener word, one whose first token no other prompt starts with, then numbered sentences drawn
from a per-prompt seeded generator), so only shared_prefix measures prefix caching. Token
counts come from the model's vocabulary through llama_cpp (corral has no /tokenize).

Servers are always terminated (their own process groups, SIGTERM then SIGKILL), also on
Ctrl-C or SIGTERM. Not part of the default test run (pyproject: norecursedirs = tests/benchmarks).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import random
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from .peers import default_model_path, ensure_llama_server, llama_cpp_version, log, version_line
from .report import Record, fmt, machine_busy_seconds, machine_info, percentile, ratio, write_json
from .serving import (CORRAL_MODEL, OPENERS, PROMPTS, Server, _terminate, corral_model_state, make_servers,
                      one_request, ready_and_warm, start_all)

SERVERS = ("corral", "llama-server")
SCENARIOS = ("long1", "long4", "prefill_beside_decode", "shared_prefix")
WIDE = ("prefill_beside_decode", "shared_prefix")  # need 8 slots: 7 + 1 streams, 8 clients

# Words for the generated text: varied enough that the prompts read as different text to the
# tokenizer (no repeated long n-grams a cache or a batch split could favour).
ADJECTIVES = """quiet crooked golden narrow ancient restless patient silver hollow bright muddy
frozen gentle stubborn curious faded rusty polished hidden noisy careful distant wooden tiny
enormous bitter cheerful lonely clever brittle""".split()
NOUNS = """harbor lantern orchard engineer violin glacier library courier meadow compass
blacksmith ferry telescope bakery river archive falcon workshop tailor bridge notebook canyon
painter kettle monastery sailor garden clock beekeeper quarry""".split()
VERBS = """repaired carried painted measured borrowed counted polished abandoned discovered
described mended guarded followed visited weighed sketched ordered traded cleaned studied""".split()
PLACES = ["old mill", "train station", "market square", "lighthouse", "village well", "city wall", "north gate",
          "salt marsh", "stone quay", "apple farm", "town hall", "river bend", "mountain pass", "ferry landing"]
NAMES = """Amara Bruno Chiara Dmitri Elif Farid Greta Hiro Ines Jonas Kaveh Lena Mateo Nadia
Oskar Priya Quentin Rosa Soren Tomas Ulla Viktor Wren Ximena Yusuf Zofia""".split()
TIMES = ["dawn", "noon", "midnight", "sunset", "the harvest", "the first frost", "the spring fair",
         "the long winter", "the market day", "the flood"]
TEMPLATES = (
    "The {adj} {noun} near the {place} {verb} {num} {noun2}s before {time}.",
    "In the {place}, {name} {verb} a {adj} {noun} and wrote about the {noun2}.",
    "{name} said the {noun} was {adj}, but the {noun2} by the {place} was {adj2}.",
    "Every {time}, a {adj} {noun} {verb} the {noun2} while {name} counted to {num}.",
    "Nobody expected the {noun} from the {place} to look so {adj} after {time}.",
    "{name} and the {adj} {noun2} {verb} {num} old maps of the {place}.",
    "According to {name}, the {noun} has been {adj} since {time}.",
)
EXTRA_OPENERS = """Amber Beyond Cobalt Daylight Ember Fathom Granite Harvest Ivory Juniper Kindle
Lagoon Marble Nectar Obsidian Pebble Quartz Riddle Saffron Thistle Umber Velvet Willow Yonder
Zenith Anchor Bramble Cinder Driftwood Evergreen Flicker Gossamer Hazel Inkwell Jasper Kestrel
Lantern Meadow Nimbus Orchard Parchment Quill Rustle Sparrow Tundra Upland Vessel Wander""".split()
SHORT_QUESTION = "Question {q}: in one short sentence, what does note {note} say about the {noun}?"


def log_quietly() -> None:
    """llama_cpp prints llama.cpp's log lines unless its logger is raised above INFO."""
    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)


class Vocabulary:
    """The model's vocabulary alone (llama.cpp's vocab_only load: no weights), to count tokens."""

    def __init__(self, path: Path) -> None:
        log_quietly()
        import llama_cpp

        self._llama = llama_cpp
        llama_cpp.llama_backend_init()
        params = llama_cpp.llama_model_default_params()
        params.vocab_only = True
        self._model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        if not self._model:
            raise RuntimeError(f"llama.cpp could not read the vocabulary of {path}")
        self._vocab = llama_cpp.llama_model_get_vocab(self._model)
        self.n_leading = len(self.tokenize(""))  # BOS, when the vocabulary adds one

    def first_token(self, text: str) -> int:
        """The first token of `text` after BOS."""
        return self.tokenize(text)[self.n_leading]

    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        data = text.encode()
        capacity = len(data) + 8  # a token covers at least one byte; + BOS/EOS
        buf = (self._llama.llama_token * capacity)()
        n = self._llama.llama_tokenize(self._vocab, data, len(data), buf, capacity, add_special, True)
        if n < 0:
            raise RuntimeError(f"tokenize needed {-n} tokens, more than {capacity}")
        return list(buf[:n])

    def meta(self, key: str) -> str | None:
        from corral.backend.weights import model_meta

        return model_meta(self._model, key)

    def close(self) -> None:
        if self._model:
            self._llama.llama_model_free(self._model)
            self._model = None


# -- prompts -----------------------------------------------------------------------------------

class Openers:
    """Opening words whose first token (after BOS) no other prompt of the run starts with."""

    def __init__(self, vocab: Vocabulary, taken: list[str]) -> None:
        self.vocab = vocab
        self.pool = list(dict.fromkeys(OPENERS + EXTRA_OPENERS + [w.capitalize() for w in NOUNS + ADJECTIVES]))
        self.used = {vocab.first_token(text) for text in taken}

    def next(self) -> str:
        while self.pool:
            word = self.pool.pop(0)
            first = self.vocab.first_token(f"{word},")
            if first not in self.used:
                self.used.add(first)
                return word
        raise RuntimeError("out of opener words whose first token is unused: use fewer --passes")


def sentence(rng: random.Random) -> str:
    noun, noun2 = rng.sample(NOUNS, 2)
    adj, adj2 = rng.sample(ADJECTIVES, 2)
    return rng.choice(TEMPLATES).format(adj=adj, adj2=adj2, noun=noun, noun2=noun2, verb=rng.choice(VERBS),
                                        place=rng.choice(PLACES), name=rng.choice(NAMES),
                                        time=rng.choice(TIMES), num=rng.randint(2, 99))


@dataclass
class Prompt:
    text: str
    tokens: int  # with BOS, as /v1/completions evaluates it
    notes: int = 0  # numbered sentences in it


def numbered_text(vocab: Vocabulary, head: str, seed: str, target: int) -> Prompt:
    """`head` then numbered sentences until about `target` tokens (BOS included)."""
    rng = random.Random(seed)
    parts = [head]
    n = len(vocab.tokenize(head))
    i = 0
    while n < target:
        i += 1
        part = f" {i}. {sentence(rng)}"
        n += len(vocab.tokenize(part, add_special=False))
        parts.append(part)
    text = "".join(parts)
    return Prompt(text, len(vocab.tokenize(text)), i)


def short_prompt(opener: str, k: int) -> str:
    sentence_ = PROMPTS[k % len(PROMPTS)]
    return f"{opener}, {sentence_[0].lower()}{sentence_[1:]}"


def plan_prompts(vocab: Vocabulary, args: argparse.Namespace, groups: list[int]) -> dict[str, Any]:
    """Every prompt of the run, the same sequence for both servers."""
    openers = Openers(vocab, ["Warm-up: the weather today is"])  # serving.warm_up's prompts
    seed = args.seed

    def long_prompt(tag: str) -> Prompt:
        opener = openers.next()
        return numbered_text(vocab, f"{opener}, here are some notes about a small town.", f"{seed}:{tag}",
                             args.long_tokens)

    plan: dict[str, Any] = {"warmup": {slots: long_prompt(f"warmup{slots}") for slots in groups}, "passes": []}
    for p in range(args.passes):
        one: dict[str, Any] = {}
        if "long1" in args.scenario_list:
            one["long1"] = long_prompt(f"{p}:long1")
        if "long4" in args.scenario_list:
            one["long4"] = [long_prompt(f"{p}:long4:{i}") for i in range(4)]
        if "prefill_beside_decode" in args.scenario_list:
            one["decode_prompts"] = [short_prompt(openers.next(), 7 * p + i) for i in range(args.decode_streams)]
            one["newcomer"] = long_prompt(f"{p}:newcomer")
        if "shared_prefix" in args.scenario_list:
            opener = openers.next()
            system = numbered_text(vocab, f"{opener}, you answer questions about the notes below. Notes:",
                                   f"{seed}:{p}:system", args.system_tokens)
            rng = random.Random(f"{seed}:{p}:questions")
            one["system"] = system
            one["questions"] = [SHORT_QUESTION.format(q=q + 1, note=rng.randint(1, max(1, system.notes)),
                                                      noun=rng.choice(NOUNS))
                                for q in range(args.clients * args.per_client)]
        plan["passes"].append(one)
    # the promise above, checked: completion prompts share at most BOS
    texts = [p.text for p in plan["warmup"].values()]
    for one in plan["passes"]:
        texts += [one["long1"].text] if "long1" in one else []
        texts += [p.text for p in one.get("long4", [])] + list(one.get("decode_prompts", []))
        texts += [one["newcomer"].text] if "newcomer" in one else []
        texts += [one["system"].text] if "system" in one else []
    firsts = [vocab.first_token(t) for t in texts]
    if len(set(firsts)) < len(firsts):
        raise RuntimeError("two prompts share more than BOS; this is a bug in plan_prompts")
    plan["max_shared_prefix_tokens"] = vocab.n_leading
    return plan


# -- one request's body, and waiting for a server to settle -------------------------------------

def body(server: Server, max_tokens: int, *, prompt: str | None = None,
         messages: list[dict[str, str]] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"model": CORRAL_MODEL if server.name == "corral" else "default",
                           "max_tokens": max_tokens, "temperature": 0, "repeat_penalty": 1.0, "ignore_eos": True,
                           "stream": True, "stream_options": {"include_usage": True}}
    if messages is not None:
        out["messages"] = messages
    else:
        out["prompt"] = prompt
    if server.name == "corral":
        out["cache"] = False  # corral's response cache: neither read nor fill it
    return out


def url(server: Server, chat: bool = False) -> str:
    return server.base + ("/v1/chat/completions" if chat else "/v1/completions")


def client(request_timeout: float, connections: int = 16) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    return httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(request_timeout, connect=10))


def wait_idle(server: Server, timeout: float = 20.0) -> dict[str, Any] | None:
    """Wait until the server has nothing running or queued (cancelled streams end a little
    after their clients leave): corral's /api/ps, llama-server's /slots."""
    deadline = time.perf_counter() + timeout
    while True:
        if server.name == "corral":
            state = corral_model_state(server)
            idle = not state or "error" in state or not (state["active"] or state["queued"] or state["in_flight"])
        else:
            try:
                slots = httpx.get(server.base + "/slots", timeout=5).json()
                state = {"busy_slots": sum(1 for s in slots if s.get("is_processing"))}
            except Exception as exc:
                return {"error": f"{type(exc).__name__}: {exc}"}
            idle = state["busy_slots"] == 0
        if idle or time.perf_counter() > deadline:
            return state
        time.sleep(0.2)


def rec_json(rec: Record) -> dict[str, Any]:
    usage = rec.usage or {}
    timings = rec.timings or {}
    return {"ok": rec.ok, "error": rec.error, "ttft_s": rec.ttft, "latency_s": rec.latency,
            "chunks": rec.pieces, "finish_reason": rec.finish_reason,
            "prompt_tokens": usage.get("prompt_tokens"), "completion_tokens": usage.get("completion_tokens"),
            "cached_tokens": (usage.get("prompt_tokens_details") or {}).get("cached_tokens"),
            "timings": {k: timings[k] for k in ("cache_n", "prompt_n", "prompt_ms", "predicted_n") if k in timings}
            or None}


# -- scenarios: one pass on one server -> raw figures --------------------------------------------

async def run_long1(server: Server, one: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    async with client(args.request_timeout) as c:
        rec = await one_request(c, url(server), body(server, args.long_max_tokens, prompt=one["long1"].text),
                                args.request_timeout)
    return {"records": [rec_json(rec)], "wall_s": rec.latency, "ttft_s": rec.ttft,
            "prompt_tokens": one["long1"].tokens}


async def run_long4(server: Server, one: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    async with client(args.request_timeout) as c:
        started = time.perf_counter()
        recs = await asyncio.gather(*(one_request(c, url(server), body(server, args.long_max_tokens, prompt=p.text),
                                                  args.request_timeout) for p in one["long4"]))
        wall = time.perf_counter() - started
    return {"records": [rec_json(r) for r in recs], "wall_s": wall if all(r.ok for r in recs) else None,
            "ttfts_s": [r.ttft for r in recs], "prompt_tokens": [p.tokens for p in one["long4"]]}


def gaps_within(times: list[float], start: float, end: float, cut: float) -> list[float]:
    """Gaps between consecutive chunks that overlap [start, end]; a stream whose last chunk came
    before `end` and that got nothing more until `cut` adds that open gap (a lower bound)."""
    gaps = [b - a for a, b in zip(times, times[1:]) if b > start and a < end]
    if times and times[-1] < end:
        gaps.append(cut - times[-1])
    return gaps


async def run_prefill_beside_decode(server: Server, one: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    n = len(one["decode_prompts"])
    recs = [Record() for _ in range(n)]
    out: dict[str, Any] = {"decode_streams": n, "prompt_tokens": one["newcomer"].tokens}
    async with client(args.request_timeout, connections=n + 8) as c:
        tasks = [asyncio.create_task(one_request(c, url(server), body(server, args.decode_max_tokens, prompt=p),
                                                 args.request_timeout, rec))
                 for p, rec in zip(one["decode_prompts"], recs)]
        try:
            deadline = time.perf_counter() + args.request_timeout

            async def until(ready: Callable[[], bool], what: str) -> bool:
                while not ready():
                    if time.perf_counter() > deadline or any(t.done() for t in tasks):
                        out["error"] = f"the decode streams did not {what}: " + "; ".join(
                            str(r.error) for r in recs if r.error)[:300]
                        return False
                    await asyncio.sleep(0.01)
                return True

            if not await until(lambda: all(r.times for r in recs), "all start"):
                return out
            streaming = time.perf_counter()
            # steady decoding first, for the "before" figures
            counts = [len(r.times) for r in recs]
            if not await until(lambda: all(len(r.times) >= c + args.baseline_tokens for r, c in zip(recs, counts)),
                               f"each get {args.baseline_tokens} more tokens"):
                return out
            newcomer = await one_request(c, url(server), body(server, args.long_max_tokens,
                                                              prompt=one["newcomer"].text), args.request_timeout)
            await asyncio.sleep(0.3)
            cut = time.perf_counter()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    out["newcomer"] = rec_json(newcomer)
    if newcomer.ttft is None or newcomer.started is None:
        out["error"] = f"the newcomer got no token: {newcomer.error}"
        return out
    arrival, first = newcomer.started, newcomer.started + newcomer.ttft
    out["ttft_s"] = newcomer.ttft
    out["gaps_s"] = [g for r in recs for g in gaps_within(r.times, arrival, first, cut)]
    out["baseline_gaps_s"] = [b - a for r in recs for a, b in zip(r.times, r.times[1:])
                              if a >= streaming and b <= arrival]
    during = sum(1 for r in recs for t in r.times if arrival < t <= first)
    before = sum(1 for r in recs for t in r.times if streaming <= t <= arrival)
    out["decode_chunks_per_s_during"] = during / (first - arrival) if first > arrival else None
    out["decode_chunks_per_s_before"] = before / (arrival - streaming) if arrival > streaming else None
    out["streams_ended_early"] = sum(1 for r in recs if r.finish_reason is not None and r.times
                                     and r.times[-1] < first)
    out["stream_errors"] = [r.error for r in recs if r.error and "Cancelled" not in r.error][:5]
    return out


async def run_shared_prefix(server: Server, one: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    system = one["system"].text
    questions = one["questions"]
    records: list[Record] = []
    async with client(args.request_timeout, connections=args.clients + 8) as c:
        started = time.perf_counter()

        async def worker(i: int) -> None:
            for j in range(args.per_client):
                messages = [{"role": "system", "content": system},
                            {"role": "user", "content": questions[i * args.per_client + j]}]
                records.append(await one_request(c, url(server, chat=True),
                                                 body(server, args.chat_max_tokens, messages=messages),
                                                 args.request_timeout))

        await asyncio.gather(*(worker(i) for i in range(args.clients)))
        wall = time.perf_counter() - started
    return {"records": [rec_json(r) for r in records], "wall_s": wall, "ttfts_s": [r.ttft for r in records],
            "system_tokens": one["system"].tokens}


RUNNERS: dict[str, Callable[[Server, dict[str, Any], argparse.Namespace], Awaitable[dict[str, Any]]]] = {
    "long1": run_long1, "long4": run_long4, "prefill_beside_decode": run_prefill_beside_decode,
    "shared_prefix": run_shared_prefix}


def measure(servers: list[Server], server: Server, scenario: str, one: dict[str, Any],
            args: argparse.Namespace) -> dict[str, Any]:
    """One scenario on one server, with the CPU that the servers, this client and everything
    else on the machine used meanwhile (serving.py's accounting)."""
    cpu_before = {s.name: s.cpu_seconds() for s in servers}
    client_before, busy_before = time.process_time(), machine_busy_seconds()
    started = time.perf_counter()
    raw = asyncio.run(RUNNERS[scenario](server, one, args))
    wall = time.perf_counter() - started
    cpu = {s.name: s.cpu_seconds() - cpu_before[s.name] for s in servers}
    client_cpu = time.process_time() - client_before
    foreign = max(0.0, machine_busy_seconds() - busy_before - sum(cpu.values()) - client_cpu)
    raw.update({"measured_s": round(wall, 3), "server_cpu_s": round(cpu[server.name], 2),
                "idle_server_cpu_s": {k: round(v, 2) for k, v in cpu.items() if k != server.name},
                "client_cpu_s": round(client_cpu, 2), "foreign_cpu_cores": round(foreign / wall, 3)})
    raw["after"] = wait_idle(server)
    if server.proc and server.proc.poll() is not None:
        log(f"{server.name} DIED during {scenario} (exit {server.proc.returncode}):\n{server.log_tail()}")
        raw["error"] = f"server exited with {server.proc.returncode}"
    return raw


# -- summaries ---------------------------------------------------------------------------------

def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def _median(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _errors(passes: list[dict[str, Any]]) -> int:
    n = 0
    for raw in passes:
        n += sum(1 for r in raw.get("records", []) if not r["ok"]) + (1 if raw.get("error") else 0)
        n += len(raw.get("stream_errors", [])) + (0 if raw.get("newcomer", {"ok": True})["ok"] else 1)
    return n


def summarize(scenario: str, passes: list[dict[str, Any]]) -> dict[str, Any]:
    """Figures over the passes in `passes`: medians of per-pass figures, percentiles of pooled ones."""
    out: dict[str, Any] = {"errors": _errors(passes)}
    if scenario == "long1":
        out.update(wall_ms=_ms(_median([p.get("wall_s") for p in passes])),
                   ttft_ms=_ms(_median([p.get("ttft_s") for p in passes])),
                   prefill_tok_s=_round(_median([p["prompt_tokens"] / p["ttft_s"] for p in passes if p.get("ttft_s")])))
    elif scenario == "long4":
        ttfts = [t for p in passes for t in p.get("ttfts_s", []) if t is not None]
        out.update(wall_ms=_ms(_median([p.get("wall_s") for p in passes])), ttft_p50_ms=_ms(percentile(ttfts, 50)),
                   ttft_max_ms=_ms(max(ttfts, default=None)),
                   prefill_tok_s=_round(_median([sum(p["prompt_tokens"]) / p["wall_s"] for p in passes
                                                 if p.get("wall_s")])))
    elif scenario == "prefill_beside_decode":
        gaps = [g for p in passes for g in p.get("gaps_s", [])]
        base = [g for p in passes for g in p.get("baseline_gaps_s", [])]
        out.update(newcomer_ttft_ms=_ms(_median([p.get("ttft_s") for p in passes])),
                   gap_p50_ms=_ms(percentile(gaps, 50)), gap_p99_ms=_ms(percentile(gaps, 99)),
                   gap_max_ms=_ms(max(gaps, default=None)), gap_p50_before_ms=_ms(percentile(base, 50)),
                   decode_tok_s_before=_round(_median([p.get("decode_chunks_per_s_before") for p in passes])),
                   decode_tok_s_during=_round(_median([p.get("decode_chunks_per_s_during") for p in passes])),
                   streams_ended_early=sum(p.get("streams_ended_early", 0) for p in passes))
    elif scenario == "shared_prefix":
        records = [r for p in passes for r in p.get("records", [])]
        ttfts = [r["ttft_s"] for r in records if r["ok"] and r["ttft_s"] is not None]
        cached = [r["cached_tokens"] for r in records if r["cached_tokens"] is not None]
        cache_n = [r["timings"]["cache_n"] for r in records if r["timings"] and "cache_n" in r["timings"]]
        prompt = [r["prompt_tokens"] for r in records if r["prompt_tokens"] is not None]
        out.update(ttft_p50_ms=_ms(percentile(ttfts, 50)), ttft_p90_ms=_ms(percentile(ttfts, 90)),
                   wall_ms=_ms(_median([p.get("wall_s") for p in passes])),
                   requests=len(records), prompt_tokens=sum(prompt) if prompt else None,
                   prompt_tokens_per_request=round(sum(prompt) / len(prompt), 1) if prompt else None,
                   cached_tokens=sum(cached) if cached else None,
                   cache_n=sum(cache_n) if cache_n else None)
    return out


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


# -- the table ---------------------------------------------------------------------------------

METRICS: dict[str, list[tuple[str, str, str]]] = {  # (label, key, format)
    "long1": [("wall ms", "wall_ms", ".0f"), ("TTFT ms", "ttft_ms", ".0f"),
              ("prefill tok/s (prompt / TTFT)", "prefill_tok_s", ".0f"), ("errors", "errors", "d")],
    "long4": [("wall ms (all four done)", "wall_ms", ".0f"), ("TTFT p50 ms", "ttft_p50_ms", ".0f"),
              ("TTFT max ms", "ttft_max_ms", ".0f"), ("prefill tok/s (4 prompts / wall)", "prefill_tok_s", ".0f"),
              ("errors", "errors", "d")],
    "prefill_beside_decode": [
        ("newcomer TTFT ms", "newcomer_ttft_ms", ".0f"), ("gap p50 ms during its prefill", "gap_p50_ms", ".0f"),
        ("gap p99 ms during its prefill", "gap_p99_ms", ".0f"), ("gap max ms during its prefill", "gap_max_ms", ".0f"),
        ("gap p50 ms before it came", "gap_p50_before_ms", ".0f"),
        ("decode tok/s before (all streams)", "decode_tok_s_before", ".1f"),
        ("decode tok/s during its prefill", "decode_tok_s_during", ".1f"),
        ("streams that ended too early", "streams_ended_early", "d"), ("errors", "errors", "d")],
    "shared_prefix": [("TTFT p50 ms", "ttft_p50_ms", ".0f"), ("TTFT p90 ms", "ttft_p90_ms", ".0f"),
                      ("wall ms (all requests)", "wall_ms", ".0f"), ("requests", "requests", "d"),
                      ("prompt tokens per request", "prompt_tokens_per_request", ".1f"),
                      ("cached prompt tokens (usage), sum", "cached_tokens", "d"),
                      ("timings.cache_n, sum", "cache_n", "d"), ("errors", "errors", "d")],
}
HEADLINE = {"long1": "ttft_ms", "long4": "wall_ms", "prefill_beside_decode": "gap_p99_ms",
            "shared_prefix": "ttft_p50_ms"}


def describe(scenario: str, args: argparse.Namespace, plan: dict[str, Any]) -> str:
    first = plan["passes"][0]
    if scenario == "long1":
        return f"one {first['long1'].tokens:,}-token prompt, max_tokens {args.long_max_tokens}"
    if scenario == "long4":
        return (f"four prompts of {min(p.tokens for p in first['long4']):,}-{max(p.tokens for p in first['long4']):,}"
                f" tokens at once, max_tokens {args.long_max_tokens}")
    if scenario == "prefill_beside_decode":
        return (f"{args.decode_streams} streams decoding, then a {first['newcomer'].tokens:,}-token prompt arrives; "
                f"gaps = the running streams' inter-token gaps from its arrival to its first token")
    return (f"{args.clients} clients x {args.per_client} chat requests, a {first['system'].tokens:,}-token shared "
            f"system prompt + a short question each, max_tokens {args.chat_max_tokens}")


def render(results: dict[str, Any], args: argparse.Namespace, plan: dict[str, Any]) -> str:
    lines = []
    for scenario in args.scenario_list:
        res = results.get(scenario)
        if not res:
            continue
        slots = args.wide_slots if scenario in WIDE else args.slots
        lines.append(f"{scenario} ({slots} slots): {describe(scenario, args, plan)}")
        names = [n + ("!" if res[n]["disturbed"] else "") for n in SERVERS]
        header = f"  {'metric':<36} {names[0]:>10} {names[1]:>13} {'corral/llama-server':>20}"
        lines += [header, "  " + "-" * (len(header) - 2)]
        for label, key, spec in METRICS[scenario]:
            a, b = res["corral"]["summary"].get(key), res["llama-server"]["summary"].get(key)
            r = ratio(a, b) if key not in ("errors", "requests", "streams_ended_early") else None
            lines.append(f"  {label:<36} {fmt(a, spec):>10} {fmt(b, spec):>13} "
                         f"{'' if r is None else f'{r:.2f}x':>20}")
        if args.passes > 1:
            key = HEADLINE[scenario]
            per = []
            for name in SERVERS:
                used = set(res[name]["passes_used"])
                per.append(f"{name} " + " / ".join(
                    fmt(summarize(scenario, [raw])[key], ".0f") + ("" if i + 1 in used else "*")
                    for i, raw in enumerate(res[name]["passes"])))
            lines.append(f"  {key} per pass: " + ", ".join(per))
        lines.append("")
    lines.append("times in ms; ratios corral / llama-server: for times < 1 means corral is faster, for tok/s and "
                 "cached tokens > 1 means corral has more; figures pool the passes (medians of per-pass walls "
                 "and TTFTs, percentiles of pooled gaps)")
    lines.append("a pass marked * was left out because other processes used the CPU during it; "
                 "! after a server = every pass was disturbed")
    return "\n".join(lines)


# -- main --------------------------------------------------------------------------------------

def chat_template_args(vocab: Vocabulary, workdir: Path) -> tuple[str, ...]:
    """A GGUF without a chat template gets chatml from llama-server but a fallback by
    architecture from corral (gemma's for the default model): hand llama-server corral's
    template, so both evaluate the same chat prompt."""
    if vocab.meta("tokenizer.chat_template"):
        return ()
    try:
        from corral.backend.chat import ARCHITECTURE_FALLBACK, BUILTIN_TEMPLATES, DEFAULT_FALLBACK
    except Exception as exc:  # corral's chat module being edited: say so and go on
        log(f"cannot read corral's chat templates ({type(exc).__name__}: {exc}); llama-server keeps its own")
        return ()
    name = ARCHITECTURE_FALLBACK.get(vocab.meta("general.architecture") or "", DEFAULT_FALLBACK)
    path = workdir / f"chat-template-{name}.jinja"
    path.write_text(BUILTIN_TEMPLATES[name])
    return ("--chat-template-file", str(path))


def decode_ceiling(threads: int) -> dict[str, Any]:
    """ceiling.py's bare llama_decode loop at 1 and 8 streams (tok/s), in this process."""
    try:
        from corral.backend.weights import ModelWeights

        from .ceiling import decode_only, on_a_passing_thread

        weights = ModelWeights(str(default_model_path()))
        try:
            return {f"{n}_streams_tok_s": round(on_a_passing_thread(decode_only, weights, n, threads), 1)
                    for n in (1, 8)}
        finally:
            weights.release()
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}"[:300]}


def _prompt_json(value: Any) -> Any:
    if isinstance(value, Prompt):
        return {"tokens": value.tokens, "start": value.text[:80]}
    if isinstance(value, list):
        return [_prompt_json(v) for v in value]
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.benchmarks.long_prompts", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="write the tables, settings and raw figures here as JSON")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"comma-separated subset of "
                        f"{','.join(SCENARIOS)} (default: all)")
    parser.add_argument("--quick", action="store_true",
                        help="~800-token prompts, fewer requests: checks the script itself")
    parser.add_argument("--passes", type=int, default=1,
                        help="rounds over all scenarios (server order rotates); figures pool the passes")
    parser.add_argument("--max-foreign", type=float, default=0.15, metavar="CORES",
                        help="a pass that saw more CPU than this (in cores) used by other processes is left "
                             "out of the pooled figures when a cleaner pass exists (default: 0.15)")
    parser.add_argument("--long-tokens", type=int, help="tokens of a long prompt (default 4400, --quick 800)")
    parser.add_argument("--system-tokens", type=int,
                        help="tokens of shared_prefix's system prompt (default 1500, --quick 400)")
    parser.add_argument("--long-max-tokens", type=int, default=4, help="max_tokens of a long prompt (default 4)")
    parser.add_argument("--decode-streams", type=int, default=7)
    parser.add_argument("--decode-max-tokens", type=int,
                        help="max_tokens of the decoding streams, cancelled once the newcomer is done "
                             "(default 512, --quick 256)")
    parser.add_argument("--baseline-tokens", type=int,
                        help="tokens each decoding stream gets, once all stream, before the newcomer is sent "
                             "(default 16, --quick 6)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--per-client", type=int, help="shared_prefix requests per client (default 4, --quick 2)")
    parser.add_argument("--chat-max-tokens", type=int, default=8)
    parser.add_argument("--request-timeout", type=float, default=300.0)
    parser.add_argument("--seed", default="corral", help="seeds the generated text")
    parser.add_argument("--slots", type=int, default=4, help="slots for long1 and long4 (default 4)")
    parser.add_argument("--wide-slots", type=int, default=8,
                        help="slots for prefill_beside_decode and shared_prefix (default 8)")
    parser.add_argument("--n-ctx", type=int, default=32768)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--n-batch", type=int, default=512)
    parser.add_argument("--no-ceiling", action="store_true", help="skip the decode ceiling reference")
    parser.add_argument("--cache", type=Path,
                        default=Path(os.environ.get("CORRAL_BENCH_CACHE", "~/.cache/corral-bench")).expanduser())
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 2, help="llama-server build parallelism")
    parser.add_argument("--keep-logs", type=Path, help="copy the servers' logs into this folder")
    args = parser.parse_args(argv)
    defaults = {"long_tokens": (4400, 800), "system_tokens": (1500, 400), "decode_max_tokens": (512, 256),
                "baseline_tokens": (16, 6), "per_client": (4, 2)}
    for name, (full, quick) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    args.scenario_list = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = set(args.scenario_list) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenario(s) {', '.join(sorted(unknown))}; choose from {', '.join(SCENARIOS)}")
    if args.decode_streams + 1 > args.wide_slots:
        parser.error("prefill_beside_decode needs --wide-slots >= --decode-streams + 1")
    signal.signal(signal.SIGTERM, _terminate)

    version = llama_cpp_version()
    llama_server, build = ensure_llama_server(args.cache, version, args.jobs)
    build["version_line"] = version_line(llama_server)
    model = default_model_path()
    log(f"model: {model}")
    groups = sorted({args.wide_slots if s in WIDE else args.slots for s in args.scenario_list})
    vocab = Vocabulary(model)
    results: dict[str, Any] = {}
    commands: dict[str, Any] = {}
    startup: dict[str, Any] = {}
    raw: dict[tuple[str, str], list[dict[str, Any]]] = {}
    run_started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="corral-long-") as tmp:
        workdir = Path(tmp)
        try:
            plan = plan_prompts(vocab, args, groups)
            extra = chat_template_args(vocab, workdir)
        finally:
            vocab.close()
        log(f"prompts ready: a long one has {plan['warmup'][groups[0]].tokens} tokens")
        for slots in groups:
            scenarios = [s for s in args.scenario_list if (args.wide_slots if s in WIDE else args.slots) == slots]
            with contextlib.ExitStack() as stack:
                folder = workdir / f"slots{slots}"
                folder.mkdir()
                servers = make_servers(list(SERVERS), model, llama_server, folder, slots, args.n_ctx, args.threads,
                                       args.n_batch, llama_server_extra=extra)
                commands[f"{slots}_slots"] = {s.name: s.argv for s in servers}
                group = startup.setdefault(f"{slots}_slots", {})
                start_all(stack, servers, group, args.keep_logs, log_prefix=f"{slots}slots-")
                for server in servers:
                    figures = group.setdefault(server.name, {})
                    figures.update(ready_and_warm(server, slots, args.request_timeout))
                    started = time.perf_counter()
                    long_warm = asyncio.run(run_long1(server, {"long1": plan["warmup"][slots]}, args))
                    if not long_warm["records"][0]["ok"]:
                        raise RuntimeError(f"{server.name}: the long warm-up failed: "
                                           f"{long_warm['records'][0]['error']}")
                    wait_idle(server)
                    figures.update(warmup_s=round(figures["warmup_s"] + time.perf_counter() - started, 1),
                                   rss_bytes_after_warmup=server.rss_bytes())
                    log(f"{server.name} ({slots} slots) ready ({figures['ready_s']:.1f} s) and warmed up "
                        f"on port {server.port}")
                for p in range(args.passes):
                    for scenario in scenarios:
                        shift = (SCENARIOS.index(scenario) + p) % len(servers)
                        for server in servers[shift:] + servers[:shift]:
                            figures = measure(servers, server, scenario, plan["passes"][p], args)
                            raw.setdefault((scenario, server.name), []).append(figures)
                            s = summarize(scenario, [figures])
                            log(f"pass {p + 1}/{args.passes} {scenario:<22} {server.name:<13} "
                                + "  ".join(f"{k} {v}" for k, v in s.items() if v is not None)
                                + f"  other processes {figures['foreign_cpu_cores']} cores")
                for server in servers:
                    startup[f"{slots}_slots"][server.name]["rss_bytes_end"] = server.rss_bytes()
    measured_s = time.perf_counter() - run_started

    for (scenario, name), passes in raw.items():
        # as in serving.py: pool only the passes other processes left alone, when there are any
        clean = [p for p in passes if p["foreign_cpu_cores"] <= args.max_foreign]
        used = clean or passes
        results.setdefault(scenario, {})[name] = {
            "summary": summarize(scenario, used), "passes": passes, "disturbed": not clean,
            "passes_used": [i + 1 for i, p in enumerate(passes) if any(p is u for u in used)]}
    for scenario, res in results.items():
        res["ratios"] = {k: ratio(v, res["llama-server"]["summary"].get(k))
                         for k, v in res["corral"]["summary"].items() if isinstance(v, (int, float))}

    ceiling = {"skipped": True} if args.no_ceiling else decode_ceiling(args.threads)
    table = render(results, args, plan)
    print(table)
    if "error" in ceiling:
        print(f"decode ceiling: not measured ({ceiling['error']})")
    elif not args.no_ceiling:
        print(f"decode ceiling (ceiling.py's bare llama_decode loop, no server, 64 greedy tokens): "
              f"{ceiling['1_streams_tok_s']} tok/s at 1 stream, {ceiling['8_streams_tok_s']} tok/s at 8")
    print(f"\nmachine: {machine_info()['cpu']}, {os.cpu_count()} logical CPUs; llama-cpp-python {version}; "
          f"llama-server {build.get('version_line', '-')}; measured in {measured_s:.0f} s")
    if args.json:
        settings = {k: v for k, v in vars(args).items() if k not in ("json", "cache", "keep_logs")}
        settings.update(model=str(model), temperature=0, repeat_penalty=1.0, ignore_eos=True,
                        corral_cache=False, llama_server_extra=list(extra))
        prompts = [{"pass": i + 1, **{k: _prompt_json(v) for k, v in one.items()}}
                   for i, one in enumerate(plan["passes"])]
        report = {"machine": machine_info(), "settings": settings, "commands": commands,
                  "llama_server_build": build, "startup": startup, "results": results, "ceiling": ceiling,
                  "prompts": prompts, "max_shared_prefix_tokens": plan["max_shared_prefix_tokens"],
                  "table": table, "measured_seconds": round(measured_s, 1)}
        write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
