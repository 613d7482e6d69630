"""What a generation request asks for and what it streams back.

Kept apart from the engine so that the console, the server's schemas and the remote backend
can use these types without importing llama.cpp.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import BadRequest

RANDOM_SEED = 0xFFFFFFFF  # llama.cpp's LLAMA_DEFAULT_SEED: draw a random seed

@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling; temperature 0 means greedy and deterministic."""

    max_tokens: int = 256
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def validate(self) -> None:
        checks = [
            (self.max_tokens >= 1, f"max_tokens = {self.max_tokens}: must be at least 1"),
            (0 <= self.temperature <= 100, f"temperature = {self.temperature}: must be between 0 and 100"),
            (0 < self.top_p <= 1, f"top_p = {self.top_p}: must be in (0, 1]"),
            (self.top_k >= 0, f"top_k = {self.top_k}: must be 0 (off) or more"),
            (0 <= self.min_p <= 1, f"min_p = {self.min_p}: must be in [0, 1]"),
            (0 < self.repeat_penalty <= 10, f"repeat_penalty = {self.repeat_penalty}: must be in (0, 10]"),
            (len(self.stop) <= 16, f"stop: at most 16 strings, got {len(self.stop)}"),
            (all(isinstance(s, str) and s for s in self.stop), "stop: every entry must be a non-empty string"),
        ]
        for ok, message in checks:
            if not ok:
                raise BadRequest(message)

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0

    @property
    def deterministic(self) -> bool:
        """Whether the same prompt gives the same text: greedy, or sampling from a fixed seed.

        The engine seeds llama.cpp's sampler with the low 32 bits, and llama.cpp reads
        0xFFFFFFFF (what -1 becomes) as "a random seed", so that seed is not a fixed one."""
        return self.greedy or (self.seed is not None and self.seed & 0xFFFFFFFF != RANDOM_SEED)


@dataclass(frozen=True)
class RequestStats:
    prompt_tokens: int
    completion_tokens: int
    queue_wait_s: float
    ttft_s: float | None
    duration_s: float
    cached_tokens: int = 0  # prompt tokens whose KV was reused from the slot's previous request
    cached: bool = False  # the answer was replayed from the response cache, not decoded

    @property
    def tokens_per_s(self) -> float | None:
        """Decode speed after the first token (TTFT is reported on its own)."""
        if self.ttft_s is None or self.completion_tokens < 2:
            return None
        span = self.duration_s - self.ttft_s
        return (self.completion_tokens - 1) / span if span > 0 else None


@dataclass(frozen=True)
class Embeddings:
    """One vector per input (mean-pooled, L2-normalised) and the tokens the inputs took."""

    vectors: list[list[float]]
    prompt_tokens: int


@dataclass(frozen=True)
class Chunk:
    """A piece of streamed output; the last chunk of a request has `finish_reason` and `stats`."""

    text: str
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
    stats: RequestStats | None = None
    error: str | None = None
    cache: str | None = None  # on a request's first chunk: "hit", "stale", "miss" or "bypass"


SAMPLING_OPTIONS = frozenset(SamplingParams.__dataclass_fields__)
_INTS = frozenset({"max_tokens", "top_k"})
_FLOATS = frozenset({"temperature", "top_p", "min_p", "repeat_penalty"})


def sampling_params(options: dict[str, Any]) -> SamplingParams:
    """Validated sampling parameters from keyword options.

    Unknown names and wrong types are BadRequests naming the option; None means "the
    default" (OpenAI clients send `stop: null` and friends)."""
    unknown = set(options) - SAMPLING_OPTIONS
    if unknown:
        raise BadRequest(f"unknown option(s): {', '.join(sorted(unknown))}; "
                         f"allowed: {', '.join(sorted(SAMPLING_OPTIONS))}")
    values = {name: _checked(name, value) for name, value in options.items() if value is not None}
    params = SamplingParams(**values)
    params.validate()
    return params


def _checked(name: str, value: Any) -> Any:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if name in _INTS and not (isinstance(value, int) and not isinstance(value, bool)):
        raise BadRequest(f"{name} = {value!r}: must be an integer")
    if name in _FLOATS and not number:
        raise BadRequest(f"{name} = {value!r}: must be a number")
    if name == "seed" and not (isinstance(value, int) and not isinstance(value, bool)):
        raise BadRequest(f"seed = {value!r}: must be an integer")
    if name == "ignore_eos" and not isinstance(value, bool):
        raise BadRequest(f"ignore_eos = {value!r}: must be true or false")
    if name == "stop":
        stops = (value,) if isinstance(value, str) else value
        if not isinstance(stops, (list, tuple)) or not all(isinstance(x, str) for x in stops):
            raise BadRequest(f"stop = {value!r}: must be a string or a list of strings")
        return tuple(stops)
    return float(value) if name in _FLOATS else value
