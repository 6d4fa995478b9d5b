"""A stream is resumed, followed or cancelled only with the key that opened it.

Another key gets the same 404 as an id that was never issued: the answer does not tell
whether someone else's stream exists. With ``--redis-url``, a stream this replica does not
know is looked up in Redis: another replica generates it (or generated it).
"""

from __future__ import annotations

from starlette.requests import HTTPConnection

from tokenspout.errors import StreamNotFoundError
from tokenspout.server.auth import key_of
from tokenspout.server.server_state import ServerState
from tokenspout.streaming.stream import Stream
from tokenspout.streaming.stream_group import StreamGroup


def owner_of(conn: HTTPConnection) -> str | None:
    key = key_of(conn)
    return None if key is None else key.name


async def follow_owned(
    state: ServerState, owner: str | None, stream_id: str
) -> Stream | StreamGroup:
    """A stream of ``owner``'s key to read: this replica's, or, with Redis, a local copy of
    another replica's."""
    try:
        return state.streams.find(stream_id, owner=owner)
    except StreamNotFoundError:
        if state.cluster is None:
            raise
    return await state.cluster.find(stream_id, owner)


async def cancel_owned(state: ServerState, owner: str | None, stream_id: str) -> None:
    """Cancel a stream of ``owner``'s key on this replica, or, with Redis, tell the replica
    that generates it."""
    try:
        state.streams.find(stream_id, owner=owner).cancel()
        return
    except StreamNotFoundError:
        if state.cluster is None:
            raise
    await state.cluster.cancel(stream_id, owner)
