"""Tool calls by model family: the format a template teaches, the grammar that holds a call
(checked with llama.cpp's own grammar engine), the generic format's prompt, and the parser that
turns raw output, in pieces cut anywhere, into answer text and OpenAI-style call deltas."""

from __future__ import annotations

import json
import random
import re
import zlib

import numpy as np
import jsonschema
import pytest
from grammar_checker import GrammarChecker

from corral.backend.chat import BUILTIN_TEMPLATES
from corral.backend.errors import BadRequest
from corral.backend.generation import Grammar, ToolCallDelta
from corral.backend.request import Message, Tool, ToolCall, ToolChoice
from corral.backend.toolcalls import ToolFormat, detect_format, prepare_messages, tool_grammar
from corral.backend.toolparse import new_parser


WEATHER = Tool("get_weather", "Current weather in a city",
               {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                 "unit": {"enum": ["C", "F"]}}, "required": ["city"]})
ADD = Tool("add", "", {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                       "required": ["a", "b"], "additionalProperties": False})
NOTHING = Tool("ping", "", {"type": "object", "properties": {}})
TOOLS = (WEATHER, ADD, NOTHING)
HERMES, LLAMA3, MISTRAL, GENERIC = ToolFormat.HERMES, ToolFormat.LLAMA3, ToolFormat.MISTRAL, ToolFormat.GENERIC

# excerpts of real templates (llama.cpp's models/templates), enough to tell the family
QWEN25 = ('{{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments '
          'within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": '
          '<args-json-object>}\\n</tool_call><|im_end|>\\n" }}')
LLAMA31 = ('{{- "Environment: ipython\\n" }}{{- \'Respond in the format {"name": function name, "parameters": '
           'dictionary of argument name and its value}.\' }}{{- "<|python_tag|>" + tool_call.name + ".call(" }}')
LLAMA32 = ('{{- "Environment: ipython\\n" }}{{- \'"parameters": \' }}'
           "{%- elif message.role == \"tool\" or message.role == \"ipython\" %}")
NEMO = '{%- elif message.tool_calls is defined %}{{- "[TOOL_CALLS][" }}{{- "[AVAILABLE_TOOLS][" }}'
SMALL32 = "{{- '[TOOL_CALLS]' + tool_call.function.name + '[ARGS]' + arguments }}"
QWEN3_CODER = "{{- '<tool_call>\\n<function=' + tool_call.name + '>\\n' }}{{- '<parameter=' + args_name }}"
GLM = "{{- '<tool_call>' + tc.name }}{{ '<arg_key>' + k + '</arg_key>' }}"


@pytest.mark.parametrize(("template", "fmt"), [
    (QWEN25, HERMES), (LLAMA31, LLAMA3), (LLAMA32, LLAMA3), (NEMO, MISTRAL), (SMALL32, GENERIC),
    (QWEN3_CODER, GENERIC), (GLM, GENERIC), (BUILTIN_TEMPLATES["gemma"], GENERIC),
    (BUILTIN_TEMPLATES["chatml"], GENERIC),
    ("", GENERIC), (None, GENERIC),
])
def test_the_format_follows_the_template(template: str | None, fmt: ToolFormat) -> None:
    assert detect_format(template) is fmt
    assert fmt.native is (fmt is not GENERIC)


# -- parsing ---------------------------------------------------------------------------------

def _parse(fmt: ToolFormat, pieces: list[str]) -> tuple[str, list[tuple[str, str]], list[ToolCallDelta]]:
    parser = new_parser(fmt, TOOLS)
    content, deltas = "", []
    for piece in pieces:
        more, calls = parser.feed(piece)
        content, deltas = content + more, deltas + calls
    more, calls = parser.finish()
    content, deltas = content + more, deltas + calls
    assert parser.calls == len({d.index for d in deltas})
    named: dict[int, list[str]] = {}
    for delta in deltas:
        if delta.id is not None:
            assert delta.index == len(named) and delta.name is not None
            named[delta.index] = [delta.name, ""]
        else:
            assert delta.name is None and delta.index in named
        named[delta.index][1] += delta.arguments
    return content, [(name, args) for name, args in named.values()], deltas


def _splits(text: str) -> list[list[str]]:
    rng = random.Random(text)
    ways = [[text], list(text)]
    for _ in range(12):
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 8))))
        ways.append([text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])])
    return ways


CALL_A = '{"name": "add", "arguments": {"a": 1, "b": 2}}'
CALL_W = '{"name": "get_weather", "arguments": {"city": "Paris \\"}\\" <tool_call>", "unit": "C"}}'
CALL_OSLO = '{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "C"}}'
PARSED_A = ("add", '{"a": 1, "b": 2}')
PARSED_W = ("get_weather", '{"city": "Paris \\"}\\" <tool_call>", "unit": "C"}')
PARSES = [
    # hermes
    (HERMES, f"<tool_call>\n{CALL_A}\n</tool_call>", "", [PARSED_A]),
    (HERMES, f"Let me look.\n<tool_call>\n{CALL_W}\n</tool_call>\n<tool_call>\n{CALL_A}\n</tool_call>",
     "Let me look.\n", [PARSED_W, PARSED_A]),
    (HERMES, f"<tool_call>{CALL_A}</tool_call>\n\nDone.", "Done.", [PARSED_A]),
    (HERMES, '<tool_call>\n{"arguments": {"b": 2, "a": 1}, "name": "add"}\n</tool_call>', "",
     [("add", '{"b": 2, "a": 1}')]),
    (HERMES, '<tool_call>\n{"name": "add", "arguments": "{\\"a\\": 1, \\"b\\": 2}"}\n</tool_call>', "",
     [("add", '{"a": 1, "b": 2}')]),
    (HERMES, "a <tool_ca b <tool_call>not a call</tool_call> c",
     "a <tool_ca b <tool_call>not a call</tool_call> c", []),
    (HERMES, '<tool_call>\n{"name": "unknown", "arguments": {}}\n</tool_call>',
     '<tool_call>\n{"name": "unknown", "arguments": {}}\n</tool_call>', []),
    (HERMES, 'x <tool_call>\n{"name": "ad', 'x <tool_call>\n{"name": "ad', []),
    # cut short: the call as far as it got
    (HERMES, 'x <tool_call>\n{"name": "add", "arguments": {"a": 1', "x ", [("add", '{"a": 1')]),
    (HERMES, "<tool_call", "<tool_call", []),
    (HERMES, '<tool_call>{"arguments": {}, "name": ["add"]}</tool_call>',
     '<tool_call>{"arguments": {}, "name": ["add"]}</tool_call>', []),
    # llama3
    (LLAMA3, '{"name": "add", "parameters": {"a": 1, "b": 2}}', "", [PARSED_A]),
    (LLAMA3, ' <|python_tag|>{"name": "add", "parameters": {"a": 1, "b": 2}}', " ", [PARSED_A]),
    (LLAMA3, '{"name": "add", "parameters": {"a": 1, "b": 2}}; {"name": "ping", "parameters": {}}', "",
     [PARSED_A, ("ping", "{}")]),
    (LLAMA3, ' {"answer": 42} and {"name": "add"}', ' {"answer": 42} and {"name": "add"}', []),
    (LLAMA3, "<|python_tag|>brave_search.call(query=\"x\")", "<|python_tag|>brave_search.call(query=\"x\")", []),
    (LLAMA3, "The sum is 3.", "The sum is 3.", []),
    # mistral
    (MISTRAL, f"[TOOL_CALLS][{CALL_A}]", "", [PARSED_A]),
    (MISTRAL, f'Sure[TOOL_CALLS] [{CALL_W[:-1]}, "id": "a1B2c3D4e"}}, {CALL_A}]', "Sure", [PARSED_W, PARSED_A]),
    (MISTRAL, f"[TOOL_CALLS]{CALL_A}", "", [PARSED_A]),
    (MISTRAL, f"[TOOL_CALLS][{CALL_A}, oops", ", oops", [PARSED_A]),
    (MISTRAL, "[TOOL_CALLS]oops", "[TOOL_CALLS]oops", []),
    # generic
    (GENERIC, '{"response": "Hi \\"you\\"\\n\\u00e9\\ud83d\\ude00 {\\"x\\"}"}\n', 'Hi "you"\né😀 {"x"}', []),
    (GENERIC, f'{{"tool_calls": [{CALL_A}, {CALL_W}]}}', "", [PARSED_A, PARSED_W]),
    (GENERIC, f'\n{{ "tool_calls" : [ {CALL_A} ] }} ', "", [PARSED_A]),
    (GENERIC, f'{{"tool_call": {CALL_A}}}', "", [("add", '{"a": 1, "b": 2}')]),
    (GENERIC, '{"content": "x", "response": "y"}', "y", []),
    (GENERIC, "Plain words, no JSON.", "Plain words, no JSON.", []),
    (GENERIC, '{"tool_calls": [{"name": "nope", "arguments": {}}]}',
     '{"tool_calls": [{"name": "nope", "arguments": {}}]}', []),
    (GENERIC, '{"answer": 42} then', '{"answer": 42} then', []),
    (GENERIC, '{"response": "cut sho', "cut sho", []),
    (GENERIC, '{"response": "bad \\q escape"}', 'bad \\q escape"}', []),
]


@pytest.mark.parametrize(("fmt", "text", "content", "calls"), PARSES,
                         ids=[f"{p[0].value}-{i}" for i, p in enumerate(PARSES)])
def test_output_splits_into_content_and_calls_however_it_is_cut(fmt: ToolFormat, text: str, content: str,
                                                                calls: list[tuple[str, str]]) -> None:
    for pieces in _splits(text):
        got_content, got_calls, _ = _parse(fmt, pieces)
        assert (got_content, got_calls) == (content, calls), pieces


def test_a_call_streams_as_deltas_with_an_id_and_name_first() -> None:
    parser = new_parser(HERMES, TOOLS)
    assert parser.feed("I'll add.\n<tool_") == ("I'll add.\n", [])  # the marker's start is held back
    assert parser.feed('call>\n{"name": "add", "argu') == ("", [])
    content, deltas = parser.feed('ments": {"a": 1')
    assert content == "" and len(deltas) == 1
    first = deltas[0]
    assert (first.index, first.name, first.arguments) == (0, "add", '{"a": 1')
    assert re.fullmatch(r"call_[A-Za-z0-9]{24}", first.id or "")
    assert parser.feed(', "b": 2}}\n</tool_call>\n') == ("", [ToolCallDelta(0, arguments=', "b": 2}')])
    assert parser.calls == 1
    content, deltas = parser.feed(f"<tool_call>{CALL_A}</tool_call>")
    assert [d.index for d in deltas] == [1] and deltas[0].id not in (None, first.id)
    assert parser.finish() == ("", [])


@pytest.mark.parametrize("fmt, pieces", [
    (GENERIC, ['{"tool_calls": [', CALL_A, ',\n  {"name": "get_weather",']),  # cut in the next call's header
    (GENERIC, ['{"tool_calls": [', CALL_A, ', {"name": "add", "arguments": {"a": 1']),  # in its arguments
    (HERMES, [f"<tool_call>{CALL_A}</tool_call>\n<tool_call>\n{{\"name\": \"ad"]),
])
def test_a_call_cut_off_by_the_end_never_leaks_into_the_answer(fmt: ToolFormat, pieces: list[str]) -> None:
    content, calls, _ = _parse(fmt, pieces)
    assert content.strip() == "" and calls[0] == ("add", '{"a": 1, "b": 2}')


def test_mistral_ids_are_the_nine_characters_its_template_demands() -> None:
    _, _, deltas = _parse(MISTRAL, [f"[TOOL_CALLS][{CALL_A}]"])
    assert re.fullmatch(r"[A-Za-z0-9]{9}", deltas[0].id or "")


def test_a_generic_answer_streams_its_text() -> None:
    parser = new_parser(GENERIC, TOOLS)
    assert parser.feed('{"response": "Hel') == ("Hel", [])
    assert parser.feed('lo\\') == ("lo", [])  # the escape's second half is still to come
    assert parser.feed('n"}') == ("\n", [])
    assert parser.finish() == ("", [])


# -- grammars ----------------------------------------------------------------------------------

CHOICES = [ToolChoice("required"), ToolChoice("auto"), ToolChoice("required", "add")]


@pytest.mark.parametrize("fmt", list(ToolFormat))
def test_every_tool_grammar_parses_in_llama_cpp(checker: GrammarChecker, fmt: ToolFormat) -> None:
    for choice in CHOICES:
        for parallel in (True, False):
            grammar = tool_grammar(fmt, TOOLS, choice, parallel)
            assert grammar is not None and checker.parses(grammar), grammar
            assert bool(grammar.triggers) is (choice.mode == "auto" and choice.function is None and fmt is not GENERIC)
    assert tool_grammar(fmt, TOOLS, ToolChoice("none"), True) is None


A_CALL = {HERMES: f"<tool_call>\n{CALL_A}\n</tool_call>", LLAMA3: '{"name": "add", "parameters": {"a": 1, "b": 2}}',
          MISTRAL: f"[TOOL_CALLS][{CALL_A}]", GENERIC: f'{{"tool_calls": [{CALL_A}]}}'}
TWO_CALLS = {HERMES: f"<tool_call>\n{CALL_A}\n</tool_call>\n<tool_call>\n{CALL_OSLO}\n</tool_call>",
             MISTRAL: f'[TOOL_CALLS][{CALL_A}, {CALL_OSLO[:-1]}, "id": "a1B2c3D4e"}}]',
             GENERIC: f'{{"tool_calls": [{CALL_A}, {CALL_OSLO}]}}'}
BAD_CALLS = {HERMES: ['<tool_call>\n{"name": "add", "arguments": {"a": 1}}\n</tool_call>',
                      '<tool_call>\n{"name": "sub", "arguments": {"a": 1, "b": 2}}\n</tool_call>',
                      f"Sure! <tool_call>\n{CALL_A}\n</tool_call>"],
             LLAMA3: ['{"name": "add", "arguments": {"a": 1, "b": 2}}',
                      '{"name": "add", "parameters": {"a": "1", "b": 2}}'],
             MISTRAL: ['[TOOL_CALLS][{"name": "add", "arguments": {"a": 1, "b": 2, "c": 3}}]',
                       f'[TOOL_CALLS][{CALL_A[:-1]}, "id": "short"}}]'],
             GENERIC: ['{"response": "hi"}', '{"tool_calls": []}',
                       '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Llanfairpwllgwyngyll"}}]}']}


@pytest.mark.parametrize("fmt", list(ToolFormat))
def test_a_required_call_is_held_to_the_tools_and_their_schemas(checker: GrammarChecker, fmt: ToolFormat) -> None:
    grammar = tool_grammar(fmt, TOOLS, ToolChoice("required"), parallel=True)
    assert grammar is not None
    assert checker.accepts(grammar, A_CALL[fmt])
    for text in BAD_CALLS[fmt]:
        assert not checker.accepts(grammar, text), text
    if fmt in TWO_CALLS:
        assert checker.accepts(grammar, TWO_CALLS[fmt])
        single = tool_grammar(fmt, TOOLS, ToolChoice("required"), parallel=False)
        assert single is not None and not checker.accepts(single, TWO_CALLS[fmt])
    named = tool_grammar(fmt, TOOLS, ToolChoice("required", "get_weather"), parallel=True)
    assert named is not None and not checker.accepts(named, A_CALL[fmt])


def test_generic_auto_lets_the_model_answer_or_call(checker: GrammarChecker) -> None:
    grammar = tool_grammar(GENERIC, TOOLS, ToolChoice("auto"), parallel=True)
    assert grammar is not None
    assert checker.accepts(grammar, '{"response": "It is sunny."}')
    assert checker.accepts(grammar, A_CALL[GENERIC])
    assert not checker.accepts(grammar, "It is sunny.")


def _held_from(grammar: Grammar, output: str) -> str | None:
    """The output from where the engine's lazy grammar takes hold (samplers.py's rule, which is
    llama.cpp's): a ^...$ trigger matches the whole output, others anywhere; the held text starts
    at the first non-empty group, else at the match."""
    data = output.encode()
    for trigger in grammar.triggers:
        pattern = re.compile(trigger.encode())
        whole = len(trigger) > 1 and trigger.startswith("^") and trigger.endswith("$")
        match = pattern.fullmatch(data) if whole else pattern.search(data)
        if match:
            starts = [match.start(g) for g in range(1, pattern.groups + 1) if match.end(g) > match.start(g)]
            return data[(starts or [match.start()])[0]:].decode()
    return None


@pytest.mark.parametrize("fmt", [HERMES, LLAMA3, MISTRAL])
def test_an_auto_call_is_held_from_its_marker_on(checker: GrammarChecker, fmt: ToolFormat) -> None:
    grammar = tool_grammar(fmt, TOOLS, ToolChoice("auto"), parallel=True)
    assert grammar is not None
    assert _held_from(grammar, "The weather is fine, no call needed.") is None
    prefix = "" if fmt is LLAMA3 else "Let me check that. "
    held = _held_from(grammar, prefix + A_CALL[fmt])
    assert held == A_CALL[fmt] and checker.accepts(grammar, held)
    if fmt is LLAMA3:
        tagged = "Checking. <|python_tag|>" + A_CALL[fmt]
        held = _held_from(grammar, tagged)
        assert held == "<|python_tag|>" + A_CALL[fmt] and checker.accepts(grammar, held)
        for start in ('{"name"', '{ "name"', '{\n  "name"'):  # the trigger fires where the grammar can follow
            held = _held_from(grammar, "  " + start)
            assert held == start
            assert checker.accepts(grammar, held + A_CALL[fmt][len('{"name"'):])


@pytest.mark.parametrize("fmt", list(ToolFormat))
def test_what_the_grammar_lets_through_parses_into_valid_calls(checker: GrammarChecker, fmt: ToolFormat) -> None:
    grammar = tool_grammar(fmt, TOOLS, ToolChoice("required"), parallel=True)
    assert grammar is not None
    schemas = {tool.name: jsonschema.Draft202012Validator(tool.parameters) for tool in TOOLS}
    rng = np.random.default_rng(zlib.crc32(fmt.value.encode()))
    walked = [text for text in (checker.walk(grammar, rng, max_tokens=1000) for _ in range(6)) if text is not None]
    assert len(walked) >= 3
    for text in walked:
        content, calls, _ = _parse(fmt, list(text))
        assert content == "" and calls, text
        for name, args in calls:
            assert schemas[name].is_valid(json.loads(args)), (text, args)


def test_a_tool_whose_parameters_are_no_object_schema_is_refused_by_name() -> None:
    bad = Tool("lookup", "", {"type": "string"})
    with pytest.raises(BadRequest,
                       match=r"tools\[1\]\.function\.parameters \(lookup\): must be a JSON schema of an object"):
        tool_grammar(HERMES, (WEATHER, bad), ToolChoice("required"), parallel=True)
    odd = Tool("find", "", {"type": "object", "properties": {"q": {"type": "string", "pattern": "^a"}}})
    with pytest.raises(BadRequest,
                       match=r"tools\[0\]\.function\.parameters\.properties\.q: keyword 'pattern' is not supported"):
        tool_grammar(GENERIC, (odd,), ToolChoice("auto"), parallel=True)


def test_parameters_without_a_type_still_give_an_object(checker: GrammarChecker) -> None:
    loose = Tool("any", "", {})
    grammar = tool_grammar(HERMES, (loose,), ToolChoice("required"), parallel=False)
    assert grammar is not None
    assert checker.accepts(grammar, '<tool_call>{"name": "any", "arguments": {"x": [1]}}</tool_call>')
    assert not checker.accepts(grammar, '<tool_call>{"name": "any", "arguments": [1]}</tool_call>')


# -- the generic format's prompt ----------------------------------------------------------------

def test_generic_messages_describe_the_tools_and_render_the_round_trip() -> None:
    history = [Message("system", "Be brief."), Message("user", "Weather in Paris, and 1+2?"),
               Message("assistant", "", (ToolCall("call_1", "get_weather", '{"city": "Paris"}'),
                                         ToolCall("call_2", "add", '{"a": 1, "b": 2}'))),
               Message("tool", "18C", tool_call_id="call_1"), Message("tool", "3", tool_call_id="call_2", name="add"),
               Message("user", "Thanks")]
    messages = prepare_messages(GENERIC, [m.template_dict() for m in history], TOOLS, ToolChoice("auto"))
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "user"]
    system = messages[0]["content"]
    assert system.startswith("Be brief.\n\n") and '"get_weather"' in system and '{"response"' in system
    assert json.loads(messages[2]["content"]) == {"tool_calls": [
        {"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "add", "arguments": {"a": 1, "b": 2}}]}
    results = [json.loads(line)["tool_response"] for line in messages[3]["content"].splitlines()]
    assert results == [{"id": "call_1", "name": "get_weather", "content": "18C"},
                       {"id": "call_2", "name": "add", "content": "3"}]
    assert all("tool_calls" not in m and "tool_call_id" not in m for m in messages)

    required = prepare_messages(GENERIC, [{"role": "user", "content": "hi"}], TOOLS, ToolChoice("required", "add"))
    assert required[0]["role"] == "system" and 'You must call the tool "add"' in required[0]["content"]
    plain = prepare_messages(GENERIC, [m.template_dict() for m in history], (), ToolChoice("auto"))
    assert plain[0] == {"role": "system", "content": "Be brief."}
    native = [m.template_dict() for m in history]
    assert prepare_messages(HERMES, native, TOOLS, ToolChoice("auto")) == native


def test_the_instructions_fit_the_grammar(checker: GrammarChecker) -> None:
    """The examples the generic prompt shows are answers its grammar accepts (names filled in)."""
    text = prepare_messages(GENERIC, [{"role": "user", "content": "x"}], (NOTHING,), ToolChoice("auto"))[0]["content"]
    grammar = tool_grammar(GENERIC, (NOTHING,), ToolChoice("auto"), parallel=True)
    assert grammar is not None
    call = '{"tool_calls": [{"name": "<tool name>", "arguments": {<arguments>}}]}'
    answer = '{"response": "<your answer>"}'
    assert call in text and answer in text
    assert checker.accepts(grammar, call.replace("<tool name>", "ping").replace("{<arguments>}", "{}"))
    assert checker.accepts(grammar, answer)

