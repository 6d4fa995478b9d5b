"""Event ids that encode a stream and a position: ``<stream id>:<position>``.

A browser ``EventSource`` sends the last id it saw as ``Last-Event-ID`` when it reconnects
(WHATWG HTML 9.2.4); the position says where to resume. Stream ids never contain ``:``.
"""

from __future__ import annotations


def format_event_id(stream_id: str, position: int) -> str:
    return f"{stream_id}:{position}"


def parse_event_id(value: str) -> tuple[str, int]:
    """``(stream_id, position)``; ``ValueError`` with a readable message if malformed."""
    stream_id, sep, pos = value.strip().rpartition(":")
    if not sep or not stream_id or not pos.isdigit():
        raise ValueError(f"Last-Event-ID {value!r} is not of the form <stream id>:<position>")
    return stream_id, int(pos)
