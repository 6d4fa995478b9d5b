"""``POST /tokenize`` and ``POST /detokenize`` (vLLM's paths and shapes; llama.cpp's server
and TGI have their own): the token ids a prompt is to the served model, so that a client can
count them before it asks, and the text of ids. Behind the API keys as ``/v1`` is."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from tokenspout.errors import InvalidRequestError
from tokenspout.server import key_admission
from tokenspout.server.auth import key_of
from tokenspout.server.generation_request import (
    chat_prompt,
    check_model,
    completion_prompt,
    off_loop,
)
from tokenspout.server.request_parsing import parse_body, read_json, validate
from tokenspout.server.schemas import DetokenizeRequest, TokenizeRequest
from tokenspout.server.server_state import ServerState, state_of

router = APIRouter()


def _model(request: Request, state: ServerState, name: str | None) -> None:
    """404 for a model not served, 403 for one the request's key may not use."""
    model = check_model(state, name)
    key = key_of(request)
    if key is not None:
        key_admission.check_model(state, key, model)


@router.post("/tokenize")
async def tokenize(request: Request) -> Response:
    """``count``, ``max_model_len`` and ``tokens``: the ids a completion or chat request
    with this prompt would have the model read (through the chat template for messages),
    also for a prompt longer than the context, so that a client can cut it to fit."""
    state = state_of(request)
    data = await read_json(request, state.config.max_body_bytes)
    if not state.engine.tokenizes:
        # Before the body's checks: none of them would make the answer another one (a
        # content part the model could not read is the upstream's to read).
        prompt_given = isinstance(data, dict) and data.get("prompt") is not None
        raise InvalidRequestError(
            "this engine does not tokenize: the servers it is in front of do (ask them)",
            param="prompt" if prompt_given else "messages",
        )
    body = validate(TokenizeRequest, data)
    _model(request, state, body.model)
    if body.add_special_tokens:
        raise InvalidRequestError(
            "the ids are those a generation reads, which has no special tokens added: "
            "add_special_tokens can only be false",
            param="add_special_tokens",
        )
    if body.prompt is None and body.messages is None:
        raise InvalidRequestError("give a prompt or messages", param="prompt")
    if body.prompt is not None:
        if body.messages is not None:
            raise InvalidRequestError("give a prompt or messages, not both", param="messages")
        if body.tools is not None or body.tool_choice is not None:
            raise InvalidRequestError("tools go with messages, not a prompt", param="tools")
        prompt = await completion_prompt(state, body.prompt)
    else:
        prompt = await chat_prompt(state, body)
    assert prompt.token_ids is not None, "an engine that tokenizes gives token ids"
    ids = list(prompt.token_ids)
    answer: dict[str, Any] = {
        "count": len(ids), "max_model_len": state.engine.max_model_len, "tokens": ids,
    }  # fmt: skip
    if body.return_token_strs:
        answer["token_strs"] = await off_loop(len(ids), lambda: state.engine.token_strs(ids))
    return JSONResponse(answer)


@router.post("/detokenize")
async def detokenize(request: Request) -> Response:
    """``prompt``: the text of ``tokens`` (special tokens written out)."""
    state = state_of(request)
    body = await parse_body(request, DetokenizeRequest, state.config.max_body_bytes)
    _model(request, state, body.model)
    text = await off_loop(len(body.tokens), lambda: state.engine.detokenize(body.tokens))
    return JSONResponse({"prompt": text})
