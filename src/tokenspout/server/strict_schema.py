"""OpenAI's ``strict: true`` for a JSON schema (``response_format``'s ``json_schema`` or a
tool's ``function``): its objects are closed, so the output holds no key the schema does not
list. OpenAI refuses a strict schema whose objects leave ``additionalProperties`` out; vLLM
(xgrammar's strict mode) closes them, as this does."""

from __future__ import annotations

from typing import Any

#: Keywords whose value is a schema, or a list of schemas.
_SUBSCHEMA = (
    "items",
    "prefixItems",
    "additionalItems",
    "contains",
    "additionalProperties",
    "unevaluatedProperties",
    "propertyNames",
    "anyOf",
    "oneOf",
    "not",
    "if",
    "then",
    "else",
)
#: Keywords whose value maps names to schemas.
_NAMED_SUBSCHEMAS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")


def closed(schema: Any) -> Any:
    """``schema`` with ``"additionalProperties": false`` in every object schema that does not
    set it, at any depth (properties, items, ``anyOf``/``oneOf`` branches, definitions).

    An ``allOf`` composition stays open at its own level and its branches' (their properties'
    schemas are closed): each closed branch would refuse the keys the other branches list
    (llguidance intersects them), leaving no answer at all. Values (``const``, ``enum``,
    ``default``...) are not schemas and stay as they are."""
    return _closed(schema, close=True)


def _closed(schema: Any, *, close: bool) -> Any:
    if isinstance(schema, list):
        return [_closed(s, close=close) for s in schema]
    if not isinstance(schema, dict):
        return schema  # a boolean schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in _SUBSCHEMA:
            out[key] = _closed(value, close=True)
        elif key in _NAMED_SUBSCHEMAS and isinstance(value, dict):
            out[key] = {name: _closed(sub, close=True) for name, sub in value.items()}
        elif key == "allOf":
            out[key] = _closed(value, close=False)
        else:
            out[key] = value
    if close and "additionalProperties" not in schema and "allOf" not in schema:
        if _is_object(schema):
            out["additionalProperties"] = False
    return out


def _is_object(schema: dict[str, Any]) -> bool:
    kind = schema.get("type")
    listed = isinstance(kind, list) and "object" in kind
    return kind == "object" or listed or (kind is None and "properties" in schema)
