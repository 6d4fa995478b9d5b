"""A stream by id: ``GET /v1/streams/{id}`` resumes it, ``POST /v1/streams/{id}/cancel``
stops it. Only the key that opened a stream reaches it (``stream_ownership``)."""

from __future__ import annotations

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from tokenspout.errors import StreamNotFoundError
from tokenspout.protocols.responses_events import RESPONSE_ID_PREFIX
from tokenspout.server.request_body import refuse_non_json_body
from tokenspout.server.resume import last_event_id, resume
from tokenspout.server.server_state import state_of
from tokenspout.server.stream_ownership import cancel_owned, owner_of

router = APIRouter()
#: The resume's path: a HEAD there is refused (``head_requests``), as it would subscribe.
RESUME_PATH = "/v1/streams/{stream_id}"


@router.get(RESUME_PATH)
async def get_stream(stream_id: str, request: Request) -> Response:
    """Replay a stream after ``Last-Event-ID`` (header or ``?last_event_id=``) in its own
    format, then follow it live to ``[DONE]``; without one, from the beginning."""
    return await resume(state_of(request), request, last_event_id(request), stream_id)


@router.post("/v1/streams/{stream_id}/cancel")
async def cancel_stream(stream_id: str, request: Request) -> Response:
    """Stop a stream by id, a Responses stream also by its response's id (``resp_<stream
    id>``, what a Responses client has); its readers see ``finish_reason: "cancelled"``."""
    refuse_non_json_body(request)
    state, owner = state_of(request), owner_of(request)
    try:
        await cancel_owned(state, owner, stream_id)
    except StreamNotFoundError as as_given:
        # Tried as given first: a stream's own id may begin so too.
        if not stream_id.startswith(RESPONSE_ID_PREFIX):
            raise
        try:
            await cancel_owned(state, owner, stream_id.removeprefix(RESPONSE_ID_PREFIX))
        except StreamNotFoundError:
            raise as_given from None  # it names the id the client sent
    return JSONResponse({"id": stream_id, "object": "stream.cancel", "cancelled": True})
