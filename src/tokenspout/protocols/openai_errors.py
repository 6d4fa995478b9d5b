"""The OpenAI error shape: ``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

from typing import Any

from tokenspout.errors import TokenspoutError


def error_body(err: TokenspoutError) -> dict[str, Any]:
    """The JSON body for an HTTP error response or an in-stream error event."""
    return {
        "error": {
            "message": err.message,
            "type": err.type,
            "param": err.param,
            "code": err.code,
        }
    }
