"""Tool calls by model family: how a model is told about tools, how its calls are held to a
grammar; toolparse.py reads the calls back out of the raw output.

A model calls tools the way its chat template taught it, so the format follows the template:

- hermes (Hermes 2/3, Qwen 2.5/3): `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`,
  one block per call;
- llama3 (Llama 3.1-3.3): `{"name": ..., "parameters": {...}}` as the whole answer, or after
  `<|python_tag|>`; one call per answer, as those templates describe;
- mistral (Mistral Nemo, Small 3.0/3.1): `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`;
- generic, for a template that knows no tools (the default model has none at all): llama.cpp's
  generic format, where the whole answer is `{"tool_calls": [{"name": ..., "arguments": {...}}]}`
  or `{"response": "..."}` and a system prompt describes the tools and this format.

The first three templates render the `tools` variable themselves (`ToolFormat.native`); for
generic, `prepare_messages` adds the description and turns earlier calls and results into text,
since the template cannot. Templates whose calls carry XML arguments (Qwen3-Coder's
`<function=...>`, GLM's `<arg_key>`, MiniMax's `<invoke>`, Mistral Small 3.2's `[ARGS]`) are
none of these families and get the generic format, which works with any template.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Sequence
from typing import Any

from .errors import BadRequest
from .generation import Grammar
from .request import Tool, ToolChoice
from .gbnf import literal
from .schema_grammar import GbnfBuilder


class ToolFormat(enum.Enum):
    HERMES = "hermes"
    LLAMA3 = "llama3"
    MISTRAL = "mistral"
    GENERIC = "generic"

    @property
    def native(self) -> bool:
        """The template renders `tools` (and earlier calls and results) itself."""
        return self is not ToolFormat.GENERIC


# What a call is held to from its opening marker on, when the model may also answer in text:
# regular expressions for the engine's lazy grammar, matched against the output as bytes. The
# held output starts at the first group (else the match); a pattern written ^...$ must match
# the whole output. The llama3 JSON pattern admits exactly the grammar's whitespace.
_SPACE_RE = r"(?: |\n{1,2}[ \t]{0,20})?"
# The literal markers of each format, which the parser must see in the output text.
MARKERS: dict[ToolFormat, tuple[str, ...]] = {
    ToolFormat.HERMES: ("<tool_call>", "</tool_call>"),
    ToolFormat.LLAMA3: ("<|python_tag|>",),
    ToolFormat.MISTRAL: ("[TOOL_CALLS]",),
    ToolFormat.GENERIC: (),
}
TRIGGERS: dict[ToolFormat, tuple[str, ...]] = {
    ToolFormat.HERMES: (r"<tool_call>",),
    ToolFormat.LLAMA3: (r"<\|python_tag\|>", rf'^\s*(\{{{_SPACE_RE}"name")[\s\S]*$'),
    ToolFormat.MISTRAL: (r"\[TOOL_CALLS\]",),
}
_XML_ARGUMENTS = ("<function=", "<arg_key>", "<invoke", "[ARGS]")


def detect_format(template_text: str | None) -> ToolFormat:
    """The tool-call format a chat template teaches, from markers in its text."""
    text = template_text or ""
    if any(marker in text for marker in _XML_ARGUMENTS):
        return ToolFormat.GENERIC
    if "[TOOL_CALLS]" in text:
        return ToolFormat.MISTRAL
    if "<tool_call>" in text:
        return ToolFormat.HERMES
    if ("<|python_tag|>" in text or "ipython" in text) and '"parameters"' in text:
        return ToolFormat.LLAMA3
    return ToolFormat.GENERIC


# -- grammar ------------------------------------------------------------------------------


def tool_grammar(fmt: ToolFormat, tools: Sequence[Tool], choice: ToolChoice, parallel: bool) -> Grammar | None:
    """What the output is held to for `choice`: None for "none"; for "required" (or a named
    function) a call of a listed tool (several when `parallel`), arguments matching its
    schema; for "auto" the family formats get a lazy grammar (free text until the opening
    marker, a call from there on) and generic a choice of `{"tool_calls": ...}` and
    `{"response": ...}`. BadRequest names a tool whose parameters cannot be held to."""
    if choice.mode == "none" or not tools:
        return None
    builder = GbnfBuilder()
    calls = [_call_rule(builder, fmt, tool, i) for i, tool in enumerate(tools)
             if choice.function in (None, tool.name)]
    if not calls:
        raise BadRequest(f"tool_choice names function {choice.function!r}, which is not in tools")
    call = builder.rule("call", " | ".join(calls))
    many = parallel and choice.function is None and fmt is not ToolFormat.LLAMA3
    forced = choice.mode == "required" or choice.function is not None
    if fmt is ToolFormat.GENERIC:
        listed = f'"[" space {call} ( "," space {call} )* "]" space' if many else f'"[" space {call} "]" space'
        root = builder.rule("tool-calls", f'"{{" space {literal(json.dumps("tool_calls"))} space ":" space {listed} '
                                          '"}" space')
        if not forced:
            answer = builder.rule("response", f'"{{" space {literal(json.dumps("response"))} space ":" space string '
                                              '"}" space')
            root = f"{root} | {answer}"
        return builder.grammar(root)
    if fmt is ToolFormat.HERMES:
        block = builder.rule("tool-call-block", f'"<tool_call>" space {call} "</tool_call>" space')
        root = f"{block}+" if many else block
    elif fmt is ToolFormat.MISTRAL:
        listed = f'{call} ( "," space {call} )*' if many else call
        root = f'"[TOOL_CALLS]" space "[" space {listed} "]" space'
    else:
        root = f'( "<|python_tag|>" space )? {call}'
    return builder.grammar(root, () if forced else TRIGGERS[fmt])


def _call_rule(builder: GbnfBuilder, fmt: ToolFormat, tool: Tool, i: int) -> str:
    """One call of `tool` as this format writes it: {"name": ..., "arguments": {...}}."""
    where = f"tools[{i}].function.parameters"
    params = tool.parameters
    if not isinstance(params, dict) or params.get("type", "object") != "object":
        raise BadRequest(f"{where} ({tool.name}): must be a JSON schema of an object (\"type\": \"object\")")
    args = builder.schema(params if "type" in params else {"type": "object", **params}, f"{tool.name}-args", where)
    key = "parameters" if fmt is ToolFormat.LLAMA3 else "arguments"
    name = literal(json.dumps(tool.name, ensure_ascii=False))
    body = (f'"{{" space {literal(json.dumps("name"))} space ":" space {name} space "," space '
            f'{literal(json.dumps(key))} space ":" space {args}')
    if fmt is ToolFormat.MISTRAL:  # Mistral's templates show each call with a 9-character id
        body += f' ( "," space {literal(json.dumps("id"))} space ":" space "\\"" [a-zA-Z0-9]{{9}} "\\"" space )?'
    return builder.rule(f"{tool.name}-call", f'{body} "}}" space')


# -- prompt (generic format) -----------------------------------------------------------------


def prepare_messages(fmt: ToolFormat, messages: list[dict[str, Any]], tools: Sequence[Tool],
                     choice: ToolChoice) -> list[dict[str, Any]]:
    """Messages (template dicts) for a template that cannot render tools: the generic
    format's instructions in the system message (when tools are offered), earlier calls as the
    JSON the model is asked to write, and tool results as user turns. Native formats get the
    messages unchanged."""
    if fmt.native:
        return list(messages)
    out: list[dict[str, Any]] = []
    names: dict[str, str] = {}  # call id -> function name, for results that do not name theirs
    results = False  # the last message out is tool results
    for message in messages:
        if message.get("role") == "tool":
            result = {"tool_response": {"id": message.get("tool_call_id"),
                                        "name": message.get("name") or names.get(message.get("tool_call_id"), ""),
                                        "content": message.get("content", "")}}
            text = json.dumps(result, ensure_ascii=False)
            if results:  # consecutive results: one user turn
                out[-1] = {**out[-1], "content": out[-1]["content"] + "\n" + text}
            else:
                out.append({"role": "user", "content": text})
            results = True
            continue
        results = False
        if message.get("tool_calls"):
            calls = [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]}
                     for c in message["tool_calls"]]
            names.update((c.get("id"), c["function"]["name"]) for c in message["tool_calls"])
            text = json.dumps({"tool_calls": calls}, ensure_ascii=False)
            content = message.get("content") or ""
            rest = {k: v for k, v in message.items() if k != "tool_calls"}
            out.append({**rest, "content": f"{content}\n{text}" if content else text})
        else:
            out.append(dict(message))
    if tools and choice.mode != "none":
        instructions = _instructions(tools, choice)
        if out and out[0].get("role") == "system":
            out[0] = {**out[0], "content": f"{out[0].get('content') or ''}\n\n{instructions}".lstrip()}
        else:
            out.insert(0, {"role": "system", "content": instructions})
    return out


def _instructions(tools: Sequence[Tool], choice: ToolChoice) -> str:
    listing = "\n".join(json.dumps({"name": t.name, "description": t.description, "parameters": t.parameters},
                                   ensure_ascii=False) for t in tools)
    call = '{"tool_calls": [{"name": "<tool name>", "arguments": {<arguments>}}]}'
    if choice.function is not None:
        how = (f"You must call the tool {json.dumps(choice.function)}: answer with "
               f'{{"tool_calls": [{{"name": {json.dumps(choice.function)}, "arguments": {{<arguments>}}}}]}}')
    elif choice.mode == "required":
        how = f"You must call one or more tools: answer with {call}"
    else:
        how = (f"Answer with {call} to call one or more tools, or with "
               '{"response": "<your answer>"} to answer directly')
    return ("You can call these tools; each line gives a tool's name, what it does and the JSON schema of "
            f"its arguments:\n{listing}\n\nReply with one JSON object and nothing else. {how}. "
            'Tool results come back as {"tool_response": ...}.')
