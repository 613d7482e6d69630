"""llama.cpp's own grammar engine as an acceptor, for tests of the grammars corral builds
(schemas, tool calls, thinking blocks); the `checker` fixture in conftest.py holds one."""

from __future__ import annotations

import ctypes
import math
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np

from corral.backend import llamalog
from corral.backend.generation import Grammar
from corral.backend.weights import ModelWeights

_TOKEN_DATA = np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])
_STRUCTURE = set('"{}[],:0123456789-tfn \\')


class GrammarChecker:
    """llama.cpp's grammar engine as an acceptor over a tiny model's vocabulary: text is fed
    as byte tokens, so any text can be checked; `walk` lets the grammar choose tokens."""

    def __init__(self, path: Path) -> None:
        llamalog.install()
        self.weights = ModelWeights(str(path))
        self.n_vocab = self.weights.n_vocab
        self.pieces = [self.weights.piece(t, special=True) for t in range(self.n_vocab)]
        self._one = llama_cpp.llama_token_data()
        self._one_array = llama_cpp.llama_token_data_array()
        self._all = np.zeros(self.n_vocab, dtype=_TOKEN_DATA)
        self._all_array = llama_cpp.llama_token_data_array()
        boost = [1.0 if p and p.decode("utf-8", "replace")[:1] in _STRUCTURE else 0.0 for p in self.pieces]
        self._boost = np.array(boost, dtype=np.float32) * 4

    def close(self) -> None:
        self.weights.release()

    def _sampler(self, grammar: Grammar) -> Any:
        return llama_cpp.llama_sampler_init_grammar(self.weights.vocab, grammar.gbnf.encode(), grammar.root.encode())

    def parses(self, grammar: Grammar) -> bool:
        sampler = self._sampler(grammar)
        if sampler:
            llama_cpp.llama_sampler_free(sampler)
        return bool(sampler)

    def _allows(self, sampler: Any, token: int) -> bool:
        self._one.id, self._one.logit, self._one.p = token, 1.0, 0.0
        self._one_array.data = ctypes.pointer(self._one)
        self._one_array.size, self._one_array.selected, self._one_array.sorted = 1, -1, False
        llama_cpp.llama_sampler_apply(sampler, ctypes.byref(self._one_array))
        return self._one_array.data[0].logit != -math.inf

    def accepts(self, grammar: Grammar, text: str) -> bool:
        """Whether the grammar accepts exactly `text`, whole."""
        sampler = self._sampler(grammar)
        assert sampler, f"llama.cpp cannot parse:\n{grammar.gbnf}"
        try:
            for byte in text.encode():
                token = self.weights.byte_token(byte)
                if not self._allows(sampler, token):
                    return False
                llama_cpp.llama_sampler_accept(sampler, token)
            return self._allows(sampler, self.weights.eos)
        finally:
            llama_cpp.llama_sampler_free(sampler)

    def walk(self, grammar: Grammar, rng: np.random.Generator, max_tokens: int = 300) -> str | None:
        """Text the grammar lets through, choosing tokens at random (structure characters
        favoured, the end taken as soon as the grammar allows it); None if it runs long."""
        sampler = self._sampler(grammar)
        assert sampler, grammar.gbnf
        out = b""
        try:
            for _ in range(max_tokens):
                entries = self._all
                entries["id"] = np.arange(self.n_vocab)
                entries["logit"] = rng.random(self.n_vocab, dtype=np.float32) + self._boost
                entries["logit"][self.weights.eos] = 100.0
                entries["p"] = 0.0
                self._all_array.data = ctypes.cast(entries.ctypes.data, llama_cpp.llama_token_data_p)
                self._all_array.size, self._all_array.selected, self._all_array.sorted = self.n_vocab, -1, False
                llama_cpp.llama_sampler_apply(sampler, ctypes.byref(self._all_array))
                token = int(np.argmax(entries["logit"]))
                assert entries["logit"][token] != -math.inf, f"dead end after {out!r}"
                if token == self.weights.eos:
                    return out.decode("utf-8")
                llama_cpp.llama_sampler_accept(sampler, token)
                out += self.pieces[token]
            return None
        finally:
            llama_cpp.llama_sampler_free(sampler)
