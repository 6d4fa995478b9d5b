"""The JSON text every wire format carries: compact, UTF-8 kept as is."""

from __future__ import annotations

import json
from typing import Any


def dumps(obj: Any) -> str:
    """Compact JSON with UTF-8 text kept as is (smaller than ``\\uXXXX`` escapes)."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
