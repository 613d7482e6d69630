"""Thinking text: which templates let a model think first, how a request turns that off, and
how the output splits into reasoning and answer.

Reasoning models (Qwen3, QwQ, DeepSeek-R1, ...) write their thinking between two markers,
`<think>` and `</think>` for most, before the answer. Some templates open the block in the
generation prompt themselves (DeepSeek-R1, QwQ, Qwen3.5), so the output starts inside it;
`ReasoningFormat.opened_by` tells from the rendered prompt. A template that reads
`enable_thinking` (Qwen3 and most since) turns thinking off when it is false, usually by
rendering an empty block into the prompt; one that always thinks (the original DeepSeek-R1)
ignores it. The splitter recognises a thinking block at the start of the output only (after
whitespace), as llama.cpp does, so an answer that mentions the markers later keeps them.
gpt-oss's channels are another scheme and not handled here.

A grammar (a schema, a required tool call) would forbid the thinking block, and when the
prompt has opened it, hold the thinking itself to the grammar: `allow_thinking` lets the block
through first.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from .errors import BadRequest
from .generation import Grammar
from .gbnf import literal

# (start, end) marker pairs, the more specific first; each end marker's first character occurs
# nowhere else in it (allow_thinking's grammar relies on that)
MARKERS: tuple[tuple[str, str], ...] = (
    ("<seed:think>", "</seed:think>"),  # ByteDance Seed-OSS
    ("<|START_THINKING|>", "<|END_THINKING|>"),  # Cohere Command R7B
    ("[THINK]", "[/THINK]"),  # Magistral, Ministral 3 reasoning
    ("<think>", "</think>"),  # Qwen3, QwQ, DeepSeek-R1, GLM, SmolLM3, ...
)
SWITCH = "enable_thinking"


@dataclass(frozen=True)
class ReasoningFormat:
    start: str = "<think>"
    end: str = "</think>"

    def opened_by(self, prompt: str) -> bool:
        """Whether the rendered prompt ends inside a thinking block: the output starts in it."""
        return prompt.rstrip().endswith(self.start)

    def splitter(self, inside: bool) -> ReasoningSplitter:
        return ReasoningSplitter(self, inside)

    def allow_thinking(self, grammar: Grammar, inside: bool) -> Grammar:
        """`grammar` with the thinking block let through before it (from its start marker, or
        `inside` it already), so that a schema or a required call does not forbid thinking. A
        lazy grammar (with triggers) is returned as it is: its output is free until a trigger."""
        if grammar.triggers:
            return grammar
        # text without the end marker, as the states of an automaton matching it: state k has
        # just read its first k characters (the first occurs nowhere else in it, so a mismatch
        # goes back to state 1 on that character, else to 0); the marker then ends the block
        end, first = self.end, _class(self.end[0])
        rules = []
        for k in range(len(end)):
            moves = [f"{literal(end[k])} corral-thinking-{k + 1}"] if 0 < k < len(end) - 1 else []
            moves.append(f"{literal(end[0])} corral-thinking-1")
            moves.append(f"[^{first}{_class(end[k]) if k else ''}] corral-thinking-0")
            rules.append(f"corral-thinking-{k} ::= | {' | '.join(moves)}")
        block = f"corral-thinking-0 {literal(end)} [ \\t\\n]{{0,8}}"
        opening = block if inside else f'( [ \\t\\n]{{0,8}} {literal(self.start)} {block} )?'
        rules.append(f"corral-thinking-root ::= {opening} {grammar.root}")
        return replace(grammar, gbnf=grammar.gbnf.rstrip("\n") + "\n" + "\n".join(rules) + "\n",
                       root="corral-thinking-root")


def _class(chars: str) -> str:
    return "".join(f"\\x{ord(c):02X}" if ord(c) < 0x100 else f"\\u{ord(c):04X}" for c in chars)


def marker_start(text: str, marker: str) -> int:
    """How many characters at the end of `text` could be the beginning of `marker` (text to
    hold back until the next piece tells)."""
    start = text.find(marker[0], max(len(text) - len(marker) + 1, 0))
    while start >= 0:
        if marker.startswith(text[start:]):
            return len(text) - start
        start = text.find(marker[0], start + 1)
    return 0


def detect_reasoning(template_text: str | None) -> ReasoningFormat | None:
    """The thinking markers a chat template uses, or None for a template without thinking."""
    text = template_text or ""
    for start, end in MARKERS:
        if start in text and end in text:
            return ReasoningFormat(start, end)
    return None


def template_kwargs(fmt: ReasoningFormat | None, reasoning: bool | None, effort: str | None,
                    given: dict[str, Any]) -> dict[str, Any]:
    """The template variables for a request: its chat_template_kwargs, plus `enable_thinking`
    from `reasoning` (False: off) or `reasoning_effort` ("none": off, any other: on) where the
    template thinks. A contradiction between them is a BadRequest, not a silent choice."""
    wanted = reasoning
    if effort is not None:
        if wanted is not None and wanted != (effort != "none"):
            raise BadRequest(f"reasoning = {str(reasoning).lower()} contradicts reasoning_effort = {effort!r}")
        wanted = effort != "none"
    kwargs = dict(given)
    if fmt is None or wanted is None:
        return kwargs
    if SWITCH in given and given[SWITCH] != wanted:
        raise BadRequest(f"chat_template_kwargs.{SWITCH} = {given[SWITCH]!r} contradicts the request's "
                         f"reasoning setting ({'on' if wanted else 'off'})")
    kwargs[SWITCH] = wanted
    return kwargs


_START, _REASONING_LEAD, _REASONING, _CONTENT_LEAD, _CONTENT = range(5)


class ReasoningSplitter:
    """Raw output in pieces split anywhere, to (content, reasoning) pieces without the markers.

    Whitespace the template puts around the block (`<think>\\n`, `\\n</think>\\n\\n`) is dropped;
    text that could still be a marker is held back until it is clear. An output that never
    closes its block is all reasoning."""

    def __init__(self, fmt: ReasoningFormat, inside: bool) -> None:
        self._fmt = fmt
        self._state = _REASONING_LEAD if inside else _START
        self._held = ""

    def feed(self, text: str) -> tuple[str, str]:
        buf, content, reasoning = self._held + text, [], []
        start, end = self._fmt.start, self._fmt.end
        while buf:
            state = self._state
            if state == _START:
                stripped = buf.lstrip()
                if stripped.startswith(start):
                    buf, self._state = stripped[len(start):], _REASONING_LEAD
                elif not stripped or start.startswith(stripped):
                    break  # still whitespace, or the start marker's beginning
                else:
                    self._state = _CONTENT
            elif state in (_REASONING_LEAD, _CONTENT_LEAD):
                buf = buf.lstrip()
                if buf:
                    self._state = _REASONING if state == _REASONING_LEAD else _CONTENT
            elif state == _REASONING:
                at = buf.find(end)
                if at >= 0:
                    reasoning.append(buf[:at].rstrip())
                    buf, self._state = buf[at + len(end):], _CONTENT_LEAD
                    continue
                # hold back what may begin the end marker, and the whitespace that may precede it
                shown = buf[:len(buf) - marker_start(buf, end)].rstrip()
                reasoning.append(shown)
                buf = buf[len(shown):]
                break
            else:
                content.append(buf)
                buf = ""
        self._held = buf
        return "".join(content), "".join(reasoning)

    def finish(self) -> tuple[str, str]:
        held, self._held = self._held, ""
        if self._state == _START:
            return held, ""
        if self._state == _REASONING:
            return "", held.rstrip()
        return "", ""
