"""JSON schemas as GBNF grammars, so llama.cpp holds an answer to JSON that matches a schema.

The rule is soundness: every text a grammar from here accepts is JSON that validates against
the schema. A grammar may accept less than the schema allows (the restrictions below), never
more, and a keyword the conversion cannot honour is refused with a `BadRequest` that names the
keyword and where it is, instead of being dropped silently.

This is corral's own converter, not `llama_cpp.llama_grammar.json_schema_to_gbnf` (0.3.36),
because that one is not sound: it lets raw control characters into strings, does not escape a
backslash in `enum`/`const` literals (`"a\\nb"` comes out as a newline), drops every other
keyword of a schema with a `type` list, `$ref` or `anyOf`, ignores `minItems` without `items`
and `required` names missing from `properties`, lets an extra key repeat a declared property
with the wrong type, mistranslates `pattern` escapes such as `\\d`, resolves a `$ref` to any
earlier rule of the same name, and ignores every keyword it does not know.

What the conversion honours is listed once, in KEYWORDS and FORMATS; annotations
(ANNOTATIONS) constrain nothing and are allowed anywhere. Restrictions, all still valid JSON:
- properties come in the schema's order, required ones first; whitespace is a space, or one or
  two newlines and up to 20 spaces or tabs of indentation;
- an object schema with `properties` but no `additionalProperties` gets no other keys, and
  keys beyond `properties` are written without escapes;
- integers have at most 16 digits, fractions and exponents at most 16 and 2;
- strings never use `\\u` escapes for surrogates (characters beyond U+FFFF are written as
  themselves);
- `oneOf` only where its alternatives exclude each other by type or by the const value of a
  required property (a discriminated union), so that holding it like `anyOf` is exact;
- `prefixItems` without `items` gets no further items (unless `minItems` needs them);
- formats are checked by shape (a `date` of 2023-02-31 passes), as JSON Schema's default
  annotation-only `format` does.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from .errors import BadRequest
from .gbnf import MAX_DIGITS, char, integer_range, literal, repeat
from .generation import Grammar

# The one list of what the conversion honours: keyword -> the JSON type it constrains ("" =
# any). A keyword of another type than the value's is ignored, as JSON Schema says; one that
# is not here at all is refused.
KEYWORDS: dict[str, str] = {
    "type": "", "enum": "", "const": "", "anyOf": "", "oneOf": "", "allOf": "", "$ref": "", "nullable": "",
    "properties": "object", "required": "object", "additionalProperties": "object",
    "items": "array", "prefixItems": "array", "additionalItems": "array", "minItems": "array",
    "maxItems": "array", "uniqueItems": "array",  # uniqueItems: false only
    "minLength": "string", "maxLength": "string", "format": "string",
    "minimum": "integer", "maximum": "integer", "exclusiveMinimum": "integer", "exclusiveMaximum": "integer",
}
FORMATS = ("date", "time", "date-time", "uuid")
ANNOTATIONS = frozenset({"title", "description", "examples", "default", "$comment", "$schema", "$id",
                         "$defs", "definitions", "deprecated", "readOnly", "writeOnly"})
TYPES = ("string", "number", "integer", "boolean", "null", "object", "array")

_LOWER = {"minimum": max, "exclusiveMinimum": max, "minItems": max, "minLength": max,
          "maximum": min, "exclusiveMaximum": min, "maxItems": min, "maxLength": min}

# bound keyword -> (whether it bounds from below, the inclusive integer bound it sets)
_BOUNDS: dict[str, tuple[bool, Any]] = {
    "minimum": (True, math.ceil), "exclusiveMinimum": (True, lambda v: math.floor(v) + 1),
    "maximum": (False, math.floor), "exclusiveMaximum": (False, lambda v: math.ceil(v) - 1),
}
_COMMA = '"," space'

_HEX = "[0-9a-fA-F]"
_BUILTINS: dict[str, str] = {
    "space": '| " " | "\\n"{1,2} [ \\t]{0,20}',
    "value": "object | array | string | number | boolean | null",
    "object": '"{" space ( string ":" space value ( "," space string ":" space value )* )? "}" space',
    "array": '"[" space ( value ( "," space value )* )? "]" space',
    "string": '"\\"" char* "\\"" space',
    # any character but '"', '\' and controls, or an escape; no \u escapes of surrogates
    "char": ('[^"\\\\\\x7F\\x00-\\x1F] | "\\\\" ( ["\\\\/bfnrt] | "u" [0-9a-cA-CeEfF] '
             f'{_HEX}{{3}} | "u" [dD] [0-7] {_HEX}{{2}} )'),
    "integral-part": '"0" | [1-9] [0-9]{0,15}',
    "number": '"-"? integral-part ( "." [0-9]{1,16} )? ( [eE] [-+]? [0-9]{1,2} )? space',
    "integer": '"-"? integral-part space',
    "boolean": '( "true" | "false" ) space',
    "null": '"null" space',
    "date": '[0-9]{4} "-" ( "0" [1-9] | "1" [0-2] ) "-" ( "0" [1-9] | [1-2] [0-9] | "3" [0-1] )',
    "time": ('( [01] [0-9] | "2" [0-3] ) ":" [0-5] [0-9] ":" [0-5] [0-9] ( "." [0-9]{3} )? '
             '( "Z" | [+-] ( [01] [0-9] | "2" [0-3] ) ":" [0-5] [0-9] )'),
    "date-time": 'date "T" time',
    "uuid": f'{_HEX}{{8}} "-" {_HEX}{{4}} "-" {_HEX}{{4}} "-" {_HEX}{{4}} "-" {_HEX}{{12}}',
    "date-string": '"\\"" date "\\"" space',
    "time-string": '"\\"" time "\\"" space',
    "date-time-string": '"\\"" date-time "\\"" space',
    "uuid-string": '"\\"" uuid "\\"" space',
    "key-char": '[^"\\\\\\x7F\\x00-\\x1F]',
}
_RESERVED = frozenset(_BUILTINS) | {"root"}
_RULE_REFS = re.compile(r'"(?:[^"\\]|\\.)*"|\[(?:[^\]\\]|\\.)*\]|([a-zA-Z][a-zA-Z0-9-]*)')
_NOT_NAME = re.compile(r"[^a-zA-Z0-9-]+")


@dataclass
class _Document:
    """One schema being converted: `$ref`s resolve within it, each to one rule."""

    root: Any
    name: str
    where: str
    refs: dict[str, str] = field(default_factory=dict)

    def resolve(self, ref: str, where: str) -> Any:
        target = self.root
        for part in ref[1:].split("/")[1:] if ref != "#" else ():
            part = part.replace("~1", "/").replace("~0", "~")
            if isinstance(target, dict) and part in target:
                target = target[part]
            elif isinstance(target, list) and part.isdigit() and int(part) < len(target):
                target = target[int(part)]
            else:
                raise BadRequest(f"{where}.$ref = {ref!r}: points at nothing in the schema")
        return target


class GbnfBuilder:
    """GBNF rules under construction: converted schemas and hand-written rules share one
    namespace, so one grammar can hold several schemas (one per tool) as named sub-rules."""

    def __init__(self) -> None:
        self._rules: dict[str, str] = {}

    def rule(self, name: str, body: str) -> str:
        """Add `name ::= body` (renamed if the name is taken by another body); returns the name."""
        base = _NOT_NAME.sub("-", name).strip("-") or "rule"
        candidate, n = base, 0
        while candidate in _RESERVED or self._rules.get(candidate, body) != body:
            n += 1
            candidate = f"{base}-{n}"
        self._rules[candidate] = body
        self._uses(body)
        return candidate

    def builtin(self, name: str) -> str:
        """A predefined rule ("value", "string", "space", ...), with the rules it uses."""
        if name not in self._rules:
            self._rules[name] = _BUILTINS[name]
            self._uses(_BUILTINS[name])
        return name

    def _uses(self, body: str) -> None:
        """Add the predefined rules `body` refers to."""
        for match in _RULE_REFS.finditer(body):
            if match.group(1) in _BUILTINS:
                self.builtin(match.group(1))

    def grammar(self, root: str, triggers: tuple[str, ...] = ()) -> Grammar:
        """The grammar whose root is the expression `root`."""
        self._uses(root)
        lines = [f"root ::= {root}", *(f"{name} ::= {body}" for name, body in self._rules.items())]
        return Grammar("\n".join(lines) + "\n", "root", triggers)

    def schema(self, schema: Any, name: str, where: str) -> str:
        """A GBNF expression for JSON text (with trailing space) that validates against
        `schema`; `where` names the schema in errors ("tools[0].function.parameters")."""
        return self._visit(_Document(schema, name, where), schema, name, where)

    # -- conversion -------------------------------------------------------------------

    def _visit(self, doc: _Document, schema: Any, name: str, where: str) -> str:
        if schema is True:
            return self.builtin("value")
        if schema is False:
            raise BadRequest(f"{where}: the schema false admits no value")
        if not isinstance(schema, dict):
            raise BadRequest(f"{where}: a schema must be an object or a boolean, not {type(schema).__name__}")
        keys = _constraining(schema, where)
        if not keys:
            return self.builtin("value")
        if "$ref" in keys:
            if len(keys) > 1:
                other = next(k for k in keys if k != "$ref")
                raise BadRequest(f"{where}: keyword {other!r} beside '$ref' is not supported")
            return self._ref(doc, schema["$ref"], where)
        if "allOf" in keys:
            parts = _list(schema["allOf"], f"{where}.allOf")
            rest = {k: schema[k] for k in keys if k != "allOf"}
            return self._visit(doc, self._merge(doc, [rest, *parts], where), name, where)
        if schema.get("nullable") is True:
            rest = {k: schema[k] for k in keys if k != "nullable"}
            return self.rule(name, f"{self._visit(doc, rest, name, where)} | {self.builtin('null')}")
        for union in ("anyOf", "oneOf"):
            if union in keys:
                return self._union(doc, schema, keys, union, name, where)
        types = _types(schema.get("type"), f"{where}.type") if "type" in keys else None
        if "const" in keys or "enum" in keys:
            return self._constants(schema, keys, types, name, where)
        if types is None:
            types = _inferred(keys, where)
            if types is None:
                return self.builtin("value")
        if len(types) == 1:
            return self._typed(doc, schema, types[0], name, where)
        return self.rule(name, " | ".join(self._typed(doc, schema, t, f"{name}-{t}", where) for t in types))

    def _ref(self, doc: _Document, ref: Any, where: str) -> str:
        _local(ref, where)
        if ref not in doc.refs:
            target = doc.resolve(ref, where)
            last = ref.rstrip("/").rsplit("/", 1)[-1] if ref != "#" else "root"
            name = self.rule(f"{doc.name}-ref-{last}", f"#pending {ref}")  # reserved first: refs recurse
            doc.refs[ref] = name
            self._rules[name] = self._visit(doc, target, name, doc.where + ref[1:].replace("/", "."))
        return doc.refs[ref]

    def _merge(self, doc: _Document, parts: list[Any], where: str) -> dict[str, Any]:
        """allOf as one schema: properties and required united, bounds tightened, types
        intersected; anything else may appear in one part only (or equal in all)."""
        merged: dict[str, Any] = {}
        object_parts = 0
        for part in self._flatten(doc, parts, where, ()):
            if any(k in part for k in ("properties", "required", "additionalProperties")):
                object_parts += 1
            for key in _constraining(part, where):
                value = part[key]
                if key not in merged:
                    merged[key] = dict(value) if key == "properties" and isinstance(value, dict) else value
                elif key == "properties" and isinstance(value, dict):
                    for prop, sub in value.items():
                        old = merged[key].get(prop)
                        merged[key][prop] = sub if old is None or old == sub else {"allOf": [old, sub]}
                elif key == "required":
                    merged[key] = list(dict.fromkeys([*_list(merged[key], f"{where}.required"),
                                                      *_list(value, f"{where}.required")]))
                elif key == "type":
                    where_type = f"{where}.type"
                    merged[key] = _intersect(_types(merged[key], where_type), _types(value, where_type), where)
                elif key in _LOWER and _is_number(value) and _is_number(merged[key]):
                    merged[key] = _LOWER[key](merged[key], value)
                elif merged[key] != value:
                    raise BadRequest(f"{where}: keyword {key!r} with different values in several parts of allOf "
                                     "is not supported")
        if "additionalProperties" in merged and object_parts > 1:
            raise BadRequest(f"{where}: keyword 'additionalProperties' inside allOf is not supported")
        return merged

    def _flatten(self, doc: _Document, parts: list[Any], where: str, seen: tuple[str, ...]) -> list[dict[str, Any]]:
        """allOf parts with nested allOf and `$ref` parts resolved (a part is one dict)."""
        flat: list[dict[str, Any]] = []
        for part in parts:
            if part is True:
                continue
            if part is False:
                raise BadRequest(f"{where}.allOf: the schema false admits no value")
            if not isinstance(part, dict):
                raise BadRequest(f"{where}.allOf: a part must be a schema, not {type(part).__name__}")
            rest = dict(part)
            ref, inner = rest.pop("$ref", None), rest.pop("allOf", None)
            flat.append(rest)
            if ref is not None:
                _local(ref, where)
                if ref in seen:
                    raise BadRequest(f"{where}: circular $ref {ref!r} inside allOf")
                flat += self._flatten(doc, [doc.resolve(ref, where)], where, (*seen, ref))
            if inner is not None:
                flat += self._flatten(doc, _list(inner, f"{where}.allOf"), where, seen)
        return flat

    def _union(self, doc: _Document, schema: dict[str, Any], keys: list[str], union: str, name: str,
               where: str) -> str:
        if "anyOf" in keys and "oneOf" in keys:
            raise BadRequest(f"{where}: both anyOf and oneOf in one schema is not supported")
        siblings = {k: schema[k] for k in keys if k != union}
        parts = [self._merge(doc, [siblings, alt], f"{where}.{union}[{i}]") if siblings else alt
                 for i, alt in enumerate(_list(schema[union], f"{where}.{union}"))]
        if union == "oneOf":
            shapes = [self._shape(doc, part, f"{where}.oneOf[{i}]") for i, part in enumerate(parts)]
            for i, (kinds, fixed) in enumerate(shapes):
                for j, (other_kinds, other_fixed) in enumerate(shapes[:i]):
                    told_apart = kinds == other_kinds == {"object"} and any(
                        key in other_fixed and other_fixed[key] != value for key, value in fixed.items())
                    if kinds & other_kinds and not told_apart:
                        raise BadRequest(f"{where}.oneOf: alternatives {j} and {i} may both match, which oneOf "
                                         "forbids; use anyOf, or make them differ by type or by the const value "
                                         "of a required property")
        alternatives = [self._visit(doc, part, f"{name}-{i}", f"{where}.{union}[{i}]") for i, part in enumerate(parts)]
        return self.rule(name, " | ".join(alternatives))

    def _shape(self, doc: _Document, schema: Any, where: str) -> tuple[set[str], dict[str, Any]]:
        """At most which JSON types the grammar for `schema` produces (integers counted as
        numbers), and the values its required properties are fixed to: enough to prove oneOf
        alternatives exclusive (by type, or by a discriminating const) without converting them."""
        seen: set[str] = set()
        while isinstance(schema, dict) and isinstance(schema.get("$ref"), str) and schema["$ref"] not in seen:
            seen.add(schema["$ref"])
            _local(schema["$ref"], where)
            schema = doc.resolve(schema["$ref"], where)
        every = {"number" if t == "integer" else t for t in TYPES}
        if not isinstance(schema, dict) or "anyOf" in schema or "oneOf" in schema or "allOf" in schema:
            return every, {}
        keys = _constraining(schema, where)
        if isinstance(schema.get("enum"), list) or "const" in schema:
            kinds = {_json_type(v) for v in (schema["enum"] if "enum" in schema else [schema["const"]])}
        elif "type" in keys:
            kinds = set(_types(schema["type"], f"{where}.type"))
        else:
            kinds = set(_inferred(keys, where) or every)
        kinds = {"number" if t == "integer" else t for t in kinds}
        if schema.get("nullable") is True:
            kinds.add("null")
        props, required = schema.get("properties"), schema.get("required")
        fixed: dict[str, Any] = {}
        if isinstance(props, dict) and isinstance(required, list):
            for key in required:
                sub = props.get(key)
                if isinstance(sub, dict) and "const" in sub:
                    fixed[key] = sub["const"]
                elif isinstance(sub, dict) and isinstance(sub.get("enum"), list) and len(sub["enum"]) == 1:
                    fixed[key] = sub["enum"][0]
        return kinds, fixed

    def _constants(self, schema: dict[str, Any], keys: list[str], types: list[str] | None, name: str,
                   where: str) -> str:
        other = [k for k in keys if k not in ("const", "enum", "type")]
        if other:
            raise BadRequest(f"{where}: keyword {other[0]!r} beside 'enum' or 'const' is not supported")
        values = _list(schema["enum"], f"{where}.enum") if "enum" in keys else [schema["const"]]
        if "const" in keys:
            values = [v for v in values if v == schema["const"] and type(v) is type(schema["const"])]
        if types is not None:
            values = [v for v in values if _json_type(v) in types or (_json_type(v) == "integer" and "number" in types)]
        if not values:
            raise BadRequest(f"{where}: no value satisfies both 'enum'/'const' and 'type'")
        return self.rule(name, " | ".join(f"{literal(json.dumps(v, ensure_ascii=False))} space" for v in values))

    def _typed(self, doc: _Document, schema: dict[str, Any], kind: str, name: str, where: str) -> str:
        if kind == "object":
            return self._object(doc, schema, name, where)
        if kind == "array":
            return self._array(doc, schema, name, where)
        if kind == "string":
            return self._string(schema, name, where)
        if kind == "integer":
            low, high = _integer_bounds(schema, where)
            if low is None and high is None:
                return self.builtin("integer")
            return self.rule(name, f"{integer_range(low, high)} space")
        bounds = [k for k in schema if KEYWORDS.get(k) == "integer"]
        if kind == "number" and bounds:
            raise BadRequest(f"{where}: keyword {bounds[0]!r} is supported for integers only, not numbers")
        return self.builtin(kind)

    def _string(self, schema: dict[str, Any], name: str, where: str) -> str:
        lengths = [k for k in ("minLength", "maxLength") if k in schema]
        if "format" in schema:
            fmt = schema["format"]
            if fmt not in FORMATS:
                raise BadRequest(f"{where}: format {fmt!r} is not supported (supported: {', '.join(FORMATS)})")
            if lengths:
                raise BadRequest(f"{where}: keyword {lengths[0]!r} beside 'format' is not supported")
            return self.builtin(f"{fmt}-string")
        if not lengths:
            return self.builtin("string")
        low = _count(schema, "minLength", where, 0)
        high = _count(schema, "maxLength", where, None)
        if high is not None and low > high:
            raise BadRequest(f"{where}: minLength {low} is more than maxLength {high}")
        return self.rule(name, f'"\\"" {repeat("char", low, high)} "\\"" space')

    def _object(self, doc: _Document, schema: dict[str, Any], name: str, where: str) -> str:
        props = schema.get("properties", {})
        if not isinstance(props, dict):
            raise BadRequest(f"{where}.properties must be an object of schemas")
        required = list(dict.fromkeys(_list(schema.get("required", []), f"{where}.required")))
        extra = schema.get("additionalProperties")
        for prop in required:
            if prop not in props:
                raise BadRequest(f"{where}.required: {prop!r} is not in properties; a required key must be "
                                 "declared there")
        if extra is not None and not isinstance(extra, (bool, dict)):
            raise BadRequest(f"{where}.additionalProperties must be a boolean or a schema")
        if not props and extra in (None, True, {}):
            return self.builtin("object")
        kvs = {}
        for prop, sub in props.items():
            value = self._visit(doc, sub, f"{name}-{prop}", f"{where}.properties.{prop}")
            kvs[prop] = self.rule(f"{name}-{prop}-kv", f'{literal(json.dumps(prop, ensure_ascii=False))} space ":" '
                                                       f"space {value}")
        extra_kv = ""
        if extra not in (None, False):
            key = self._key_excluding(props) if props else self.builtin("string")
            value = self._visit(doc, extra, f"{name}-additional", f"{where}.additionalProperties")
            extra_kv = self.rule(f"{name}-additional-kv", f'{key} ":" space {value}')
        extras = f'( "," space {extra_kv} )*' if extra_kv else ""
        optional = [kvs[p] for p in props if p not in required]
        # rests[i]: the optional keys from i on, each there or not, each after a comma; then extras
        rests = {len(optional): extras}
        for i in range(len(optional) - 1, -1 if required else 0, -1):
            rests[i] = self.rule(f"{name}-rest-{i}", f'( "," space {optional[i]} )? {rests[i + 1]}'.rstrip())
        if required:
            inner = ' "," space '.join(kvs[p] for p in required) + f" {rests[0]}"
        else:
            firsts = [f"{kv} {rests[i + 1]}" for i, kv in enumerate(optional)]
            firsts += [f"{extra_kv} {extras}"] if extra_kv else []
            inner = f"( {' | '.join(firsts)} )?" if firsts else ""
        return self.rule(name, f'"{{" space {inner} "}}" space')

    def _key_excluding(self, names: dict[str, Any]) -> str:
        """A key (without escapes) that is none of `names`: a trie of them, where each node
        may end the key unless a name ends there, go on along the trie, or leave it."""
        trie: dict[str, Any] = {}
        for key in names:
            if all(c not in '"\\' and ord(c) >= 0x20 and c != "\x7f" for c in key):
                node = trie
                for c in key:
                    node = node.setdefault(c, {})
                node[""] = True  # a name ends here

        def visit(node: dict[str, Any]) -> str:
            children = {c: sub for c, sub in node.items() if c}
            alternatives = [] if "" in node else [""]
            alternatives += [f"{literal(c)} {visit(sub)}" for c, sub in children.items()]
            excluded = "".join(char(c, in_class=True) for c in children)
            alternatives.append(f'[^"\\\\\\x7F\\x00-\\x1F{excluded}] key-char*')
            return "( " + " | ".join(alternatives) + " )"

        return self.rule("key", f'"\\"" {visit(trie)} "\\"" space')

    def _array(self, doc: _Document, schema: dict[str, Any], name: str, where: str) -> str:
        items, prefix = schema.get("items"), schema.get("prefixItems", [])
        if schema.get("uniqueItems", False) is not False:
            raise BadRequest(f"{where}: keyword 'uniqueItems' is not supported")
        if isinstance(items, list):  # the tuple form before 2020-12
            if "prefixItems" in schema:
                raise BadRequest(f"{where}: items as a list beside prefixItems is not supported")
            prefix, items = items, schema.get("additionalItems")
        prefix = _list(prefix, f"{where}.prefixItems")
        low = _count(schema, "minItems", where, 0)
        high = _count(schema, "maxItems", where, None)
        if high is not None:
            if low > high:
                raise BadRequest(f"{where}: minItems {low} is more than maxItems {high}")
            prefix = prefix[:high]
        rules = [self._visit(doc, sub, f"{name}-{i}", f"{where}.prefixItems[{i}]") for i, sub in enumerate(prefix)]
        if items is False or (items is None and prefix and low <= len(prefix)):
            tail = None
        elif items is None:
            tail = self.builtin("value")
        else:
            tail = self._visit(doc, items, f"{name}-item", f"{where}.items")
        if tail is None and low > len(rules):
            raise BadRequest(f"{where}: minItems {low} asks for more items than prefixItems and items allow")
        more_low, more_high = max(low - len(rules), 0), None if high is None else high - len(rules)
        if not rules:
            if tail is None or more_high == 0:
                return self.rule(name, '"[" space "]" space')
            rest = repeat(f"{_COMMA} {tail}", max(more_low - 1, 0), None if more_high is None else more_high - 1)
            body = f"{tail} {rest}" if more_low else f"( {tail} {rest} )?"
            return self.rule(name, f'"[" space {body} "]" space')
        sequence = repeat(f"{_COMMA} {tail}", more_low, more_high) if tail is not None else ""
        for i in reversed(range(len(rules))):
            sequence = f"{_COMMA + ' ' if i else ''}{rules[i]} {sequence}".strip()
            if i >= low:
                sequence = f"( {sequence} )?"
        return self.rule(name, f'"[" space {sequence} "]" space')

def _constraining(schema: dict[str, Any], where: str) -> list[str]:
    """The schema's keywords that constrain; an unknown one is refused by name."""
    keys = []
    for key, value in schema.items():
        if key in ANNOTATIONS or (key in ("uniqueItems", "nullable") and value is False):
            continue
        if key not in KEYWORDS:
            raise BadRequest(f"{where}: keyword {key!r} is not supported")
        keys.append(key)
    return keys


def _inferred(keys: list[str], where: str) -> list[str] | None:
    """The type a schema without 'type' is held to: the one its keywords constrain (a keyword
    for another type does not apply to that one's values), or None: any value."""
    kinds = sorted({KEYWORDS[k] for k in keys} - {""})
    if len(kinds) > 1:
        raise BadRequest(f"{where}: keywords for several types ({', '.join(kinds)}) without 'type'; "
                         "give 'type' to say which")
    return kinds or None


def _local(ref: Any, where: str) -> None:
    if not isinstance(ref, str) or not (ref == "#" or ref.startswith("#/")):
        raise BadRequest(f"{where}.$ref = {ref!r}: only references within the schema ('#/$defs/...') are supported")


def _list(value: Any, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise BadRequest(f"{where} must be a list")
    return value


def _types(value: Any, where: str) -> list[str]:
    types = value if isinstance(value, list) else [value]
    for t in types:
        if t not in TYPES:
            raise BadRequest(f"{where} = {value!r}: each type must be one of {', '.join(TYPES)}")
    if not types:
        raise BadRequest(f"{where}: an empty list of types admits no value")
    return list(dict.fromkeys(types))


def _intersect(a: list[str], b: list[str], where: str) -> list[str]:
    both = [t for t in a if t in b or (t == "integer" and "number" in b)]
    both += [t for t in b if t == "integer" and "number" in a and t not in both]
    if not both:
        raise BadRequest(f"{where}: no type satisfies every part of allOf ({a} and {b})")
    return both


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer()):
        return "integer"
    return {float: "number", str: "string", list: "array", dict: "object"}[type(value)]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _count(schema: dict[str, Any], key: str, where: str, default: int | None) -> Any:
    value = schema.get(key, default)
    if value is not None and not (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
        raise BadRequest(f"{where}.{key} = {value!r}: must be a non-negative integer")
    return value


def _integer_bounds(schema: dict[str, Any], where: str) -> tuple[int | None, int | None]:
    """The inclusive integer range the four bound keywords leave (None: unbounded)."""
    low: int | None = None
    high: int | None = None
    for key, (lower, bound) in _BOUNDS.items():
        if key not in schema:
            continue
        value = schema[key]
        if not _is_number(value) or not math.isfinite(value):
            raise BadRequest(f"{where}.{key} = {value!r}: must be a number (the boolean form of draft 4 "
                             "is not supported)")
        if lower:
            low = bound(value) if low is None else max(low, bound(value))
        else:
            high = bound(value) if high is None else min(high, bound(value))
    limit = 10 ** MAX_DIGITS - 1
    low = None if low is None or low < -limit else min(low, limit)
    high = None if high is None or high > limit else max(high, -limit)
    if low is not None and high is not None and low > high:
        raise BadRequest(f"{where}: no integer lies between the bounds given (at least {low}, at most {high})")
    return low, high


def schema_grammar(schema: Any, where: str = "schema") -> Grammar:
    """A grammar for JSON matching `schema`; BadRequest naming `where` and the keyword if the
    schema asks for something the grammar cannot hold the output to."""
    builder = GbnfBuilder()
    try:
        return builder.grammar(builder.schema(schema, "schema", where))
    except RecursionError:
        raise BadRequest(f"{where}: the schema is nested too deeply to convert") from None


def json_object_grammar() -> Grammar:
    """A grammar for any JSON object (OpenAI's response_format json_object)."""
    builder = GbnfBuilder()
    return builder.grammar(builder.builtin("object"))
