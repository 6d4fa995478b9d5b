"""``strict: true`` closes a JSON schema's objects (response_format and tools)."""

from __future__ import annotations

import json

from tokenspout.engine.request import SamplingParams
from tokenspout.server import advanced_params
from tokenspout.server.schemas import ChatCompletionRequest
from tokenspout.server.strict_schema import closed

OBJ = {"type": "object", "properties": {"a": {"type": "boolean"}}}
SHUT = {**OBJ, "additionalProperties": False}


def test_every_object_is_closed_at_any_depth() -> None:
    schema = {
        "type": "object",
        "properties": {
            "inner": OBJ,
            "list": {"type": "array", "items": OBJ, "prefixItems": [OBJ]},
            "either": {"anyOf": [OBJ, {"type": "string"}], "oneOf": [OBJ]},
            "ref": {"$ref": "#/$defs/Thing"},
            "untyped": {"properties": {"b": {"type": "integer"}}},
            "nullable": {"type": ["object", "null"]},
        },
        "$defs": {"Thing": OBJ},
        "definitions": {"Other": OBJ},
    }
    out = closed(schema)
    assert out["additionalProperties"] is False
    props = out["properties"]
    assert props["inner"] == SHUT
    assert props["list"]["items"] == SHUT and props["list"]["prefixItems"] == [SHUT]
    assert props["either"]["anyOf"] == [SHUT, {"type": "string"}]
    assert props["either"]["oneOf"] == [SHUT]
    assert props["untyped"]["additionalProperties"] is False
    assert props["nullable"]["additionalProperties"] is False
    assert out["$defs"]["Thing"] == SHUT and out["definitions"]["Other"] == SHUT
    assert schema["properties"]["inner"] == OBJ  # the input is left as it was


def test_what_the_schema_says_is_kept() -> None:
    open_map = {"type": "object", "additionalProperties": {"type": "integer"}}
    assert closed(open_map) == open_map
    assert closed({**OBJ, "additionalProperties": True})["additionalProperties"] is True
    # Values are not schemas: a const or default object is not changed.
    value = {"type": "object", "const": {"type": "object"}, "default": {"properties": {}}}
    assert closed(value) == {**value, "additionalProperties": False}


def test_an_all_of_composition_stays_open_at_its_level() -> None:
    # Each closed branch would refuse the other's keys: no answer at all.
    both = {"allOf": [OBJ, {"type": "object", "properties": {"c": OBJ}}]}
    out = closed(both)
    assert "additionalProperties" not in out
    assert out["allOf"][0] == OBJ
    assert out["allOf"][1]["properties"]["c"] == SHUT


def grammar_schema(**body: object) -> dict[str, object]:
    request = ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": "hi"}], **body}
    )
    grammar = advanced_params.apply(SamplingParams(), request).grammar
    assert grammar is not None
    return json.loads(grammar.source)


def test_a_strict_response_format_is_closed_and_a_loose_one_is_not() -> None:
    # Strict without additionalProperties: false used to give keys the schema does not list.
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "strict": True, "schema": OBJ}}
    assert grammar_schema(response_format=fmt) == SHUT
    loose = {**fmt, "json_schema": {"name": "x", "schema": OBJ}}
    assert grammar_schema(response_format=loose) == OBJ
    assert grammar_schema(guided_json=OBJ) == OBJ  # no strict flag: as given


def test_a_strict_function_has_closed_parameters() -> None:
    def tool(**extra: object) -> dict[str, object]:
        return {"type": "function", "function": {"name": "f", "parameters": OBJ, **extra}}

    body = {"messages": [{"role": "user", "content": "hi"}]}
    strict = ChatCompletionRequest.model_validate({**body, "tools": [tool(strict=True)]})
    assert advanced_params.chat_tools(strict)[0].parameters == SHUT
    loose = ChatCompletionRequest.model_validate({**body, "tools": [tool()]})
    assert advanced_params.chat_tools(loose)[0].parameters == OBJ
