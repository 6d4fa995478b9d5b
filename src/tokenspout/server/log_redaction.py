"""Keep API keys out of the logs.

Browsers cannot set headers on a WebSocket or an ``EventSource``, so those send their key as
``?api_key=``, and the URL is what uvicorn's access and connection logs print. A filter on
those loggers blanks the value before any handler formats the line.
"""

from __future__ import annotations

import logging
import re

#: ``api_key=`` as a query parameter, also percent-encoded (Starlette decodes the name).
_KEY_PARAM = re.compile(r"(api(?:_|%5f)key=)[^&\s\"']*", re.IGNORECASE)
_REDACTED = r"\1[redacted]"

#: uvicorn logs request lines on ``uvicorn.access`` and WebSocket handshakes on
#: ``uvicorn.error``.
_URL_LOGGERS = ("uvicorn.access", "uvicorn.error")


class RedactKeyParams(logging.Filter):
    """Replaces the value of every ``api_key`` query parameter in a record's message."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = _KEY_PARAM.sub(_REDACTED, message)
        if redacted != message:
            record.msg, record.args = redacted, ()
        return True


def redact_key_params() -> None:
    """Install the filter on uvicorn's loggers (after ``uvicorn.Config`` set them up)."""
    for name in _URL_LOGGERS:
        logging.getLogger(name).addFilter(RedactKeyParams())
