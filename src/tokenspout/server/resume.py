"""Resume a stream after a dropped connection: find it by the id in ``Last-Event-ID`` and
follow it from the position after that event. Only a resumable stream takes a new reader."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from tokenspout.errors import InvalidRequestError, StreamNotResumableError
from tokenspout.protocols.event_id import parse_event_id
from tokenspout.protocols.stream_wire import StreamWire
from tokenspout.server.responder import follow
from tokenspout.server.server_state import ServerState
from tokenspout.server.stream_ownership import follow_owned, owner_of


def last_event_id(request: Request) -> str | None:
    """The header a reconnecting ``EventSource`` sends, or ``?last_event_id=``."""
    return request.headers.get("last-event-id") or request.query_params.get("last_event_id")


async def resume(
    state: ServerState, request: Request, event_id: str | None, stream_id: str | None = None
) -> Response:
    """Replay everything after ``event_id`` (from the beginning without one) in the
    stream's own format, then follow it live."""
    position = after = 0
    if event_id:
        try:
            sid, position, after = parse_event_id(event_id)
        except ValueError as exc:
            raise InvalidRequestError(str(exc), param="Last-Event-ID") from None
        if stream_id is not None and sid != stream_id:
            raise InvalidRequestError(
                f"Last-Event-ID names stream {sid!r}, not {stream_id!r}", param="Last-Event-ID"
            )
        stream_id = sid
    assert stream_id is not None
    stream = await follow_owned(state, owner_of(request), stream_id)
    if isinstance(stream.meta, StreamWire) and stream.meta.kind == "responses":
        # The stream's own refusal would advise resumable options, which do not apply here.
        raise StreamNotResumableError(
            f"stream {stream_id} is a Responses API stream, which is never resumable (whatever "
            "--resumable or stream_options say): its events' sequence numbers count one "
            "reader's events, which another reader would not repeat. Only the request that "
            "opened it reads it"
        )
    # Another stream that is not resumable refuses the new reader itself (409).
    # A client with an event id has the opening chunks (they come first).
    response = follow(state, request, stream, start=position, after=after, opening=not event_id)
    state.metrics.resumes.inc()
    return response
