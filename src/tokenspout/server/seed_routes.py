"""The seed article's endpoint, ``/v1/completions/stream``, by POST body or GET query (the
latter is what a browser ``EventSource`` can call)."""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends
from starlette.requests import Request
from starlette.responses import Response

from tokenspout.errors import InvalidRequestError
from tokenspout.server.auth import require_api_key
from tokenspout.server.request_parsing import (
    check_model,
    check_prompt_chars,
    parse_body,
    sampling_params,
    validate,
)
from tokenspout.server.responder import respond
from tokenspout.server.schemas import SeedStreamRequest, StreamOptions
from tokenspout.server.server_state import state_of

router = APIRouter(dependencies=[Depends(require_api_key)])

_QUERY_TYPES = {"max_tokens": int, "seed": int, "temperature": float}
_OPTION_TYPES = {"flush_tokens": int, "flush_ms": float}


def _typed(name: str, raw: str, kind: type) -> int | float:
    try:
        return kind(raw)
    except ValueError:
        raise InvalidRequestError(f"{name}: {raw!r} is not a valid {kind.__name__}") from None


def query_body(request: Request) -> SeedStreamRequest:
    """Query parameters as the same body the POST takes (flush knobs as top-level params)."""
    data: dict[str, object] = {}
    options: dict[str, object] = {}
    for name, raw in request.query_params.items():
        if name in _QUERY_TYPES:
            data[name] = _typed(name, raw, _QUERY_TYPES[name])
        elif name in _OPTION_TYPES:
            options[name] = _typed(name, raw, _OPTION_TYPES[name])
        elif name in ("prompt", "model"):
            data[name] = raw
    if "prompt" not in data:
        raise InvalidRequestError("prompt: query parameter is required", param="prompt")
    if options:
        data["stream_options"] = options
    return validate(SeedStreamRequest, data)


async def _stream(request: Request, body: SeedStreamRequest, started: float) -> Response:
    state = state_of(request)
    check_model(state, body.model)
    check_prompt_chars(state, body.prompt)
    prompt = state.engine.encode_completion(body.prompt)
    params = sampling_params(
        state,
        max_tokens=body.max_tokens,
        temperature=body.temperature,
        seed=body.seed,
        prompt_tokens=len(prompt.token_ids),
    )
    return respond(
        state,
        request,
        prompt=prompt,
        params=params,
        kind="seed",
        streaming=True,
        options=body.stream_options or StreamOptions(),
        started_at=started,
    )


@router.post("/v1/completions/stream")
async def seed_stream_post(request: Request) -> Response:
    started = time.monotonic()
    body = await parse_body(request, SeedStreamRequest, state_of(request).config.max_body_bytes)
    return await _stream(request, body, started)


@router.get("/v1/completions/stream")
async def seed_stream_get(request: Request) -> Response:
    return await _stream(request, query_body(request), time.monotonic())
