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


def test_a_key_name_with_odd_bytes_is_blanked_too() -> None:
    # Refused as a key, "api_key%00" still printed the key it carried.
    args = ("1.2.3.4:5", "GET", "/v1/models?api_key%00=sk-secret", "1.1", 401)
    msg = "%s %s %s %s %s"
    record = logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, msg, args, None)
    RedactKeyParams().filter(record)
    assert "sk-secret" not in record.getMessage()


def test_prompts_in_urls_are_blanked_unless_asked_for() -> None:
    # The page's EventSource sends its prompt by GET: it was in every access line.
    from tokenspout.server.log_redaction import KEYS, PROMPTS

    url = "/v1/completions/stream?prompt=my+secret+plan&max_tokens=7&api_key=sk-1"
    for names, shown in ((KEYS + PROMPTS, False), (KEYS, True)):
        args = ("1.2.3.4:5", "GET", url, "1.1", 200)
        record = logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, "%s", args, None)
        record.msg = '%s - "%s %s HTTP/%s" %d'
        RedactKeyParams(names).filter(record)
        line = record.getMessage()
        assert ("my+secret+plan" in line) is shown and "sk-1" not in line
        assert "max_tokens=7" in line
