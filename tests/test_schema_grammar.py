"""JSON schemas as GBNF: every grammar parses in llama.cpp, accepts what the schema allows in
the sample documents and nothing it forbids, random walks through the grammar (llama.cpp's
own grammar engine choosing among a tiny vocabulary's tokens) only ever produce documents that
validate, and a keyword the grammar cannot hold is refused by name and place.

`GrammarChecker` (tests/grammar_checker.py) does the accepting."""

from __future__ import annotations

import json
import zlib
from typing import Any

import numpy as np
import jsonschema
import pytest

from corral.backend.errors import BadRequest
from grammar_checker import GrammarChecker
from corral.backend.schema_grammar import json_object_grammar, schema_grammar



PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 8, "description": "who"},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "nickname": {"type": ["string", "null"], "maxLength": 3},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "minItems": 1, "maxItems": 2},
        "born": {"type": "string", "format": "date"},
        "id": {"type": "string", "format": "uuid"},
        "score": {"type": "number"},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age"],
    "title": "Person",
}
TREE = {
    "$defs": {"node": {"type": "object", "properties": {"v": {"type": "integer"},
                                                         "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}}},
                       "required": ["v"]}},
    "$ref": "#/$defs/node",
}
SHAPES = {
    "oneOf": [
        {"type": "object", "properties": {"kind": {"const": "circle"}, "r": {"type": "number"}},
         "required": ["kind", "r"]},
        {"type": "object", "required": ["kind", "side"],
         "properties": {"kind": {"const": "square"}, "side": {"type": "integer", "exclusiveMinimum": 0}}},
    ],
}
CASES: list[tuple[str, Any, list[str], list[str]]] = [
    ("person", PERSON,
     ['{"name": "Ann", "age": 31}', '{"name":"B\\u00e9","age":0,"nickname":null,"tags":["a","b"]}',
      '{"name": "x", "age": 150, "born": "2024-02-29", "id": "123e4567-e89b-12d3-a456-426614174000", '
      '"score": -1.5e3, "ok": true}', '{\n  "name": "a\\"b",\n  "age": 7\n}'],
     ['{"age": 31, "name": "Ann"}', '{"name": "", "age": 1}', '{"name": "Ann", "age": 151}',
      '{"name": "Ann", "age": -1}', '{"name": "Ann", "age": 1, "tags": []}', '{"name": "Ann", "age": 1, "x": 1}',
      '{"name": "Ann", "age": 1, "nickname": "long"}', '{"name": "a\nb", "age": 1}', '{"name": "Ann", "age": 01}',
      '{"name": "Ann", "age": 1, "born": "2024-13-01"}', '{"name": "\\ud800", "age": 1}']),
    ("tree", TREE, ['{"v": 1, "kids": [{"v": 2}, {"v": 3, "kids": []}]}'], ['{"v": 1, "kids": [{"w": 2}]}']),
    ("one-of", SHAPES, ['{"kind": "circle", "r": 2.5}', '{"kind": "square", "side": 1}'],
     ['{"kind": "square", "side": 0}', '{"kind": "circle", "side": 1}']),
    ("one-of-types", {"oneOf": [{"type": "string", "maxLength": 1}, {"type": "integer"}, {"type": "null"}]},
     ['"a"', "7", "null"], ['"ab"', "1.5", "true"]),
    ("extra-keys",
     {"type": "object", "properties": {"a": {"type": "integer"}}, "additionalProperties": {"type": "string"}},
     ['{"a": 1, "b": "x", "ab": "y"}', '{"b": "x"}', '{}', '{"": "empty"}'],
     ['{"a": "x"}', '{"b": 1}', '{"a": 1, "a": 2}']),
    ("closed", {"type": "object", "additionalProperties": False}, ["{}"], ['{"a": 1}']),
    ("all-of", {"$defs": {"base": {"type": "object", "properties": {"id": {"type": "integer"}}, "required": ["id"]}},
                "allOf": [{"$ref": "#/$defs/base"}, {"properties": {"note": {"type": "string", "maxLength": 2}}}]},
     ['{"id": 1, "note": "ab"}', '{"id": 1}'], ['{"note": "ab"}', '{"id": 1, "note": "abc"}']),
    ("tuple",
     {"type": "array", "prefixItems": [{"type": "string"}, {"type": "integer"}], "items": False, "minItems": 1},
     ['["a"]', '["a", 1]'], ['[]', '[1]', '["a", 1, 2]']),
    ("tuple-then-items", {"type": "array", "prefixItems": [{"const": 0}], "items": {"type": "boolean"}, "maxItems": 3},
     ['[]', '[0, true, false]'], ['[0, true, false, true]', '[true]']),
    ("enum-escapes", {"enum": ["a\\nb", 'q"', "é", "tab\t", 3, None, {"k": [1]}]},
     ['"a\\\\nb"', '"q\\""', '"é"', '"tab\\t"', "3", "null", '{"k": [1]}'], ['"a\\nb"', '"q"', '"tab\t"', "4"]),
    ("type-list", {"type": ["string", "integer"], "maxLength": 2, "minimum": 5},
     ['"ab"', "5", "100"], ['"abc"', "4", "true"]),
    ("bounds", {"type": "integer", "exclusiveMinimum": -3.5, "exclusiveMaximum": 12},
     ["-3", "0", "11"], ["-4", "12", "-0", "1.0"]),
    ("collision", {"type": "object", "properties": {"Item": {"type": "integer"}, "other": {"$ref": "#/$defs/Item"}},
                   "$defs": {"Item": {"type": "string"}}, "required": ["Item", "other"]},
     ['{"Item": 1, "other": "s"}'], ['{"Item": 1, "other": 2}']),
    ("nullable", {"type": "integer", "nullable": True}, ["null", "3"], ['"3"']),
    ("anything", {}, ['{"a": [1, "x", null, true, 1.5]}', '"s"', "[]"], ["nope"]),
    ("lengths", {"type": "string", "minLength": 2, "maxLength": 3},
     ['"ab"', '"\\n\\u00e9x"', '"日本語"'], ['"a"', '"abcd"', '"\\u00e9"']),
]


def _validator(schema: Any) -> Any:
    """jsonschema's validator; OpenAPI's `nullable` (which it does not know) as anyOf with null."""
    if isinstance(schema, dict) and schema.get("nullable") is True:
        schema = {"anyOf": [{k: v for k, v in schema.items() if k != "nullable"}, {"type": "null"}]}
    return jsonschema.Draft202012Validator(schema)


@pytest.mark.parametrize(("name", "schema", "good", "bad"), CASES, ids=[c[0] for c in CASES])
def test_the_grammar_takes_exactly_the_valid_samples(checker: GrammarChecker, name: str, schema: Any,
                                                     good: list[str], bad: list[str]) -> None:
    grammar = schema_grammar(schema)
    validator = _validator(schema)
    for text in good:
        assert validator.is_valid(json.loads(text)), text  # the sample itself is right
        assert checker.accepts(grammar, text), f"{name}: refused {text!r}\n{grammar.gbnf}"
    for text in bad:
        assert not checker.accepts(grammar, text), f"{name}: accepted {text!r}\n{grammar.gbnf}"


@pytest.mark.parametrize(("name", "schema"), [(c[0], c[1]) for c in CASES], ids=[c[0] for c in CASES])
def test_whatever_the_grammar_lets_through_validates(checker: GrammarChecker, name: str, schema: Any) -> None:
    grammar = schema_grammar(schema)
    validator = _validator(schema)
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    walked = [text for text in (checker.walk(grammar, rng) for _ in range(8)) if text is not None]
    assert len(walked) >= 4, walked
    for text in walked:
        assert validator.is_valid(json.loads(text)), f"{name}: {text!r} does not validate"


def test_integer_bounds_are_exact(checker: GrammarChecker) -> None:
    for low, high in [(-15, 123), (7, 7), (95, 1005), (None, -3), (0, None), (-9, None)]:
        schema = {"type": "integer", **({"minimum": low} if low is not None else {}),
                  **({"maximum": high} if high is not None else {})}
        grammar = schema_grammar(schema)
        for n in [*range(-20, 130, 7), -15, -16, 123, 124, 7, 8, 6, 94, 95, 1005, 1006, 999, -3, -2, 0, -1,
                  10 ** 15, -(10 ** 15)]:
            inside = (low is None or n >= low) and (high is None or n <= high)
            assert checker.accepts(grammar, str(n)) == inside, (low, high, n, grammar.gbnf)


def test_json_object_grammar_takes_any_object_only(checker: GrammarChecker) -> None:
    grammar = json_object_grammar()
    assert checker.accepts(grammar, '{"a": [1, {"b": null}], "c": "\\u263a"}')
    assert not checker.accepts(grammar, "[1]")
    assert not checker.accepts(grammar, '"text"')


@pytest.mark.parametrize(("schema", "where", "message"), [
    ({"type": "object", "properties": {"age": {"type": "integer", "multipleOf": 5}}},
     "response_format.json_schema.schema", "response_format.json_schema.schema.properties.age: keyword 'multipleOf' "
                                           "is not supported"),
    ({"type": "string", "pattern": "^a+$"}, "schema", "schema: keyword 'pattern' is not supported"),
    ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "schema",
     "schema: keyword 'uniqueItems' is not supported"),
    ({"type": "object", "patternProperties": {"^x": {}}}, "schema",
     "schema: keyword 'patternProperties' is not supported"),
    ({"not": {"type": "null"}}, "schema", "schema: keyword 'not' is not supported"),
    ({"anyOf": [{"type": "string", "format": "email"}]}, "schema", "schema.anyOf[0]: format 'email' is not supported"),
    ({"type": "number", "minimum": 0}, "schema", "schema: keyword 'minimum' is supported for integers only"),
    ({"type": "integer", "exclusiveMinimum": True, "minimum": 1}, "schema", "schema.exclusiveMinimum = True"),
    ({"$ref": "https://example.com/s.json"}, "schema", "schema.$ref = 'https://example.com/s.json': only references"),
    ({"$ref": "#/$defs/missing"}, "schema", "points at nothing"),
    ({"type": "object", "properties": {}, "required": ["a"]}, "schema", "schema.required: 'a' is not in properties"),
    ({"$defs": {"a": {"type": "string"}}, "$ref": "#/$defs/a", "maxLength": 2}, "schema",
     "schema: keyword 'maxLength' beside '$ref' is not supported"),
    ({"type": "integer", "minimum": 5, "maximum": 4}, "schema", "no integer lies between"),
    ({"type": "string", "enum": [1, 2]}, "schema", "no value satisfies"),
    ({"type": "widget"}, "schema", "schema.type = 'widget'"),
    ({"allOf": [{"type": "string"}, {"type": "integer"}]}, "schema", "no type satisfies"),
    ({"type": "array", "minItems": 3, "prefixItems": [{}], "items": False}, "schema", "minItems 3 asks for more"),
    (False, "schema", "the schema false admits no value"),
    ({"$defs": {"a": {"allOf": [{"$ref": "#/$defs/a"}]}}, "$ref": "#/$defs/a"}, "schema", "circular $ref"),
    ({"oneOf": [{"type": "integer"}, {"type": "number"}]}, "schema",
     "schema.oneOf: alternatives 0 and 1 may both match, which oneOf forbids"),
    ({"oneOf": [{"type": "object", "properties": {"k": {"const": 1}}}, {"type": "object"}]}, "schema",
     "alternatives 0 and 1 may both match"),
    ({"$ref": "#anchor"}, "schema", "only references within the schema"),
])
def test_a_keyword_the_grammar_cannot_hold_is_refused_by_name_and_place(schema: Any, where: str, message: str) -> None:
    with pytest.raises(BadRequest) as caught:
        schema_grammar(schema, where=where)
    assert message in caught.value.message


def test_annotations_are_allowed_anywhere(checker: GrammarChecker) -> None:
    schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": "x", "title": "T", "description": "d",
              "$comment": "c", "examples": [{}], "default": {}, "type": "object",
              "properties": {"a": {"type": "string", "deprecated": True, "readOnly": True, "examples": ["x"]}}}
    assert checker.accepts(schema_grammar(schema), '{"a": "x"}')


def test_big_schemas_stay_small_grammars(checker: GrammarChecker) -> None:
    props = {f"p{i}": {"type": ["integer", "null"], "minimum": -1000, "maximum": 10 ** 9} for i in range(40)}
    grammar = schema_grammar({"type": "object", "properties": props, "required": ["p0"]})
    assert len(grammar.gbnf) < 40_000
    assert checker.parses(grammar)
    assert checker.accepts(grammar, '{"p0": 999999999, "p39": null}')
