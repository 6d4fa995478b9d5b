"""Keep API keys, and prompts, out of the logs.

Browsers cannot set headers on a WebSocket or an ``EventSource``, so those send their key as
``?api_key=`` (and the page's EventSource its prompt as ``?prompt=``), and the URL is what
uvicorn's access and connection logs print. A filter on those loggers blanks those values
before any handler formats the line; prompts only without ``--log-prompts``. It blanks the record's
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


#: What a parameter's name is compared by: the name as the server reads it (Starlette decodes
#: it: ``%61pi_key`` is ``api_key``), in lower case, with anything but letters, digits and
#: ``_`` dropped (``api_key%00``, refused as a key, still showed the key in the log).
_NOT_NAME = re.compile(r"[^a-z0-9_]")

KEYS = ("api_key",)
PROMPTS = ("prompt",)


def redact(text: str, names: tuple[str, ...] = KEYS) -> str:
    """``text`` with the value of every query parameter called one of ``names`` blanked."""
    if "=" not in text:
        return text

    def blank(match: re.Match[str]) -> str:
        if _NOT_NAME.sub("", unquote_plus(match[2]).lower()) not in names:
            return match[0]
        return f"{match[1]}{match[2]}=[redacted]"

    return _PARAM.sub(blank, text)


class RedactKeyParams(logging.Filter):
    """Blanks the values of the query parameters ``names`` (API keys by default) in a
    record's message and arguments."""

    def __init__(self, names: tuple[str, ...] = KEYS):
        super().__init__()
        self.names = names

    def filter(self, record: logging.LogRecord) -> bool:
        names = self.names
        if isinstance(record.msg, str):
            record.msg = redact(record.msg, names)
        if isinstance(record.args, tuple):
            record.args = tuple(redact(a, names) if isinstance(a, str) else a for a in record.args)
        elif isinstance(record.args, dict):
            record.args = {
                k: redact(v, names) if isinstance(v, str) else v for k, v in record.args.items()
            }
        return True


def redact_key_params(log_prompts: bool = False) -> None:
    """Install the filter on uvicorn's loggers (after ``uvicorn.Config`` set them up): keys
    always, prompts unless ``log_prompts``."""
    names = KEYS if log_prompts else KEYS + PROMPTS
    for name in _URL_LOGGERS:
        logging.getLogger(name).addFilter(RedactKeyParams(names))
