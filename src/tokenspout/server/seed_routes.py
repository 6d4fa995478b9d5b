"""The seed article's endpoint, ``/v1/completions/stream``, by POST body or GET query (the
latter is what a browser ``EventSource`` can call). Served by ``direct_routes``."""

from __future__ import annotations

import math
import time
from urllib.parse import unquote_plus

from starlette.requests import Request
from starlette.responses import Response

from tokenspout.errors import InvalidRequestError, PermissionDeniedError
from tokenspout.server.direct_routes import generation_router
from tokenspout.server.generation_request import prepare_seed
from tokenspout.server.request_parsing import parse_body, validate
from tokenspout.server.responder import respond
from tokenspout.server.resume import last_event_id, resume
from tokenspout.server.schemas import SeedStreamRequest
from tokenspout.server.server_state import state_of
from tokenspout.server.websocket_handshake import origin_allowed

_QUERY_TYPES = {"max_tokens": int, "seed": int, "temperature": float}
_OPTION_TYPES = {"flush_tokens": int, "flush_ms": float}
_BOOLEANS = {"true": True, "1": True, "false": False, "0": False}
#: Read elsewhere: the key (an EventSource cannot send headers), the resume position, and
#: whether the stream opens with its name (``_announcement``).
_NOT_THE_BODY = ("api_key", "last_event_id", "stream_event")
_KNOWN = ("prompt", "model", *_QUERY_TYPES, *_OPTION_TYPES, "resumable", "chat", *_NOT_THE_BODY)


def _boolean(name: str, raw: str) -> bool:
    if raw.lower() not in _BOOLEANS:
        raise InvalidRequestError(f"{name}: {raw!r} is not true or false", param=name)
    return _BOOLEANS[raw.lower()]


def _typed(name: str, raw: str, kind: type) -> int | float:
    try:
        value = kind(raw)
    except ValueError:
        value = None
    # ``float`` reads "nan" and "inf" too, which a JSON body cannot hold: refused as such,
    # not as out of range ("temperature: less than or equal to 2" for a NaN).
    if value is None or not math.isfinite(value):
        raise InvalidRequestError(f"{name}: {raw!r} is not a valid {kind.__name__}", param=name)
    return value


def _query(request: Request) -> list[tuple[str, str]]:
    """The query's parameters, decoded strictly: Starlette's ``query_params`` turn bytes that
    are not UTF-8 (a lone surrogate's too) into U+FFFD, which a POST body's are refused for.
    By hand rather than ``parse_qsl(errors="strict")``, whose error names no parameter."""
    pairs = []
    for part in request.scope["query_string"].decode("latin-1").split("&"):
        if not part:
            continue
        name, _, value = part.partition("=")
        try:
            pairs.append(
                (unquote_plus(name, errors="strict"), unquote_plus(value, errors="strict"))
            )
        except UnicodeDecodeError:
            where = unquote_plus(name, errors="replace")
            raise InvalidRequestError(
                f"{where}: the query parameter is not valid UTF-8", param=where
            ) from None
    return pairs


def query_body(query: list[tuple[str, str]]) -> SeedStreamRequest:
    """Query parameters (``_query``) as the same body the POST takes (flush knobs as
    top-level params)."""
    data: dict[str, object] = {}
    options: dict[str, object] = {}
    for name, raw in query:
        if name in _QUERY_TYPES:
            data[name] = _typed(name, raw, _QUERY_TYPES[name])
        elif name in _OPTION_TYPES:
            options[name] = _typed(name, raw, _OPTION_TYPES[name])
        elif name in ("resumable", "chat"):
            (options if name == "resumable" else data)[name] = _boolean(name, raw)
        elif name in ("prompt", "model"):
            data[name] = raw
        elif name not in _NOT_THE_BODY:
            raise InvalidRequestError(
                f"{name}: unknown query parameter (this URL takes {', '.join(_KNOWN)})",
                param=name,
            )
    if "prompt" not in data:
        raise InvalidRequestError("prompt: query parameter is required", param="prompt")
    if options:
        data["stream_options"] = options
    return validate(SeedStreamRequest, data)


async def seed_stream_post(request: Request) -> Response:
    started = time.monotonic()
    state = state_of(request)
    body = await parse_body(request, SeedStreamRequest, state.config.max_body_bytes)
    return await respond(state, request, await prepare_seed(state, body), True, started)


def _check_page(request: Request, allowed: tuple[str, ...]) -> None:
    """A GET is the one generation a page of another site can start without a preflight
    (an ``EventSource``, an ``<img>``): refused (403) unless that site's origin is allowed,
    as a WebSocket from it is. Browsers say where a request comes from: ``Origin`` on an
    ``EventSource``'s, ``Sec-Fetch-Site`` on every one; other clients send neither."""
    headers = request.headers
    origin = headers.get("origin")
    if origin is not None:
        ok = origin_allowed(origin, headers.get("host"), allowed)
    else:
        ok = headers.get("sec-fetch-site") not in ("cross-site", "same-site") or "*" in allowed
    if not ok:
        raise PermissionDeniedError(
            f"generation from the pages of {origin or 'another site'} is not allowed "
            "(--allowed-origin)"
        )


def _announcement(query: list[tuple[str, str]]) -> str:
    """How a new stream opens, before any token: with its id at position 0, so that an
    ``EventSource`` that reconnects even before the first token resumes it. As an id alone
    (no ``data:``, so no event for clients that read only the tokens), or with
    ``stream_event=true`` as an ``event: stream`` whose data is the stream id: a page's
    ``EventSource`` cannot read ``X-Stream-Id``, and needs the id to cancel the stream."""
    named = False
    for name, raw in query:
        if name == "stream_event":
            named = _boolean(name, raw)
    return "stream" if named else ""


async def seed_stream_get(request: Request) -> Response:
    """A reconnecting ``EventSource`` repeats this URL with ``Last-Event-ID``: that resumes
    the same stream instead of starting a new generation."""
    started = time.monotonic()
    state = state_of(request)
    _check_page(request, state.config.allowed_origins)
    event_id = last_event_id(request)
    if event_id:
        return await resume(state, request, event_id)
    query = _query(request)
    generation = await prepare_seed(state, query_body(query))
    announce = _announcement(query)
    return await respond(state, request, generation, True, started, announce=announce)


#: Served by ``DirectRoutes``; registered with FastAPI as well (schema, 405s).
router = generation_router(
    {
        ("POST", "/v1/completions/stream"): seed_stream_post,
        ("GET", "/v1/completions/stream"): seed_stream_get,
    }
)
