"""Which wire format ``Accept`` asks for: NDJSON only where it prefers it to SSE."""

from __future__ import annotations

import pytest
from starlette.requests import Request

from tokenspout.protocols.ndjson import NDJSONFraming
from tokenspout.server.responder import negotiate_framing


def request(accept: str | None) -> Request:
    headers = [] if accept is None else [(b"accept", accept.encode())]
    return Request({"type": "http", "method": "POST", "path": "/", "headers": headers})


@pytest.mark.parametrize(
    ("accept", "ndjson"),
    [
        (None, False),
        ("*/*", False),
        ("text/event-stream", False),
        ("application/x-ndjson", True),
        ("application/ndjson", True),
        ("Application/JSONL", True),
        ("application/x-ndjson, text/event-stream", False),  # a tie goes to SSE
        ("application/x-ndjson, text/event-stream;q=0.5", True),
        ("text/event-stream; q=0.9, application/x-ndjson;q=0.8", False),
        ("application/x-ndjson;q=0", False),
        ("application/x-ndjson;q=oops", False),
    ],
)
def test_negotiation(accept: str | None, ndjson: bool) -> None:
    assert isinstance(negotiate_framing(request(accept)), NDJSONFraming) == ndjson
