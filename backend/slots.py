"""Which tokens each llama.cpp sequence id of a context still holds, and who gets which id:
the bookkeeping behind reusing a slot's cached prompt prefix."""

from __future__ import annotations

import time

import numpy as np


MIN_REUSE = 8  # a cached prefix shorter than this is not worth keeping a slot for


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(diff[0]) if diff.size else n


class SlotCache:
    """Which tokens each llama.cpp sequence id still holds in the KV cache, and who gets which id.

    A finished request leaves its KV in place. The next request goes to the free sequence whose
    cached tokens share the longest prefix with its prompt (a follow-up turn of a chat extends
    the previous prompt and answer), and only the tokens after that prefix are evaluated.
    Without a useful match it takes the least recently used sequence, so a warm prefix is not
    clobbered by an unrelated request. Owned by the scheduler thread, except `free` which
    `submit` reads under the engine's lock.
    """

    def __init__(self, n: int) -> None:
        self.tokens: list[list[int]] = [[] for _ in range(n)]
        self.last_used = [0.0] * n
        self.free = list(range(n))

    def take(self, prompt: list[int]) -> tuple[int, int]:
        """A free sequence id for `prompt` and how many of its leading tokens are cached.

        At least one prompt token is always left to evaluate: its logits give the first token.
        """
        shared = {seq: min(_common_prefix(self.tokens[seq], prompt), len(prompt) - 1) for seq in self.free}
        best = max(self.free, key=lambda seq: (shared[seq], self.last_used[seq]))
        if shared[best] < MIN_REUSE:
            best = min(self.free, key=lambda seq: (bool(self.tokens[seq]), self.last_used[seq]))
        self.free.remove(best)
        return best, shared[best]

    def give_back(self, seq_id: int) -> None:
        self.last_used[seq_id] = time.perf_counter()
        self.free.append(seq_id)

    def idle_cached(self) -> list[int]:
        """Free sequences that still hold KV: the first thing to drop when the cache is full."""
        return [seq for seq in self.free if self.tokens[seq]]
