"""Responses kept for OpenAI's Responses API (`store`): what `GET /v1/responses/{id}` returns
and what `previous_response_id` continues. In memory only, so a restart forgets them; at most
`MAX_STORED` are kept (the oldest goes first), each for `TTL_S` seconds after it was stored.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..request import Message

MAX_STORED = 1000
TTL_S = 3600.0


@dataclass(frozen=True)
class Stored:
    response: dict[str, Any]  # the response object, as it was answered
    conversation: tuple[Message, ...]  # its input and its output: what a continuation starts from


class Store:
    def __init__(self, limit: int = MAX_STORED, ttl_s: float = TTL_S,
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


RESPONSES = Store()  # the server's one store
