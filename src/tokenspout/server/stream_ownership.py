"""A stream is resumed, followed or cancelled only with the key that opened it.

Another key gets the same 404 as an id that was never issued: the answer does not tell
whether someone else's stream exists.
"""

from __future__ import annotations

from starlette.requests import HTTPConnection

from tokenspout.server.auth import key_of
from tokenspout.server.server_state import ServerState
from tokenspout.streaming.stream import Stream
from tokenspout.streaming.stream_group import StreamGroup


def owned_stream(state: ServerState, conn: HTTPConnection, stream_id: str) -> Stream | StreamGroup:
    key = key_of(conn)
    return state.streams.find(stream_id, owner=None if key is None else key.name)
