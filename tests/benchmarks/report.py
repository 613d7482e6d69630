"""The figures of a benchmark run: what each request and each step recorded, percentiles,
the corral / peer ratios, the targets, the printed table, and facts about the machine. Shared
by serving.py, long_prompts.py and gpu_serving.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .peers import llama_cpp_version, log

SERVERS = ("corral", "llama-server", "llama_cpp.server")
PEERS = ("llama-server", "llama_cpp.server")


@dataclass
class Record:
    ok: bool = False
    error: str | None = None
    ttft: float | None = None
    latency: float | None = None
    pieces: int = 0  # chunks carrying text
    usage_tokens: int | None = None  # completion_tokens from the stream's usage, when sent
    finish_reason: str | None = None
    max_gap: float = 0.0  # longest pause between two text chunks
    text: str = ""
    started: float | None = None  # perf_counter() when the request was sent
    times: list[float] = field(default_factory=list)  # perf_counter() of each chunk carrying text
    usage: dict[str, Any] | None = None  # the stream's last usage object, as sent
    timings: dict[str, Any] | None = None  # llama-server's `timings` (cache_n, prompt_n, ...), when sent

    @property
    def tokens(self) -> int:
        return self.usage_tokens if self.usage_tokens is not None else self.pieces


@dataclass
class Step:
    server: str
    concurrency: int
    requests: int
    wall_s: float
    records: list[Record] = field(default_factory=list)
    prompt_tokens: int = 0  # the level's long-prompt size; 0: short prompts
    server_cpu_s: float = 0.0
    client_cpu_s: float = 0.0
    idle_cpu_s: dict[str, float] = field(default_factory=dict)
    foreign_cpu_s: float = 0.0  # CPU used on the machine by processes other than ours
    after: dict[str, Any] | None = None  # corral only: /api/ps of the model after the step


# -- statistics and reporting ------------------------------------------------------------------

def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (q in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    pos = (len(ordered) - 1) * q / 100.0
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def merge_steps(parts: list[Step]) -> Step:
    """Several passes of one (server, concurrency) as one step: records pooled, walls added."""
    merged = Step(parts[0].server, parts[0].concurrency, sum(p.requests for p in parts),
                  sum(p.wall_s for p in parts), [r for p in parts for r in p.records], parts[0].prompt_tokens)
    merged.server_cpu_s = sum(p.server_cpu_s for p in parts)
    merged.client_cpu_s = sum(p.client_cpu_s for p in parts)
    merged.foreign_cpu_s = sum(p.foreign_cpu_s for p in parts)
    for part in parts:
        for name, cpu in part.idle_cpu_s.items():
            merged.idle_cpu_s[name] = merged.idle_cpu_s.get(name, 0.0) + cpu
    return merged


def summarize(step: Step, max_tokens: int) -> dict[str, Any]:
    recs = step.records
    ok = [r for r in recs if r.ok]
    tokens = sum(r.tokens for r in recs)
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    # latency of a whole response: streams that delivered all max_tokens only
    lats = [r.latency for r in ok if r.latency is not None and r.tokens >= max_tokens]
    errors = [r.error for r in recs if not r.ok]
    short = [r for r in ok if r.tokens < max_tokens]
    ms = lambda v: None if v is None else round(v * 1000, 1)  # noqa: E731
    prompts = [r.usage["prompt_tokens"] for r in ok if r.usage and r.usage.get("prompt_tokens") is not None]
    return {
        "server": step.server,
        "level": f"{step.concurrency}x{step.prompt_tokens}" if step.prompt_tokens else str(step.concurrency),
        "concurrency": step.concurrency,
        "prompt_tokens_level": step.prompt_tokens,
        "prompt_tokens_mean": round(sum(prompts) / len(prompts)) if prompts else None,
        "requests": step.requests,
        "wall_s": round(step.wall_s, 3),
        "tok_s": round(tokens / step.wall_s, 2) if step.wall_s > 0 else None,
        "tokens_received": tokens,
        "tokens_expected": step.requests * max_tokens,
        "token_source": "usage" if recs and all(r.usage_tokens is not None for r in ok) else "chunks",
        "ttft_p50_ms": ms(percentile(ttfts, 50)),
        "ttft_p99_ms": ms(percentile(ttfts, 99)),
        "latency_p50_ms": ms(percentile(lats, 50)),
        "latency_p99_ms": ms(percentile(lats, 99)),
        "full_streams": sum(1 for r in ok if r.tokens >= max_tokens),
        "max_gap_ms": ms(max((r.max_gap for r in ok), default=0.0)),
        "errors": len(errors),
        "error_samples": sorted(set(errors))[:5],
        "short_streams": len(short),
        "finish_reasons": {reason: sum(1 for r in ok if r.finish_reason == reason)
                           for reason in sorted({str(r.finish_reason) for r in ok})},
        "server_cpu_s": round(step.server_cpu_s, 2),
        "client_cpu_s": round(step.client_cpu_s, 2),
        "foreign_cpu_cores": round(step.foreign_cpu_s / step.wall_s, 3) if step.wall_s > 0 else None,
        "idle_servers_cpu_s": {k: round(v, 2) for k, v in step.idle_cpu_s.items()},
        "after": step.after,
    }


def text_agreement(texts: dict[str, list[str]]) -> dict[str, dict[str, int]]:
    """At concurrency 1 every server decodes one sequence greedily: the texts should agree."""
    mine = texts.get("corral")
    out = {}
    for peer in PEERS:
        theirs = texts.get(peer)
        if not mine or not theirs:
            continue
        pairs = list(zip(mine, theirs))
        out[peer] = {"compared": len(pairs), "identical": sum(a == b for a, b in pairs),
                     "same_first_32_chars": sum(a[:32] == b[:32] for a, b in pairs)}
    return out


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return round(a / b, 3)


def level_order(row: dict[str, Any]) -> tuple[int, int]:
    return row.get("prompt_tokens_level", 0), row["concurrency"]


def build_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by = {(r["server"], r["level"]): r for r in rows}
    out = []
    for corral in sorted((r for r in rows if r["server"] == "corral"), key=level_order):
        for peer in PEERS:
            other = by.get((peer, corral["level"]))
            if other is None:
                continue
            out.append({"level": corral["level"], "concurrency": corral["concurrency"], "peer": peer,
                        "tok_s_ratio": ratio(corral["tok_s"], other["tok_s"]),
                        "ttft_p50_ratio": ratio(corral["ttft_p50_ms"], other["ttft_p50_ms"]),
                        "latency_p50_ratio": ratio(corral["latency_p50_ms"], other["latency_p50_ms"]),
                        # the same ratios pass by pass (empty for a single pass): how steady they are
                        "tok_s_ratio_per_pass": [ratio(a["tok_s"], b["tok_s"]) for a, b in
                                                 zip(corral.get("passes", []), other.get("passes", []))],
                        "ttft_p50_ratio_per_pass": [ratio(a["ttft_p50_ms"], b["ttft_p50_ms"]) for a, b in
                                                    zip(corral.get("passes", []), other.get("passes", []))]})
    return out


def check_targets(ratios: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by = {(r["peer"], r["level"]): r for r in ratios}
    targets = [
        ("aggregate tok/s at c8 vs llama-server", ("llama-server", "8"), "tok_s_ratio", ">=", 1.15),
        ("aggregate tok/s at c8 vs llama_cpp.server", ("llama_cpp.server", "8"), "tok_s_ratio", ">=", 4.0),
        ("single stream tok/s vs llama-server", ("llama-server", "1"), "tok_s_ratio", ">=", 0.95),
        ("TTFT p50 at c1 vs llama-server", ("llama-server", "1"), "ttft_p50_ratio", "<=", 1.2),
    ]
    out = []
    for label, key, metric, op, bound in targets:
        value = by.get(key, {}).get(metric)
        met = None if value is None else (value >= bound if op == ">=" else value <= bound)
        out.append({"target": label, "ratio": value, "rule": f"{op} {bound}", "met": met,
                    "per_pass": by.get(key, {}).get(metric + "_per_pass", [])})
    return out


def fmt(value: Any, spec: str = ".1f") -> str:
    if value is None:
        return "-"
    return format(value, spec) if isinstance(value, float) else str(value)


def render_table(rows: list[dict[str, Any]], ratios: list[dict[str, Any]], targets: list[dict[str, Any]]) -> str:
    rmap = {(r["peer"], r["level"]): r for r in ratios}
    header = (f"{'level':>6}  {'server':<16} {'tok/s':>7} {'TTFT p50':>9} {'TTFT p99':>9} {'lat p50':>8} "
              f"{'lat p99':>8} {'err':>4} {'tokens recv/exp':>16} {'short':>5}  "
              f"{'corral/peer tok/s':>17} {'corral/peer TTFT p50':>20} {'tok/s per pass':>16}")
    lines = [header, "-" * len(header)]
    order = {name: i for i, name in enumerate(SERVERS)}
    last_level = None
    for row in sorted(rows, key=lambda r: (level_order(r), order.get(r["server"], 9))):
        if last_level is not None and row["level"] != last_level:
            lines.append("")
        last_level = row["level"]
        r = rmap.get((row["server"], row["level"]), {})
        tok_ratio = f"{r['tok_s_ratio']:.2f}x" if r.get("tok_s_ratio") is not None else ""
        ttft_ratio = f"{r['ttft_p50_ratio']:.2f}x" if r.get("ttft_p50_ratio") is not None else ""
        tokens = f"{row['tokens_received']}/{row['tokens_expected']}"
        used = set(row.get("passes_used") or [])
        per_pass = "/".join(("-" if p["tok_s"] is None else f"{p['tok_s']:.0f}") + ("" if i + 1 in used else "*")
                            for i, p in enumerate(row.get("passes") or []))
        name = row["server"] + ("!" if row.get("disturbed") else "")
        lines.append(
            f"{row['level']:>6}  {name:<16} {fmt(row['tok_s']):>7} "
            f"{fmt(row['ttft_p50_ms'], '.0f'):>9} {fmt(row['ttft_p99_ms'], '.0f'):>9} "
            f"{fmt(row['latency_p50_ms'], '.0f'):>8} {fmt(row['latency_p99_ms'], '.0f'):>8} "
            f"{row['errors']:>4} {tokens:>16} {row['short_streams']:>5}  {tok_ratio:>17} {ttft_ratio:>20} "
            f"{per_pass:>16}")
    lines.append("")
    lines.append("times in ms; tok/s = tokens received / step wall time; short = streams that ended before "
                 "max_tokens; ratios are corral / peer (tok/s: higher is better for corral, TTFT: lower); "
                 "level SxN: S streams of ~N-token prompts")
    for row in rows:
        if row.get("prompt_tokens_level") and row["server"] == "corral" and row.get("prompt_tokens_mean"):
            lines.append(f"level {row['level']}: prompts of {row['prompt_tokens_mean']} tokens on average")
    if any(row.get("passes") for row in rows):
        lines.append("figures pool the passes; a pass marked * in 'tok/s per pass' was left out because other "
                     "processes used the CPU during it; ! = every pass was disturbed")
    if targets:
        lines.append("")
        lines.append("issue 5 targets:")
        for t in targets:
            verdict = {True: "met", False: "NOT met", None: "not measured"}[t["met"]]
            value = "-" if t["ratio"] is None else f"{t['ratio']:.2f}x"
            spread = ""
            if t.get("per_pass"):
                spread = "  per pass: " + ", ".join("-" if v is None else f"{v:.2f}" for v in t["per_pass"])
            lines.append(f"  {t['target']:<44} {value:>7}  (target {t['rule']}x)  {verdict:<8}{spread}")
    return "\n".join(lines)


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine has been busy (all processes), or 0 without psutil."""
    try:
        import psutil

        t = psutil.cpu_times()
        return sum(t) - t.idle - getattr(t, "iowait", 0.0) - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0)
    except Exception:
        return 0.0


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info: dict[str, Any] = {"cpu": cpu, "logical_cpus": os.cpu_count(), "platform": platform.platform(),
                            "python": platform.python_version(), "llama_cpp_python": llama_cpp_version()}
    with contextlib.suppress(Exception):
        import psutil

        info["physical_cores"] = psutil.cpu_count(logical=False)
        info["ram_bytes"] = psutil.virtual_memory().total
    return info


def proc_status_bytes(field: str, pid: int | str = "self") -> int:
    """A size from /proc/<pid>/status in bytes: VmRSS (resident now) or VmHWM (the peak so far)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/{pid}/status has no {field}")


def write_json(path: Path, report: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    log(f"wrote {path}")
