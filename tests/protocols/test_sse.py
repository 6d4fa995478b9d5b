"""Table tests of SSE framing (WHATWG HTML 9.2) and NDJSON lines."""

from __future__ import annotations

import pytest

from tokenspout.protocols.json_text import dumps
from tokenspout.protocols.ndjson import NDJSONFraming
from tokenspout.protocols.sse import DONE, SSEFraming, encode_comment, encode_event


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"data": '{"token":"hi"}'}, b'data: {"token":"hi"}\n\n'),
        ({"data": "a\nb"}, b"data: a\ndata: b\n\n"),
        ({"data": "a\r\nb\rc"}, b"data: a\ndata: b\ndata: c\n\n"),
        ({"data": ""}, b"data: \n\n"),
        ({"data": "x", "id": "s1:4"}, b"id: s1:4\ndata: x\n\n"),
        (
            {"data": "x", "event": "delta", "retry_ms": 3000},
            b"event: delta\nretry: 3000\ndata: x\n\n",
        ),
        ({"data": "日本 😀"}, "data: 日本 😀\n\n".encode()),
    ],
)
def test_encode_event(kwargs: dict, expected: bytes) -> None:
    assert encode_event(**kwargs) == expected


@pytest.mark.parametrize("bad", ["a\nb", "a\rb", "a\0b"])
def test_ids_with_line_breaks_are_rejected(bad: str) -> None:
    with pytest.raises(ValueError):
        encode_event("x", id=bad)


def test_comment_and_done() -> None:
    assert encode_comment() == b": ping\n"
    assert DONE == b"data: [DONE]\n\n"


@pytest.mark.parametrize(
    ("obj", "expected"),
    [
        ({"token": "a\nb"}, b'{"token":"a\\nb"}\n'),
        ({"token": "é😀"}, '{"token":"é😀"}\n'.encode()),
    ],
)
def test_ndjson_line(obj: dict, expected: bytes) -> None:
    assert NDJSONFraming.event(dumps(obj)) == expected


def test_a_named_payload_is_an_sse_event_of_that_type_and_a_plain_ndjson_line() -> None:
    payload = '{"type":"response.completed"}'
    named = SSEFraming.event(payload, name="response.completed")
    assert named == b'event: response.completed\ndata: {"type":"response.completed"}\n\n'
    assert NDJSONFraming.event(payload, name="response.completed") == payload.encode() + b"\n"
