"""How one sequence's next token is chosen: sampler chains, grammars and log-probabilities.

Everything here runs on the engine's scheduler thread, once per sequence per step, inside the
engine's single sampling pass; nothing touches an event loop.

Greedy decoding without penalties takes numpy's argmax of the logits row (~30x cheaper than
llama.cpp's chain). Everything else goes through a llama.cpp sampler chain.

A grammar (GBNF) holds a sequence to a shape. Applying llama.cpp's grammar sampler to every
candidate costs 25-45 ms on a 262,144-token vocabulary (measured on the default model), so
`TokenSampler` does what llama.cpp's `common_sampler_sample` does: sample first without the
grammar, then check that one token against it (microseconds). Only a rejected token pays for
more, in tiers: the grammar applied to the 64 most likely tokens (by raw logit), then to the
4,096 most likely, and only if none of those is allowed, to the whole vocabulary. The second
tier exists because a schema that forces a key ("tags" where the model wants "email") puts the
allowed token at rank 300-700 on the default model, and 4,096 tokens cost ~1 ms. For greedy
decoding without penalties the result is exactly the best allowed token. For sampling, the
draw is among the allowed tokens of the first tier that has any, which differs from a draw
over all allowed tokens only by the mass of allowed tokens beyond that tier.

A lazy grammar (with triggers) lets the output run free until a trigger matches it, and holds
it from the start of the trigger's first group. The triggers are watched here, in Python, over
a non-lazy grammar sampler, rather than with llama.cpp's lazy sampler: that one compiles the
patterns with std::regex and replays the matched text inside its accept call, and a C++
exception from either (an ECMAScript-invalid pattern, matched text the grammar refuses) cannot
be caught through ctypes — it aborts the process. Here a bad pattern is a BadRequest and
refused text ends only its own sequence, with an error.
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
import re
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import llama_cpp
import numpy as np

from . import llamalog
from .errors import BadRequest
from .generation import LOOP_GUARD, Decoding, Grammar, SamplingParams, TokenLogprob, TopLogprob
from .weights import ModelWeights, init_backend

log = logging.getLogger("corral.engine")

TIERS = (64, 4096)  # after a rejected first pick: the most likely tokens tried before all of them

_TOKEN_DATA = np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])  # llama_token_data
assert _TOKEN_DATA.itemsize == ctypes.sizeof(llama_cpp.llama_token_data)


class GrammarDeadEnd(Exception):
    """The grammar allows no token here: the sequence ends with this as its error."""


@dataclass
class GrammarStats:
    """How the tokens of grammar-held sequences were chosen (one engine; scheduler thread)."""

    checked: int = 0  # tokens sampled without the grammar and then checked alone
    rejected: int = 0  # of those, refused by the grammar
    resolved: list[int] = field(default_factory=lambda: [0] * (len(TIERS) + 1))  # per tier; last: all tokens


# llama.cpp's default DRY sequence breakers (common.h): a repeated run stops at these, so a
# new line or a quotation does not count as repeating what came before it
DRY_BREAKERS = (b"\n", b":", b'"', b"*")
_DRY_BREAKERS = (ctypes.c_char_p * len(DRY_BREAKERS))(*DRY_BREAKERS)
REPEAT_LAST_N = 64  # tokens the repetition penalty looks back over (llama.cpp's default)


def make_chain(params: SamplingParams, weights: ModelWeights) -> llama_cpp.llama_sampler_p | None:
    """A llama.cpp sampler chain, or None for plain greedy (numpy argmax is ~30x cheaper).
    Penalties come first, as in llama.cpp's common sampler, so greedy honours them too."""
    if params.greedy and not params.penalised:
        return None
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    add = lambda s: llama_cpp.llama_sampler_chain_add(chain, s)  # noqa: E731
    if params.repeat_penalty != 1.0:
        add(llama_cpp.llama_sampler_init_penalties(weights.n_vocab, REPEAT_LAST_N, params.repeat_penalty, 0.0, 0.0))
    if params.dry_multiplier > 0 and params.dry_penalty_last_n > 0:
        dry = (params.dry_multiplier, params.dry_base, params.dry_allowed_length, params.dry_penalty_last_n)
        prototype = weights.prototype(("dry", *dry), lambda: llama_cpp.llama_sampler_init_dry(
            weights.vocab, *dry, _DRY_BREAKERS, len(DRY_BREAKERS)))
        add(llama_cpp.llama_sampler_clone(prototype))
    if params.greedy:
        add(llama_cpp.llama_sampler_init_greedy())
        return chain
    if params.top_k > 0:
        add(llama_cpp.llama_sampler_init_top_k(params.top_k))
    add(llama_cpp.llama_sampler_init_top_p(params.top_p, 1))
    if params.min_p > 0:
        add(llama_cpp.llama_sampler_init_min_p(params.min_p, 1))
    add(llama_cpp.llama_sampler_init_temp(params.temperature))
    seed = params.seed if params.seed is not None else llama_cpp.LLAMA_DEFAULT_SEED
    add(llama_cpp.llama_sampler_init_dist(seed & 0xFFFFFFFF))
    return chain


def prepare_loop_guard(weights: ModelWeights) -> None:
    """Make the loop guard's DRY prototype now, on the loading thread, so that no request pays
    for it (requests make their samplers on the event loop, in `Engine.submit`)."""
    chain = make_chain(SamplingParams(temperature=0.0, **LOOP_GUARD), weights)
    if chain is not None:
        llama_cpp.llama_sampler_free(chain)


def check_grammar(grammar: Grammar) -> None:
    """BadRequest with llama.cpp's reason if `grammar` does not parse, before any model is
    loaded for it: llama.cpp's parser needs no vocabulary until the grammar is applied."""
    init_backend()
    llama_cpp.llama_sampler_free(_parsed(None, grammar))


def new_grammar(weights: ModelWeights, grammar: Grammar) -> llama_cpp.llama_sampler_p:
    """llama.cpp's grammar sampler for `grammar` over `weights`' vocabulary; BadRequest with
    llama.cpp's reason if it does not parse."""
    return _parsed(weights.vocab, grammar)


def _parsed(vocab: llama_cpp.llama_vocab_p | None, grammar: Grammar) -> llama_cpp.llama_sampler_p:
    if not grammar.gbnf.strip():
        raise BadRequest("grammar: the GBNF text is empty")
    if "\0" in grammar.gbnf or "\0" in grammar.root:
        raise BadRequest("grammar: the GBNF text contains a NUL character")
    try:
        gbnf, root = grammar.gbnf.encode("utf-8"), grammar.root.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest("grammar: the GBNF text contains a lone surrogate, which is not text") from None
    with llamalog.capture() as captured, _stderr_captured() as printed:
        sampler = llama_cpp.llama_sampler_init_grammar(vocab, gbnf, root)
    if printed:
        log.debug("llama.cpp printed while parsing a grammar: %s", printed.decode("utf-8", "replace"))
    if not sampler:
        raise BadRequest(f"grammar: llama.cpp could not parse it: {_parse_error(printed, captured.lines)}")
    return sampler


_stderr_lock = threading.Lock()


@contextmanager
def _stderr_captured() -> Iterator[bytearray]:
    """What C code writes to file descriptor 2 during the block (filled in as it ends), kept
    off the terminal.

    llama.cpp's GBNF parser says why a grammar is wrong only with fprintf(stderr, ...), then
    echoes the whole grammar, which under the console would corrupt the screen. For the few
    microseconds of a parse, fd 2 points at a temporary file; anything another thread writes
    to fd 2 meanwhile lands there too and goes to the log instead of the terminal."""
    printed = bytearray()
    with _stderr_lock, tempfile.TemporaryFile() as sink:
        try:
            if sys.stderr is not None:
                sys.stderr.flush()
            saved = os.dup(2)
        except OSError:  # no fd 2 to borrow: nothing can reach a terminal either
            yield printed
            return
        os.dup2(sink.fileno(), 2)
        try:
            yield printed
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            printed += sink.read(MAX_PRINTED)


MAX_PRINTED = 1 << 16  # bytes of captured stderr kept: the echoed grammar can be large


def _parse_error(printed: bytes, lines: list[tuple[int, str]]) -> str:
    """The telling part of llama.cpp's complaint: the parser's "error parsing grammar: ..."
    line (not its echo of the grammar) and the errors it logged, but the generic "failed to
    parse grammar" only when there is nothing better."""
    found = [m.group(1).strip() for m in re.finditer(rb"error parsing grammar: ([^\n]*)", printed)]
    reasons = [r.decode("utf-8", "replace") for r in found]
    reasons += [text for level, text in lines if level >= logging.WARNING and text != "failed to parse grammar"]
    return "; ".join(dict.fromkeys(reasons)) or "failed to parse grammar"


_ANY_LAZY = (r"[\s\S]*?", r"[\S\s]*?", r"(?s:.*?)")  # "anything, as little as possible"


def _compile_triggers(triggers: tuple[str, ...]) -> list[tuple[re.Pattern[bytes], bool]]:
    r"""Each trigger as a bytes pattern (output is matched as bytes, as llama.cpp does) and
    whether it must match the whole output (written as ^...$) rather than anywhere in it.

    llama.cpp's trigger idiom `[\s\S]*?(<marker>)...` begins with a lazy match-anything. Under
    a search that changes nothing when the pattern has a group (the group still lands on the
    first place the rest matches), but it makes Python's search quadratic in the output: 260 ms
    a token at 4,000 bytes. It is dropped, and the search is linear."""
    compiled = []
    for pattern in triggers:
        whole = len(pattern) > 1 and pattern.startswith("^") and pattern.endswith("$")
        try:
            regex = re.compile(pattern.encode("utf-8"))
            prefix = next((p for p in _ANY_LAZY if pattern.startswith(p)), None)
            if not whole and prefix is not None and regex.groups:
                regex = re.compile(pattern[len(prefix):].encode("utf-8"))
        except (re.error, UnicodeEncodeError) as exc:
            raise BadRequest(f"grammar: trigger {pattern!r} is not a regular expression: {exc}") from None
        compiled.append((regex, whole))
    return compiled


def _trigger_start(pattern: re.Pattern[bytes], whole: bool, output: bytes) -> int | None:
    """Where held output starts if `pattern` matches: its first non-empty group, else the
    match (llama.cpp's llama_grammar_trigger_pattern::find)."""
    match = pattern.fullmatch(output) if whole else pattern.search(output)
    if match is None:
        return None
    for group in range(1, pattern.groups + 1):
        start, end = match.span(group)
        if start >= 0 and end > start:
            return start
    return match.start()


def _top_ids(row: np.ndarray, k: int) -> np.ndarray:
    """The ids of the `k` largest logits, in no order: half the cost of an argpartition of
    the whole row (0.35 against 0.73 ms for 4,096 of 262,144 here). A strided sample of ~4,096
    logits gives a threshold that about 2k logits pass; when at least k do, the k largest are
    among them, and only those few are partitioned."""
    stride = max(1, len(row) // 4096)
    sample = row[::stride]
    rank = min(len(sample), 2 * k // stride + 1)
    ids = np.flatnonzero(row >= np.partition(sample, -rank)[-rank])
    if len(ids) < k:  # the sample misled: partition the whole row
        return np.argpartition(row, -k)[-k:]
    return ids[np.argpartition(row[ids], -k)[-k:]]


class Scratch:
    """What every sequence of one engine shares: a candidates buffer the size of the
    vocabulary (allocated on first use, ~3 MB for 262,144 tokens), a one-token array for the
    sample-first check, and the grammar counters. Scheduler thread only."""

    def __init__(self, n_vocab: int) -> None:
        self.n_vocab = n_vocab
        self.stats = GrammarStats()
        self._buffer: np.ndarray | None = None
        self._ids: np.ndarray | None = None
        self.array = llama_cpp.llama_token_data_array()
        self._one = llama_cpp.llama_token_data()
        self._one_array = llama_cpp.llama_token_data_array()

    def candidates(self, row: np.ndarray, ids: np.ndarray | None = None) -> np.ndarray:
        """Fill `self.array` with the logits of `ids` (all tokens when None); returns the
        numpy view of the entries, which llama.cpp samplers then edit in place."""
        if self._buffer is None:
            self._buffer = np.empty(self.n_vocab, dtype=_TOKEN_DATA)
            self._ids = np.arange(self.n_vocab, dtype=np.int32)
        entries = self._buffer[:self.n_vocab if ids is None else len(ids)]
        entries["id"] = self._ids if ids is None else ids
        entries["logit"] = row if ids is None else row[ids]
        entries["p"] = 0.0
        self.array.data = ctypes.cast(entries.ctypes.data, llama_cpp.llama_token_data_p)
        self.array.size = len(entries)
        self.array.selected = -1
        self.array.sorted = False
        return entries

    def allows(self, grammar: llama_cpp.llama_sampler_p, token: int) -> bool:
        """Whether `grammar` accepts `token` next: the one-token check, microseconds."""
        self._one.id, self._one.logit, self._one.p = token, 1.0, 0.0
        self._one_array.data = ctypes.pointer(self._one)
        self._one_array.size, self._one_array.selected, self._one_array.sorted = 1, -1, False
        llama_cpp.llama_sampler_apply(grammar, ctypes.byref(self._one_array))
        return self._one_array.data[0].logit != -math.inf

    def selected(self) -> tuple[int, float]:
        """The token a chain chose in `self.array` and its logit then (-inf: not allowed)."""
        chosen = self.array.data[self.array.selected]
        return chosen.id, chosen.logit


class TokenSampler:
    """Chooses one sequence's tokens and, when asked, reports their log-probabilities.

    Made in `Engine.submit` (so a grammar that does not parse is refused before anything is
    queued) and freed with its request."""

    def __init__(self, weights: ModelWeights, decoding: Decoding, scratch: Scratch) -> None:
        self._weights = weights
        self._scratch = scratch
        self.n_vocab = weights.n_vocab
        self.logprobs = decoding.logprobs
        self.top_logprobs = decoding.top_logprobs if decoding.logprobs else 0
        self.held = False  # whether the grammar held the last token chosen
        self._grammar: llama_cpp.llama_sampler_p | None = None
        self._triggers = _compile_triggers(decoding.grammar.triggers) if decoding.grammar else []
        self._chain = make_chain(decoding.params, weights)
        try:
            if decoding.grammar is not None:
                self._grammar = new_grammar(weights, decoding.grammar)
        except BaseException:
            self.free()
            raise
        self._awaiting = bool(self._triggers)  # a lazy grammar whose trigger has not matched yet
        self._output = bytearray()  # what a lazy grammar's triggers are matched against
        self._spans: list[tuple[int, int, int]] = []  # (token, start, end) of each piece in it
        if self._grammar is not None:
            self.pick = self._pick_held
        elif self._chain is not None:
            self.pick = self._pick_chain
        else:
            self.pick = self._pick_greedy

    def free(self) -> None:
        for name in ("_chain", "_grammar"):
            sampler = getattr(self, name)
            if sampler is not None:
                llama_cpp.llama_sampler_free(sampler)
                setattr(self, name, None)

    def _row(self, ctx: llama_cpp.llama_context_p, index: int) -> np.ndarray:
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, index), shape=(self.n_vocab,))

    def _pick_greedy(self, ctx: llama_cpp.llama_context_p, index: int) -> int:
        return int(np.argmax(self._row(ctx, index)))

    def _pick_chain(self, ctx: llama_cpp.llama_context_p, index: int) -> int:
        return llama_cpp.llama_sampler_sample(self._chain, ctx, index)  # accepts into the chain

    def _pick_held(self, ctx: llama_cpp.llama_context_p, index: int) -> int:
        if self._awaiting:
            self.held = False
            token = self._pick_chain(ctx, index) if self._chain is not None else self._pick_greedy(ctx, index)
            if not self._weights.is_eog(token):
                self._watch(token)
            return token
        self.held = True
        scratch, grammar, chain = self._scratch, self._grammar, self._chain
        row = self._row(ctx, index)
        if chain is None:
            token = int(np.argmax(row))
        else:  # the chain without accepting: a rejected token must not enter its history
            scratch.candidates(row)
            llama_cpp.llama_sampler_apply(chain, ctypes.byref(scratch.array))
            token = scratch.selected()[0]
        scratch.stats.checked += 1
        if not scratch.allows(grammar, token):
            scratch.stats.rejected += 1
            token = self._resample(row)
        llama_cpp.llama_sampler_accept(grammar, token)
        if chain is not None:
            llama_cpp.llama_sampler_accept(chain, token)
        return token

    def _resample(self, row: np.ndarray) -> int:
        """The first pick was refused: apply the grammar to the most likely tokens, tier by tier
        (TIERS), then to the whole vocabulary, and choose among the first allowed ones found."""
        scratch = self._scratch
        sizes = [k for k in TIERS if k < self.n_vocab]
        tiers: list[np.ndarray | None] = []
        if sizes:  # one pass over the row; each smaller tier partitions the larger one's ids
            ids = _top_ids(row, sizes[-1])
            tiers.append(ids)
            for k in reversed(sizes[:-1]):
                ids = ids[np.argpartition(row[ids], -k)[-k:]]
                tiers.insert(0, ids)
        tiers.append(None)
        for tier, ids in enumerate(tiers):
            entries = scratch.candidates(row, ids)
            llama_cpp.llama_sampler_apply(self._grammar, ctypes.byref(scratch.array))
            logits = entries["logit"]
            best = int(np.argmax(logits))
            if logits[best] == -math.inf:
                continue  # nothing allowed in this tier
            scratch.stats.resolved[tier if ids is not None else -1] += 1
            if self._chain is None:
                return int(entries["id"][best])
            llama_cpp.llama_sampler_apply(self._chain, ctypes.byref(scratch.array))
            token, logit = scratch.selected()
            if logit == -math.inf:  # never hand the grammar a token it refused: that aborts
                break
            return token
        raise GrammarDeadEnd("grammar: no token of this model's vocabulary can continue the output")

    def _watch(self, token: int) -> None:
        """Match the triggers against the free output so far; once one matches, feed the
        grammar the output from the match on, and hold every later token to it."""
        piece = self._weights.piece(token, special=True)
        self._spans.append((token, len(self._output), len(self._output) + len(piece)))
        self._output += piece
        output = bytes(self._output)
        for pattern, whole in self._triggers:
            start = _trigger_start(pattern, whole, output)
            if start is not None:
                self._awaiting = False
                self._replay(start)
                return

    def _replay(self, start: int) -> None:
        """Feed the grammar the output from byte `start`: whole tokens as they are, the piece of
        a token cut by `start` as single-byte tokens."""
        scratch, grammar = self._scratch, self._grammar
        for token, begin, end in self._spans:
            if end <= start:
                continue
            if begin < start:
                feed = [self._weights.byte_token(b) for b in self._output[start:end]]
            else:
                feed = [token]
            for fed in feed:
                if fed is None or not scratch.allows(grammar, fed):
                    text = bytes(self._output[start:]).decode("utf-8", "replace")
                    raise GrammarDeadEnd(f"grammar: the output from its trigger on does not fit it: {text!r}")
                llama_cpp.llama_sampler_accept(grammar, fed)
        self._output.clear()
        self._spans.clear()

    def logprob(self, ctx: llama_cpp.llama_context_p, index: int, token: int) -> TokenLogprob:
        """`token`'s log-probability under the model's raw distribution (the logits before any
        sampler or grammar), and the `top_logprobs` most likely tokens, most likely first.

        A stable log-sum-exp: exp of (logit - max) <= 0 cannot overflow. The terms are taken in
        float32 and summed in float64: numpy's float64 exp over 262,144 logits costs 6 ms a
        token here against 0.7 ms, and the sum differs by ~1e-8, far below the float32 logits'
        own precision; each logprob is then a float64 difference."""
        row = self._row(ctx, index)
        peak = row.max()
        log_total = float(peak) + math.log(np.exp(row - peak).sum(dtype=np.float64))
        top: tuple[TopLogprob, ...] = ()
        n = self.top_logprobs
        if n:
            ids = _top_ids(row, n) if n < self.n_vocab else np.arange(self.n_vocab)
            ids = ids[np.lexsort((ids, -row[ids]))]  # most likely first; ties by token id
            top = tuple(TopLogprob(text, float(row[i]) - log_total, raw)
                        for i in ids for text, raw in (self._text(int(i)),))
        text, raw = self._text(token)
        return TokenLogprob(text, float(row[token]) - log_total, raw, top)

    def _text(self, token: int) -> tuple[str, tuple[int, ...]]:
        raw = self._weights.piece(token)
        return raw.decode("utf-8", errors="replace"), tuple(raw)
