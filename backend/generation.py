"""What a generation request asks for and what it streams back.

Kept apart from the engine so that the console, the server's schemas and the remote backend
can use these types without importing llama.cpp.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, Field

from .errors import BadRequest

RANDOM_SEED = 0xFFFFFFFF  # llama.cpp's LLAMA_DEFAULT_SEED: draw a random seed

MAX_TOKENS = 1 << 20
MAX_STOPS = 16
MAX_STOP_CHARS = 1024


@dataclass(frozen=True)
class Limit:
    """The allowed range of one numeric sampling option: its one definition, read by request
    bodies (pydantic `Field` bounds), config defaults, the Python API and the engine."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    text: str = ""

    def ok(self, value: float) -> bool:
        return ((self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
                and (self.le is None or value <= self.le))

    def field_bounds(self) -> dict[str, float]:
        return {k: v for k, v in (("ge", self.ge), ("gt", self.gt), ("le", self.le)) if v is not None}


LIMITS: dict[str, Limit] = {
    "max_tokens": Limit(ge=1, le=MAX_TOKENS, text=f"must be between 1 and {MAX_TOKENS}"),
    "temperature": Limit(ge=0, le=100, text="must be between 0 and 100"),
    "top_p": Limit(gt=0, le=1, text="must be in (0, 1]"),
    "top_k": Limit(ge=0, le=MAX_TOKENS, text="must be 0 (off) or more"),
    "min_p": Limit(ge=0, le=1, text="must be in [0, 1]"),
    "repeat_penalty": Limit(gt=0, le=10, text="must be in (0, 10]"),
    "dry_multiplier": Limit(ge=0, le=10, text="must be between 0 (off) and 10"),
    "dry_base": Limit(ge=1, le=10, text="must be between 1 and 10"),
    "dry_allowed_length": Limit(ge=1, le=1024, text="must be between 1 and 1024"),
    "dry_penalty_last_n": Limit(ge=0, le=MAX_TOKENS, text="must be 0 (off) or more"),
    "seed": Limit(ge=-(1 << 63), le=(1 << 64) - 1, text="must fit in 64 bits"),
}


# Sampling that keeps a base model from looping. At the console's temperature (0.7) the
# default model (gemma-3-270m, a base model) said a sentence again 3 or more times in 5 of 18
# completions of 200 tokens (33 repeated sentences in all; in an earlier run 7 of 18 and 49,
# one answer being 17 of its 21 sentences again); with these, no sentence came twice
# (tests/benchmarks/sampling_loops.py). They are the prompt screen's defaults, and the API's
# where `[sampling] loop_guard` is on and a request sets none of them.
LOOP_GUARD: dict[str, float | int] = {"repeat_penalty": 1.1, "dry_multiplier": 0.8, "dry_base": 1.75,
                                      "dry_allowed_length": 2, "dry_penalty_last_n": 256}


def bounds(name: str) -> dict[str, float]:
    """`Field(**bounds("top_p"))`: a sampling option's limits as pydantic bounds."""
    return LIMITS[name].field_bounds()


def _stop_list(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


class SamplingFields(BaseModel):
    """The sampling options as request bodies and config defaults take them (None: not set),
    with the limits above; each user adds its own model config (strict bodies, frozen config)."""

    max_tokens: int | None = Field(None, **bounds("max_tokens"))
    temperature: float | None = Field(None, **bounds("temperature"))
    top_p: float | None = Field(None, **bounds("top_p"))
    top_k: int | None = Field(None, **bounds("top_k"))
    min_p: float | None = Field(None, **bounds("min_p"))
    repeat_penalty: float | None = Field(None, **bounds("repeat_penalty"))
    dry_multiplier: float | None = Field(None, **bounds("dry_multiplier"))
    dry_base: float | None = Field(None, **bounds("dry_base"))
    dry_allowed_length: int | None = Field(None, **bounds("dry_allowed_length"))
    dry_penalty_last_n: int | None = Field(None, **bounds("dry_penalty_last_n"))
    seed: int | None = Field(None, **bounds("seed"))
    stop: Annotated[Annotated[list[Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]],
                              Field(max_length=MAX_STOPS)] | None, BeforeValidator(_stop_list)] = None


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling; temperature 0 means greedy and deterministic."""

    max_tokens: int = 256
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    # DRY ("don't repeat yourself", llama.cpp's llama_sampler_init_dry): a token that would
    # extend a run of tokens already seen in the last `dry_penalty_last_n`, longer than
    # `dry_allowed_length`, loses multiplier * base ** (length - allowed) of its logit; a
    # multiplier of 0 leaves it off (llama.cpp's defaults otherwise)
    dry_multiplier: float = 0.0
    dry_base: float = 1.75
    dry_allowed_length: int = 2
    dry_penalty_last_n: int = 64
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def validate(self) -> None:
        for name, limit in LIMITS.items():
            value = getattr(self, name)
            if value is not None and not limit.ok(value):
                raise BadRequest(f"{name} = {value}: {limit.text}")
        if len(self.stop) > MAX_STOPS:
            raise BadRequest(f"stop: at most {MAX_STOPS} strings, got {len(self.stop)}")
        if not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in self.stop):
            raise BadRequest(f"stop: every entry must be a non-empty string of at most {MAX_STOP_CHARS} characters")

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0

    @property
    def penalised(self) -> bool:
        """Whether a penalty looks back at the output (a repetition penalty or DRY)."""
        return self.repeat_penalty != 1.0 or (self.dry_multiplier > 0 and self.dry_penalty_last_n > 0)

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
    stop_sequence: str | None = None  # the stop string that ended the answer (finish reason "stop")

    @property
    def tokens_per_s(self) -> float | None:
        """Decode speed after the first token (TTFT is reported on its own)."""
        if self.ttft_s is None or self.completion_tokens < 2:
            return None
        span = self.duration_s - self.ttft_s
        return (self.completion_tokens - 1) / span if span > 0 else None


@dataclass(frozen=True)
class Embeddings:
    """One vector per input (pooled as the GGUF declares, L2-normalised) and the tokens the inputs took."""

    vectors: list[list[float]]
    prompt_tokens: int


@dataclass(frozen=True)
class Ranked:
    """One document's place in a reranking: its index in the request and the reranker's score."""

    index: int
    relevance_score: float


@dataclass(frozen=True)
class Reranking:
    """Documents by relevance to a query, highest score first, cut to the `top_n` asked for;
    `prompt_tokens` counts every pair the reranker read, kept or cut."""

    results: list[Ranked]
    prompt_tokens: int


@dataclass(frozen=True)
class ToolCallDelta:
    """A piece of one tool call as it streams: the first piece of a call carries its `id` and
    `name`, later ones only more of the `arguments` JSON text (OpenAI's delta shape, which
    every dialect can regroup)."""

    index: int  # the call's position among the answer's calls
    id: str | None = None
    name: str | None = None
    arguments: str = ""


def whole_calls(deltas: Iterable[ToolCallDelta]) -> tuple[ToolCallDelta, ...]:
    """The calls that `deltas` stream, one each, in index order: its id and name from the
    pieces that carry them, its arguments all the pieces' fragments joined."""
    calls: dict[int, ToolCallDelta] = {}
    for delta in deltas:
        seen = calls.get(delta.index)
        calls[delta.index] = delta if seen is None else replace(
            seen, id=seen.id or delta.id, name=seen.name or delta.name, arguments=seen.arguments + delta.arguments)
    return tuple(calls[index] for index in sorted(calls))


@dataclass(frozen=True)
class TopLogprob:
    token: str
    logprob: float
    bytes: tuple[int, ...]


@dataclass(frozen=True)
class TokenLogprob:
    """One sampled token's log-probability under the model, and its most likely alternatives."""

    token: str
    logprob: float
    bytes: tuple[int, ...]
    top: tuple[TopLogprob, ...] = ()


@dataclass(frozen=True)
class Chunk:
    """A piece of streamed output; the last chunk of a request has `finish_reason` and `stats`.

    `text` is answer text; `reasoning` is text the model wrote between its thinking markers;
    `tool_calls` are call pieces parsed from the output. Every API dialect dresses these same
    fields in its own shapes."""

    text: str
    finish_reason: str | None = None  # "stop" | "length" | "tool_calls" | "cancelled" | "error"
    stats: RequestStats | None = None
    error: str | None = None
    cache: str | None = None  # on a request's first chunk: "hit", "stale", "miss" or "bypass"
    reasoning: str = ""
    tool_calls: tuple[ToolCallDelta, ...] = ()
    logprobs: tuple[TokenLogprob, ...] = ()  # one per token of this chunk, when asked for

    @property
    def empty(self) -> bool:
        """Nothing to send a client (a final chunk still carries its finish reason)."""
        return not (self.text or self.reasoning or self.tool_calls or self.logprobs)


SAMPLING_OPTIONS = frozenset(SamplingParams.__dataclass_fields__)
_INTS = frozenset({"max_tokens", "top_k", "dry_allowed_length", "dry_penalty_last_n"})
_FLOATS = frozenset({"temperature", "top_p", "min_p", "repeat_penalty", "dry_multiplier", "dry_base"})


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


@dataclass(frozen=True)
class Grammar:
    """A GBNF grammar that holds a sequence's output to a shape (JSON, a schema, a tool call).

    With `triggers` it is lazy: the output is free until one of these regular expressions
    matches it (a tool-call opening marker), and held to the grammar from there on."""

    gbnf: str
    root: str = "root"
    triggers: tuple[str, ...] = ()


@dataclass(frozen=True)
class Decoding:
    """What the engine needs to run one sequence beyond its prompt tokens."""

    params: SamplingParams
    grammar: Grammar | None = None
    logprobs: bool = False  # each chunk carries its tokens' log-probabilities
    top_logprobs: int = 0  # and this many most likely alternatives per token
    stop_tokens: frozenset[int] = frozenset()  # besides end-of-generation (chat: turn delimiters)
    # control tokens whose text the answer keeps: a tool-call or thinking marker that a
    # vocabulary holds as one control token would otherwise render as nothing, and the
    # output parsers would never see it
    shown_tokens: frozenset[int] = frozenset()
