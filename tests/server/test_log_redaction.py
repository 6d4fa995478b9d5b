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
        (
            '%s - "%s %s HTTP/%s" %d',
            ("1.2.3.4:5", "GET", "/v1/x?%61pi_key=sk-3&api+key=x&api%5fkey=sk-4", "1.1", 200),
            '1.2.3.4:5 - "GET /v1/x?%61pi_key=[redacted]&api+key=x&api%5fkey=[redacted] '
            'HTTP/1.1" 200',
        ),
        ("no key here: %s", ("/v1/models?keys=1",), "no key here: /v1/models?keys=1"),
    ],
)
def test_key_values_are_blanked(msg: str, args: tuple[object, ...], shown: str) -> None:
    record = logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, msg, args, None)
    assert RedactKeyParams().filter(record)
    assert record.getMessage() == shown
    assert record.args is not None and len(record.args) == len(args)


def test_uvicorn_access_formatter_prints_a_redacted_line() -> None:
    from uvicorn.logging import AccessFormatter

    args = ("1.2.3.4:5", "GET", "/v1/models?api_key=sk-9", "1.1", 200)
    record = logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, "%s", args, None)
    record.msg = '%s - "%s %s HTTP/%s" %d'
    RedactKeyParams().filter(record)
    line = AccessFormatter('%(client_addr)s - "%(request_line)s" %(status_code)s').format(record)
    assert line == '1.2.3.4:5 - "GET /v1/models?api_key=[redacted] HTTP/1.1" 200 OK'
