"""How constrained JSON is laid out (llguidance's JSON compile options); a module of its own
so that the server can build tool-call grammars without importing the grammar engine."""

from __future__ import annotations

import json
from typing import Any

#: JSON is generated with ``", "`` and ``": "`` and no other whitespace: a small model left
#: free to add whitespace can loop on newlines until ``max_tokens``.
JSON_OPTIONS: dict[str, Any] = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
}


def json_schema_lark(schema: dict[str, Any]) -> str:
    """``%json`` body for a Lark rule: the schema with our JSON layout options."""
    return json.dumps({**schema, "x-guidance": JSON_OPTIONS})
