"""Responses kept for OpenAI's Responses API (`store`): what `GET /v1/responses/{id}` returns
and what `previous_response_id` continues. In memory only, one store per server, so a restart
forgets them; at most `limit` are kept (the oldest goes first), each for `ttl_s` seconds after
it was stored (config: `[server] responses_max` and `responses_ttl`).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..config import ServerSettings
from ..errors import NotFound
from ..request import Message

_DEFAULTS = ServerSettings()  # the config keys' defaults


@dataclass(frozen=True)
class Stored:
    response: dict[str, Any]  # the response object, as it was answered
    conversation: tuple[Message, ...]  # its input and its output: what a continuation starts from


class Store:
    """Stored responses by id, bounded in number and age."""

    def __init__(self, limit: int = _DEFAULTS.responses_max, ttl_s: float = _DEFAULTS.responses_ttl,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limit, self.ttl_s, self._clock = limit, ttl_s, clock
        self._items: OrderedDict[str, tuple[float, Stored]] = OrderedDict()  # id → (stored at, what)

    def put(self, response_id: str, stored: Stored) -> None:
        self._expire()
        self._items[response_id] = (self._clock(), stored)
        self._items.move_to_end(response_id)
        while len(self._items) > self.limit:
            self._items.popitem(last=False)

    def get(self, response_id: str) -> Stored | None:
        self._expire()
        entry = self._items.get(response_id)
        return entry[1] if entry else None

    def delete(self, response_id: str) -> bool:
        self._expire()
        return self._items.pop(response_id, None) is not None

    def _expire(self) -> None:
        """Drop what outlived the TTL; the items are in the order they were stored."""
        cutoff = self._clock() - self.ttl_s
        while self._items:
            response_id, (at, _) = next(iter(self._items.items()))
            if at > cutoff:
                return
            del self._items[response_id]

    def missing(self, response_id: str, where: str = "") -> NotFound:
        """The error for an id this store does not hold (any more)."""
        return NotFound(f"{where}no stored response has id {response_id!r} (responses are kept {self.ttl_s:g} s, "
                        f"at most {self.limit}, and only with store: true)")
