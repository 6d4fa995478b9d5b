"""OpenAI-compatible ``/v1/chat/completions``, ``/v1/completions`` and ``/v1/responses``.

Served by ``direct_routes``: the handlers parse and validate their body themselves.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from starlette.requests import Request
from starlette.responses import Response

from tokenspout.errors import InvalidRequestError
from tokenspout.server.direct_routes import generation_router
from tokenspout.server.generation_request import (
    GenerationRequest,
    prepare_chat,
    prepare_completion,
    prepare_response,
)
from tokenspout.server.request_parsing import parse_body
from tokenspout.server.responder import respond
from tokenspout.server.responses_schema import ResponsesRequest, responses_schema
from tokenspout.server.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    chat_schema,
    completion_schema,
)
from tokenspout.server.server_state import ServerState, state_of

#: A body of one of the three endpoints.
Body = TypeVar("Body", ChatCompletionRequest, CompletionRequest, ResponsesRequest)


async def _generate(
    request: Request,
    schema: Callable[[bool], type[Body]],
    prepare: Callable[[ServerState, Body], Awaitable[GenerationRequest]],
) -> Response:
    """Parse the body in the schema for this engine (strict, or keeping the fields an
    upstream reads), prepare the generation, respond: the path every endpoint takes."""
    started = time.monotonic()
    state = state_of(request)
    body = await parse_body(
        request, schema(state.engine.forwards_fields), state.config.max_body_bytes
    )
    _check_stream_options(body)
    generation = await prepare(state, body)
    return await respond(state, request, generation, body.stream, started)


async def chat_completions(request: Request) -> Response:
    return await _generate(request, chat_schema, prepare_chat)


async def completions(request: Request) -> Response:
    return await _generate(request, completion_schema, prepare_completion)


async def responses(request: Request) -> Response:
    """OpenAI's Responses API, served as the chat completion it asks for."""
    return await _generate(request, responses_schema, prepare_response)


def _check_stream_options(
    body: ChatCompletionRequest | CompletionRequest | ResponsesRequest,
) -> None:
    """``stream_options`` shape a stream: on a whole answer they would be accepted and
    ignored, so they are a 400 there (as vLLM). The WebSocket always streams: not checked."""
    if body.stream_options is not None and not body.stream:
        raise InvalidRequestError(
            "stream_options can only be given with stream: true", param="stream_options"
        )


#: Served by ``DirectRoutes``; registered with FastAPI as well (schema, 405s).
router = generation_router(
    {
        ("POST", "/v1/chat/completions"): chat_completions,
        ("POST", "/v1/completions"): completions,
        ("POST", "/v1/responses"): responses,
    }
)
