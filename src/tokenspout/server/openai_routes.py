"""OpenAI-compatible ``/v1/chat/completions`` and ``/v1/completions``."""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends
from starlette.requests import Request
from starlette.responses import Response

from tokenspout.server.auth import require_api_key
from tokenspout.server.generation_request import prepare_chat, prepare_completion
from tokenspout.server.request_parsing import parse_body
from tokenspout.server.responder import respond
from tokenspout.server.schemas import ChatCompletionRequest, CompletionRequest
from tokenspout.server.server_state import state_of

router = APIRouter(dependencies=[Depends(require_api_key)])


@router.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Response:
    started = time.monotonic()
    state = state_of(request)
    body = await parse_body(request, ChatCompletionRequest, state.config.max_body_bytes)
    return respond(state, request, prepare_chat(state, body), body.stream, started)


@router.post("/v1/completions")
async def completions(request: Request) -> Response:
    started = time.monotonic()
    state = state_of(request)
    body = await parse_body(request, CompletionRequest, state.config.max_body_bytes)
    return respond(state, request, prepare_completion(state, body), body.stream, started)
