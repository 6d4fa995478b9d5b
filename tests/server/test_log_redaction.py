"""The filter that blanks ``?api_key=`` values in uvicorn's log lines."""

from __future__ import annotations

import logging

import pytest

from tokenspout.server.log_redaction import RedactKeyParams


@pytest.mark.parametrize(
    ("msg", "args", "shown"),
    [
        (
            '%s - "%s %s HTTP/%s" %d',
            ("1.2.3.4:5", "GET", "/v1/x?a=1&api_key=sk-1&b=2", "1.1", 200),
            '1.2.3.4:5 - "GET /v1/x?a=1&api_key=[redacted]&b=2 HTTP/1.1" 200',
        ),
        (
            '%s - "WebSocket %s" [accepted]',
            ("1.2.3.4:5", "/v1/ws?API%5FKEY=sk-2"),
            '1.2.3.4:5 - "WebSocket /v1/ws?API%5FKEY=[redacted]" [accepted]',
        ),
        ("no key here: %s", ("/v1/models",), "no key here: /v1/models"),
    ],
)
def test_key_values_are_blanked(msg: str, args: tuple[object, ...], shown: str) -> None:
    record = logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, msg, args, None)
    assert RedactKeyParams().filter(record)
    assert record.getMessage() == shown
