"""A picture of one request an engine holds now, running or queued: what the requests view,
`GET /api/requests` and `backend.requests()` show, and what `cancel_request` names by id."""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, fields
from typing import Any

from .errors import BadRequest

RUNNING, QUEUED = "running", "queued"
CANCELLERS = ("api", "console", "python")  # who may be named as a cancel's source


@dataclass(frozen=True)
class RequestInfo:
    """One request in flight at the moment it was read. Figures are the engine's own: `age_s`
    since it was submitted, `tokens` generated so far, `tokens_per_s` its decode speed after
    the first token (None before two tokens)."""

    request_id: str
    model: str
    api: str | None  # the dialect it came in by: openai, anthropic, responses, ollama, console, python
    session_id: str | None
    state: str  # RUNNING or QUEUED
    age_s: float
    prompt_tokens: int
    tokens: int
    tokens_per_s: float | None
    queue_position: int | None  # 1 = next to run; None while running

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RequestInfo:
        return cls(**{f.name: data.get(f.name) for f in fields(cls) if f.name in data or f.default is MISSING})


def checked_canceller(by: str) -> str:
    """`by` from a short fixed list, so an event cannot carry arbitrary text from a client."""
    if by not in CANCELLERS:
        raise BadRequest(f"by = {by!r}: must be one of {', '.join(CANCELLERS)}")
    return by
