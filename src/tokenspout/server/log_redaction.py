"""Keep API keys out of the logs.

Browsers cannot set headers on a WebSocket or an ``EventSource``, so those send their key as
``?api_key=``, and the URL is what uvicorn's access and connection logs print. A filter on
those loggers blanks the value before any handler formats the line. It blanks the record's
arguments in place, keeping their number: uvicorn's access formatter unpacks them (a record
whose message was formatted into ``msg`` with no arguments left failed to print at all).
"""

from __future__ import annotations

import logging
import re
from urllib.parse import unquote_plus

#: A query parameter of a URL in a log line.
_PARAM = re.compile(r"([?&])([^=&#\s\"']*)=([^&#\s\"']*)")

#: uvicorn logs request lines on ``uvicorn.access`` and WebSocket handshakes on
#: ``uvicorn.error``.
_URL_LOGGERS = ("uvicorn.access", "uvicorn.error")


def _blank(match: re.Match[str]) -> str:
    # The name as the server reads it (Starlette decodes it: ``%61pi_key`` is ``api_key``).
    if unquote_plus(match[2]).lower() != "api_key":
        return match[0]
    return f"{match[1]}{match[2]}=[redacted]"


def redact(text: str) -> str:
    """``text`` with the value of every ``api_key`` query parameter blanked."""
    return _PARAM.sub(_blank, text) if "=" in text else text


class RedactKeyParams(logging.Filter):
    """Blanks every ``api_key`` query parameter's value in a record's message and arguments."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = redact(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(redact(a) if isinstance(a, str) else a for a in record.args)
        elif isinstance(record.args, dict):
            record.args = {
                k: redact(v) if isinstance(v, str) else v for k, v in record.args.items()
            }
        return True


def redact_key_params() -> None:
    """Install the filter on uvicorn's loggers (after ``uvicorn.Config`` set them up)."""
    for name in _URL_LOGGERS:
        logging.getLogger(name).addFilter(RedactKeyParams())
