"""Event ids that encode a stream and a position: ``<stream id>:<position>``, and
``<stream id>:<position>.<k>`` for the k-th event (from 1) after the last token, at the
stream's end (the finish chunk, the usage chunk, an error), so that no two events share an
id and a resume from any of them replays exactly what came after it.

A browser ``EventSource`` sends the last id it saw as ``Last-Event-ID`` when it reconnects
(WHATWG HTML 9.2.4); the position says where to resume. Stream ids never contain ``:``.
"""

from __future__ import annotations

import re
from typing import NamedTuple

# At most 18 digits: a position beyond 10^18 tokens names no event (and a 5,000-digit one
# is past what int() takes from a string).
_POSITION = re.compile(r"(\d{1,18})(?:\.(\d{1,18}))?", re.ASCII)


class EventPosition(NamedTuple):
    stream_id: str
    #: Tokens sent up to and including the event.
    position: int
    #: Events sent after the last of those tokens (the end's), including this one.
    after: int = 0


def format_event_id(stream_id: str, position: int, after: int = 0) -> str:
    return f"{stream_id}:{position}.{after}" if after else f"{stream_id}:{position}"


def parse_event_id(value: str) -> EventPosition:
    """``ValueError`` with a readable message if malformed."""
    stream_id, sep, pos = value.strip().rpartition(":")
    match = _POSITION.fullmatch(pos)
    if not sep or not stream_id or match is None:
        raise ValueError(
            f"Last-Event-ID {value[:100]!r} is not of the form <stream id>:<position>[.<event>]"
        )
    return EventPosition(stream_id, int(match[1]), int(match[2] or 0))
