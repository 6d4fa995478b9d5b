"""OpenAI-compatible ``/v1/chat/completions`` and ``/v1/completions``."""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends
from starlette.requests import Request
from starlette.responses import Response

from tokenspout.engine.request import ChatMessage
from tokenspout.server.auth import require_api_key
from tokenspout.server.request_parsing import (
    check_model,
    check_prompt_chars,
    parse_body,
    sampling_params,
)
from tokenspout.server.responder import respond
from tokenspout.server.schemas import ChatCompletionRequest, CompletionRequest
from tokenspout.server.server_state import state_of

router = APIRouter(dependencies=[Depends(require_api_key)])


@router.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Response:
    started = time.monotonic()
    state = state_of(request)
    body = await parse_body(request, ChatCompletionRequest, state.config.max_body_bytes)
    check_model(state, body.model)
    messages = [ChatMessage(m.role, m.text()) for m in body.messages]
    check_prompt_chars(state, "".join(m.content for m in messages))
    prompt = state.engine.encode_chat(messages)
    params = sampling_params(
        state,
        max_tokens=body.max_completion_tokens or body.max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        seed=body.seed,
        stop=body.stop_list(),
        stop_token_ids=tuple(body.stop_token_ids or ()),
        ignore_eos=body.ignore_eos,
        prompt_tokens=len(prompt.token_ids),
    )
    return respond(
        state,
        request,
        prompt=prompt,
        params=params,
        kind="chat",
        streaming=body.stream,
        options=body.stream_options,
        started_at=started,
    )


@router.post("/v1/completions")
async def completions(request: Request) -> Response:
    started = time.monotonic()
    state = state_of(request)
    body = await parse_body(request, CompletionRequest, state.config.max_body_bytes)
    check_model(state, body.model)
    text = body.prompt_text()
    check_prompt_chars(state, text)
    prompt = state.engine.encode_completion(text)
    params = sampling_params(
        state,
        max_tokens=body.max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        seed=body.seed,
        stop=body.stop_list(),
        stop_token_ids=tuple(body.stop_token_ids or ()),
        ignore_eos=body.ignore_eos,
        prompt_tokens=len(prompt.token_ids),
    )
    return respond(
        state,
        request,
        prompt=prompt,
        params=params,
        kind="completion",
        streaming=body.stream,
        options=body.stream_options,
        started_at=started,
    )
