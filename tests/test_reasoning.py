"""Thinking text: which templates think, whether the prompt already opened the block, how a
request turns thinking off, how output in pieces cut anywhere splits into reasoning and answer,
and a grammar that lets the thinking block through before the shape it holds."""

from __future__ import annotations

import random

import pytest
from grammar_checker import GrammarChecker

from corral.backend.chat import BUILTIN_TEMPLATES, ChatTemplate
from corral.backend.errors import BadRequest
from corral.backend.reasoning import ReasoningFormat, detect_reasoning, template_kwargs
from corral.backend.request import Tool, ToolChoice
from corral.backend.schema_grammar import schema_grammar
from corral.backend.toolcalls import ToolFormat, tool_grammar

THINK = ReasoningFormat("<think>", "</think>")

# the generation prompt of Qwen3 (the model opens the block) and of Qwen3.5 / QwQ (the template does)
QWEN3 = ("{%- for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{%- endfor %}"
         "{%- if '</think>' in content %}{%- endif %}"
         "{%- if add_generation_prompt %}<|im_start|>assistant\n"
         "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}"
         "{%- endif %}{%- endif %}")
QWEN35 = ("{%- for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{%- endfor %}"
          "{%- if add_generation_prompt %}<|im_start|>assistant\n"
          "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}"
          "{%- else %}{{- '<think>\\n' }}{%- endif %}{%- endif %}")
R1 = "{% if add_generation_prompt %}{{'<｜Assistant｜><think>\\n'}}{% endif %}{% set c = c.split('</think>')[-1] %}"


@pytest.mark.parametrize(("template", "found"), [
    (QWEN3, THINK), (QWEN35, THINK), (R1, THINK),
    ("{{ '[THINK]' }}{{ x }}{{ '[/THINK]' }}", ReasoningFormat("[THINK]", "[/THINK]")),
    ("<seed:think>{{ t }}</seed:think> enable_thinking", ReasoningFormat("<seed:think>", "</seed:think>")),
    (BUILTIN_TEMPLATES["chatml"], None), (BUILTIN_TEMPLATES["gemma"], None), ("", None), (None, None),
])
def test_thinking_follows_the_template(template: str | None, found: ReasoningFormat | None) -> None:
    assert detect_reasoning(template) == found


def _render(template: str, **kwargs: object) -> str:
    return ChatTemplate("gguf", template, "", "").render([{"role": "user", "content": "hi"}], **kwargs)


def test_the_prompt_tells_whether_the_output_starts_inside_the_block() -> None:
    assert not THINK.opened_by(_render(QWEN3))
    assert not THINK.opened_by(_render(QWEN3, enable_thinking=False))
    assert THINK.opened_by(_render(QWEN35))
    assert not THINK.opened_by(_render(QWEN35, enable_thinking=False))
    assert THINK.opened_by("<｜User｜>hi<｜Assistant｜><think>\n")


def _split(fmt: ReasoningFormat, inside: bool, pieces: list[str]) -> tuple[str, str]:
    splitter = fmt.splitter(inside)
    content = reasoning = ""
    for piece in pieces:
        c, r = splitter.feed(piece)
        content, reasoning = content + c, reasoning + r
    c, r = splitter.finish()
    return content + c, reasoning + r


SPLITS = [
    (False, "<think>\nLet me think.\n</think>\n\nThe answer is 4.", "The answer is 4.", "Let me think."),
    (False, "  <think>a <b> </thin c</think>d", "d", "a <b> </thin c"),
    (False, "No thinking here, though I mention <think> and </think>.",
     "No thinking here, though I mention <think> and </think>.", ""),
    (False, "<thi", "<thi", ""),
    (False, "\n\n", "\n\n", ""),
    (True, "Okay, 2+2.\n</think>\n\n4", "4", "Okay, 2+2."),
    (True, "\n</think>\n\n4 </think>", "4 </think>", ""),
    (True, "still thinking when cut</th", "", "still thinking when cut</th"),
    (True, "a \n b   </think>c", "c", "a \n b"),
]


@pytest.mark.parametrize(("inside", "text", "content", "reasoning"), SPLITS)
def test_output_splits_into_reasoning_and_answer_however_it_is_cut(inside: bool, text: str, content: str,
                                                                   reasoning: str) -> None:
    rng = random.Random(text)
    ways = [[text], list(text)]
    for _ in range(12):
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 6))))
        ways.append([text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])])
    for pieces in ways:
        assert _split(THINK, inside, pieces) == (content, reasoning), pieces


def test_reasoning_streams_while_it_is_written() -> None:
    splitter = THINK.splitter(inside=False)
    assert splitter.feed("<think>\nFirst") == ("", "First")
    assert splitter.feed(" step\n</th") == ("", " step")  # the newline may precede the end marker
    assert splitter.feed("ink>\n\nAns") == ("Ans", "")  # whitespace after the block is dropped
    assert splitter.feed("wer") == ("wer", "")
    assert splitter.finish() == ("", "")
    assert _split(ReasoningFormat("[THINK]", "[/THINK]"), False, ["[THINK]x[/THI", "NK]y"]) == ("y", "x")


def test_answer_text_after_the_block_streams() -> None:
    splitter = THINK.splitter(inside=True)
    assert splitter.feed("ok</think>\n") == ("", "ok")
    assert splitter.feed("An") == ("An", "")
    assert splitter.feed("swer") == ("swer", "")
    assert splitter.finish() == ("", "")


@pytest.mark.parametrize(("reasoning", "effort", "given", "expected"), [
    (None, None, {}, {}),
    (False, None, {}, {"enable_thinking": False}),
    (True, None, {"x": 1}, {"x": 1, "enable_thinking": True}),
    (None, "none", {}, {"enable_thinking": False}),
    (None, "high", {}, {"enable_thinking": True}),
    (False, "none", {"enable_thinking": False}, {"enable_thinking": False}),
    (None, None, {"enable_thinking": False}, {"enable_thinking": False}),
])
def test_a_request_turns_thinking_off_through_the_template(reasoning: bool | None, effort: str | None,
                                                           given: dict[str, object],
                                                           expected: dict[str, object]) -> None:
    assert template_kwargs(THINK, reasoning, effort, given) == expected


def test_contradictions_are_refused_and_templates_without_thinking_are_left_alone() -> None:
    with pytest.raises(BadRequest, match="contradicts reasoning_effort = 'high'"):
        template_kwargs(THINK, False, "high", {})
    with pytest.raises(BadRequest, match="chat_template_kwargs.enable_thinking = True contradicts"):
        template_kwargs(THINK, None, "none", {"enable_thinking": True})
    assert template_kwargs(None, False, None, {"y": 2}) == {"y": 2}
    assert _render(QWEN3, **template_kwargs(THINK, False, None, {})).endswith("<think>\n\n</think>\n\n")


def test_a_held_answer_may_think_first(checker: GrammarChecker) -> None:
    grammar = schema_grammar({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]})
    before = THINK.allow_thinking(grammar, inside=False)
    assert checker.parses(before)
    assert checker.accepts(before, '{"a": 1}')
    assert checker.accepts(before, '<think>\nhm, </thin <</ k\n</think>\n\n{"a": 1}')
    assert not checker.accepts(before, '<think>x</think> more</think>{"a": 1}')
    assert not checker.accepts(before, 'prose {"a": 1}')
    inside = THINK.allow_thinking(grammar, inside=True)
    assert checker.accepts(inside, 'so <</think>{"a": 1}')
    assert not checker.accepts(inside, '{"a": 1}')
    for start, end in (("[THINK]", "[/THINK]"), ("<|START_THINKING|>", "<|END_THINKING|>")):
        other = ReasoningFormat(start, end).allow_thinking(grammar, inside=False)
        assert checker.accepts(other, f'{start}x [/ <|END{end}{{"a": 1}}')
    required = tool_grammar(ToolFormat.HERMES, (Tool("f"),), ToolChoice("required"), parallel=False)
    assert required is not None
    assert checker.accepts(THINK.allow_thinking(required, inside=True),
                           'call f</think>\n<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>')
    lazy = tool_grammar(ToolFormat.HERMES, (Tool("f"),), ToolChoice("auto"), parallel=False)
    assert lazy is not None and THINK.allow_thinking(lazy, inside=True) is lazy
