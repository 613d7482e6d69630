"""Which tokens each llama.cpp sequence id of a context still holds, and who gets which id:
the bookkeeping behind reusing cached prompt prefixes, a slot's own or another's."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np


MIN_REUSE = 8  # a cached prefix shorter than this is not worth keeping a slot for
MIN_AWAIT = 64  # a prefix still being evaluated elsewhere is worth waiting for from this many tokens


@dataclass(frozen=True)
class Take:
    """A sequence given to a request: its id, the prompt tokens already cached for it, and the
    sequence those must first be shared from (None: they are its own)."""

    seq_id: int
    cached: int
    copy_from: int | None = None


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(diff[0]) if diff.size else n


def awaited_prefix(prompt: list[int], prefilling: dict[int, tuple[list[int], int]]) -> tuple[int, int] | None:
    """The sequence still evaluating the longest prefix of `prompt` (MIN_AWAIT tokens or more
    beyond what it has evaluated), and where that prefix ends; None when there is none.

    `prefilling` maps each prefilling sequence id to its prompt and how far it has got. Waiting
    for it and then sharing the prefix evaluates a common system prompt once for a whole wave of
    clients that arrive together, not once per client. The wait costs the request nothing:
    prompt chunks go to running sequences in turn, so its own prefill would only have begun
    once theirs was done.
    """
    best: tuple[int, int] | None = None
    for seq_id, (tokens, done) in prefilling.items():
        n = min(common_prefix(tokens, prompt), len(prompt) - 1)
        if n - done >= MIN_AWAIT and (best is None or n > best[1]):
            best = (seq_id, n)
    return best


class SlotCache:
    """Which tokens each llama.cpp sequence id still holds in the KV cache, and who gets which id.

    A finished request leaves its KV in place. A new request reuses the longest cached prefix of
    its prompt held by any sequence, running or free, so only the tokens after it are evaluated:
    - a free sequence whose cache is (nearly all) that prefix is taken as it is: the next turn
      of a chat extends the previous prompt and answer;
    - otherwise the prefix is shared into another free sequence (`Take.copy_from`: the engine
      adds the new sequence id to those KV cells with `llama_memory_seq_cp`, which in the
      unified cache copies nothing), so a common system prompt or tools header is evaluated
      once for every client, and a free sequence holding a longer conversation keeps it.
    Without a useful match a request takes the least recently used sequence, empty ones first,
    so a warm prefix is not clobbered by an unrelated request. Owned by the scheduler thread,
    except `free` which `submit` reads under the engine's lock.
    """

    def __init__(self, n: int, share: bool = True) -> None:
        self.share = share  # prefixes may be shared between sequences (not for recurrent models)
        self.tokens: list[list[int]] = [[] for _ in range(n)]
        self.last_used = [0.0] * n
        self.free = list(range(n))

    def take(self, prompt: list[int]) -> Take:
        """A free sequence id for `prompt`, how many of its leading tokens are cached, and where
        they must be shared from first.

        At least one prompt token is always left to evaluate: its logits give the first token.
        """
        limit = len(prompt) - 1
        shared = [min(common_prefix(tokens, prompt), limit) for tokens in self.tokens]
        candidates = range(len(self.tokens)) if self.share else self.free
        donor = max(candidates, key=lambda seq: (shared[seq], seq in self.free, self.last_used[seq]))
        if shared[donor] < MIN_REUSE:
            return self._claim(self._least_valuable(), 0)
        in_place = max(self.free, key=lambda seq: (shared[seq], self.last_used[seq]))
        lost = len(self.tokens[in_place]) - shared[in_place]  # cached tokens taking it in place would drop
        if not self.share or (shared[in_place] + MIN_REUSE > shared[donor]
                              and (lost < MIN_REUSE or len(self.free) == 1)):
            return self._claim(in_place, shared[in_place])
        others = [seq for seq in self.free if seq != donor] or self.free
        target = min(others, key=lambda seq: (shared[seq] < len(self.tokens[seq]), bool(self.tokens[seq]),
                                              self.last_used[seq]))
        if target == donor:
            return self._claim(target, shared[donor])
        return self._claim(target, shared[donor], copy_from=donor)

    def _least_valuable(self) -> int:
        return min(self.free, key=lambda seq: (bool(self.tokens[seq]), self.last_used[seq]))

    def _claim(self, seq_id: int, cached: int, copy_from: int | None = None) -> Take:
        self.free.remove(seq_id)
        return Take(seq_id, cached, copy_from)

    def shared_into(self, take: Take) -> None:
        """Record that `take.copy_from`'s first `take.cached` tokens now also belong to `take.seq_id`."""
        assert take.copy_from is not None
        self.tokens[take.seq_id] = self.tokens[take.copy_from][:take.cached]

    def give_back(self, seq_id: int) -> None:
        self.last_used[seq_id] = time.perf_counter()
        self.free.append(seq_id)

    def idle_cached(self) -> list[int]:
        """Free sequences that still hold KV: the first thing to drop when the cache is full."""
        return [seq for seq in self.free if self.tokens[seq]]
