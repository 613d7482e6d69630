"""Where a context's prompt prefixes live: in its KV cache (SlotCache says which sequence holds
what) or beside it in memory, and how a new request gets the longest one it can use.

In the unified KV cache every sequence's cells are scanned by every step's attention (masked
out, but read), so prefixes left idle in the cache slow each later prompt, more the longer they
are: one 4.4k-token prompt after three idle ones took 2.5x as long here without flash attention
and 1.3x with it. So, as llama-server does with its idle slots, a request's admission moves the
other idle sequences' KV out of the cache (`llama_state_seq_get_data`) into a list of parked
prefixes, bounded by `[budgets] saved_kv_ram`, and a later request whose prompt one of them
begins gets it back (`llama_state_seq_set_data`), which costs a copy rather than a prefill.
Only a long prefill (half a batch or more) parks them: that is where idle cells cost most, and
a short one (the next turn over a shared system prompt) would pay copies of tens of MB for
little, and lose the live prefixes that `llama_memory_seq_cp` shares for free.
When the model is evicted or the server stops, the idle and parked prefixes go to the
PrefixStore; at the next load they come back as parked prefixes. Owned by the scheduler thread.
"""

from __future__ import annotations

import logging
import time

import llama_cpp

from .kvstore import Prefix, PrefixStore, sequence_state, set_sequence_state
from .slots import MIN_REUSE, SlotCache, Take, common_prefix

log = logging.getLogger("corral.engine")


class Prefixes:
    """The KV of one context's sequences, in its cache and parked beside it."""

    def __init__(self, ctx: llama_cpp.llama_context_p, slots: SlotCache, store: PrefixStore | None, key: str,
                 model_name: str, park_for: int) -> None:
        self._ctx, self._memory = ctx, llama_cpp.llama_get_memory(ctx)
        self.slots, self.store, self.key, self.model_name = slots, store, key, model_name
        self.limit = store.ram if store is not None and slots.share else 0  # bytes of parked state
        self.parked: list[Prefix] = []  # most recently parked first
        self.park_for = park_for  # a prefill of this many tokens moves the idle sequences out first

    def parked_bytes(self) -> int:
        """What the parked prefixes hold in memory; read from other threads (a snapshot of the
        list, which the scheduler replaces rather than mutates in place when it drops many)."""
        return sum(p.size for p in list(self.parked))

    def place(self, prompt: list[int]) -> tuple[int, int]:
        """A sequence for `prompt` holding the longest cached prefix of it (in the cache or
        parked), and how many prompt tokens that prefix covers; the other idle sequences are
        parked."""
        taken = self.slots.take(prompt)
        index, shared = self._best_parked(prompt)
        if index is not None and shared > max(taken.cached, MIN_REUSE - 1):
            keep = shared if self._unpark(taken.seq_id, index) else 0  # refused: the sequence is empty
        else:
            if taken.copy_from is not None:
                self._share(taken)
            keep = taken.cached
        cached = self.trim(taken.seq_id, keep)
        if len(prompt) - cached >= self.park_for:
            self._park_idle(taken.seq_id)
        return taken.seq_id, cached

    def trim(self, seq_id: int, keep: int) -> int:
        """Drop the KV of `seq_id` after its first `keep` tokens; returns how many were kept."""
        tokens = self.slots.tokens[seq_id]
        if keep < len(tokens) and not llama_cpp.llama_memory_seq_rm(self._memory, seq_id, keep, -1):
            # Some memory types cannot cut a sequence in the middle: start it afresh.
            llama_cpp.llama_memory_seq_rm(self._memory, seq_id, -1, -1)
            keep = 0
        del tokens[keep:]
        return keep

    def _share(self, taken: Take) -> None:
        """Give `taken.seq_id` the cells of another sequence's first `taken.cached` tokens
        (positions 0 .. cached-1) in place of its own: in the unified cache the cells gain a
        sequence id, nothing is copied."""
        llama_cpp.llama_memory_seq_rm(self._memory, taken.seq_id, -1, -1)
        llama_cpp.llama_memory_seq_cp(self._memory, taken.copy_from, taken.seq_id, 0, taken.cached)
        self.slots.shared_into(taken)

    def _best_parked(self, prompt: list[int]) -> tuple[int | None, int]:
        best, shared = None, 0
        for i, prefix in enumerate(self.parked):
            n = min(common_prefix(list(prefix.tokens), prompt), len(prompt) - 1)
            if n > shared:
                best, shared = i, n
        return best, shared

    def _unpark(self, seq_id: int, index: int) -> bool:
        prefix = self.parked.pop(index)
        llama_cpp.llama_memory_seq_rm(self._memory, seq_id, -1, -1)
        if not set_sequence_state(self._ctx, seq_id, prefix.state):
            log.warning("%s: llama.cpp refused a parked KV state of %d tokens; it is evaluated again",
                        self.model_name, len(prefix.tokens))
            llama_cpp.llama_memory_seq_rm(self._memory, seq_id, -1, -1)
            self.slots.tokens[seq_id] = []
            return False
        self.slots.tokens[seq_id] = list(prefix.tokens)
        return True

    def _park_idle(self, keep: int) -> None:
        """Move every idle sequence's KV but `keep`'s out of the cache."""
        if self.limit <= 0:
            return
        for seq in self.slots.idle_cached():
            if seq != keep:
                state = sequence_state(self._ctx, seq, self.limit)
                if state:
                    self._park(Prefix(tuple(self.slots.tokens[seq]), state))
                self.trim(seq, 0)

    def _park(self, prefix: Prefix) -> None:
        self.parked = [p for p in self.parked if p.tokens[:len(prefix.tokens)] != prefix.tokens]  # now covered
        self.parked.insert(0, prefix)
        total = 0
        for i, kept in enumerate(self.parked):
            total += kept.size
            if total > self.limit:
                del self.parked[i:]
                break

    # -- across evictions and restarts ------------------------------------------------------

    def save(self) -> None:
        """Hand the store the idle sequences' KV (most recently used first) and the parked
        prefixes; the scheduler thread has ended, nothing decodes."""
        if self.store is None:
            return
        saved, budget = [], max(self.store.ram, self.store.disk)
        for seq in sorted(self.slots.idle_cached(), key=lambda s: self.slots.last_used[s], reverse=True):
            state = sequence_state(self._ctx, seq, budget) if len(self.slots.tokens[seq]) >= MIN_REUSE else None
            if state:
                saved.append(Prefix(tuple(self.slots.tokens[seq]), state))
                budget -= len(state)
        self.store.save(self.key, saved + self.parked)

    def restore(self) -> int:
        """Park what the store saved under this model and context; returns its tokens."""
        if self.store is None:
            return 0
        began = time.perf_counter()
        for prefix in reversed(self.store.load(self.key)):
            self._park(prefix)
        restored = sum(len(p.tokens) for p in self.parked)
        if restored:
            log.info("%s: %d tokens of saved KV ready in %.0f ms", self.model_name, restored,
                     (time.perf_counter() - began) * 1000)
        return restored
