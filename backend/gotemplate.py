"""The part of Go's text/template that ollama's `/api/generate` `template` field uses.

ollama's clients may send a prompt template of their own with a generate request, written in Go's
template language over `.System`, `.Prompt` and `.Response`. corral renders that subset:
`{{ .Name }}`, `{{ if .Name }} … {{ else }} … {{ end }}`, `{{/* comments */}}` and the `{{-` /
`-}}` whitespace trims. Rendering stops at `{{ .Response }}`: what follows it is the end of the
model's turn, which the model writes. Anything else (ranges over `.Messages`, functions,
pipelines) is refused by name rather than rendered wrongly.
"""

from __future__ import annotations

import re

from .errors import BadRequest

FIELDS = ("System", "Prompt", "Response")
_ACTION = re.compile(r"\{\{(-?)\s*(.*?)\s*(-?)\}\}", re.S)
_FIELD = re.compile(r"\.([A-Za-z]+)")
_MAX_DEPTH = 32


class _Stop(Exception):
    """`{{ .Response }}` was reached: the prompt ends there."""


def render(template: str, values: dict[str, str]) -> str:
    """`template` with `values` (keyed by FIELDS) filled in, up to `{{ .Response }}`."""
    nodes, _ = _parse(_tokens(template), 0, None)
    out: list[str] = []
    try:
        _run(nodes, values, out)
    except _Stop:
        pass
    return "".join(out)


def _tokens(template: str) -> list[tuple[str, str]]:
    """Text and action tokens, with the trims applied to the neighbouring text."""
    tokens: list[tuple[str, str]] = []
    position, trim_next = 0, False
    for match in _ACTION.finditer(template):
        text = template[position:match.start()]
        if trim_next:
            text = text.lstrip()
        if match.group(1):
            text = text.rstrip()
        if text:
            tokens.append(("text", text))
        action = match.group(2)
        if not (action.startswith("/*") and action.endswith("*/")):
            tokens.append(("action", action))
        position, trim_next = match.end(), bool(match.group(3))
    text = template[position:]
    if "{{" in text:
        raise BadRequest("template: an action opened with {{ is never closed with }}")
    tokens.append(("text", text.lstrip() if trim_next else text))
    return tokens


Node = tuple  # ("text", str) | ("field", name) | ("if", name, then_nodes, else_nodes)


def _parse(tokens: list[tuple[str, str]], depth: int, stop: set[str] | None) -> tuple[list[Node], str | None]:
    """Nodes up to an `else`/`end` (returned as the second item) or the end of the tokens."""
    nodes: list[Node] = []
    while tokens:
        kind, value = tokens.pop(0)
        if kind == "text":
            nodes.append(("text", value))
        elif value in ("else", "end"):
            if stop is None or value not in stop:
                raise BadRequest(f"template: {{{{ {value} }}}} without a matching {{{{ if }}}}")
            return nodes, value
        elif value.startswith("if "):
            if depth >= _MAX_DEPTH:
                raise BadRequest(f"template: more than {_MAX_DEPTH} nested ifs")
            name = _field(value[3:].strip(), value)
            then, closer = _parse(tokens, depth + 1, {"else", "end"})
            otherwise: list[Node] = []
            if closer == "else":
                otherwise, closer = _parse(tokens, depth + 1, {"end"})
            if closer != "end":
                raise BadRequest(f"template: {{{{ {value} }}}} is never closed with {{{{ end }}}}")
            nodes.append(("if", name, then, otherwise))
        else:
            nodes.append(("field", _field(value, value)))
    return nodes, None


def _field(expression: str, action: str) -> str:
    match = _FIELD.fullmatch(expression)
    if match is None or match.group(1) not in FIELDS:
        raise BadRequest(f"template: {{{{ {action} }}}} is not supported; corral renders "
                         f"{', '.join('.' + f for f in FIELDS)} with if/else/end")
    return match.group(1)


def _run(nodes: list[Node], values: dict[str, str], out: list[str]) -> None:
    for node in nodes:
        if node[0] == "text":
            out.append(node[1])
        elif node[0] == "field":
            if node[1] == "Response":
                raise _Stop()
            out.append(values.get(node[1], ""))
        else:
            _, name, then, otherwise = node
            _run(then if values.get(name) else otherwise, values, out)
