"""``GET /v1/models`` and ``GET /v1/models/{id}``: the served models, as the request's API
key sees them (a key is shown only the models it may use)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from tokenspout.engine.interface import SYNTHETIC_OWNER
from tokenspout.errors import ModelNotFoundError, PermissionDeniedError
from tokenspout.server import key_admission
from tokenspout.server.api_keys import ApiKey
from tokenspout.server.auth import key_of
from tokenspout.server.generation_request import check_model
from tokenspout.server.server_state import ServerState, state_of

router = APIRouter()


def _model_entries(state: ServerState) -> dict[str, dict[str, Any]]:
    engine = state.engine
    owner = SYNTHETIC_OWNER if engine.synthetic else "tokenspout"
    models = engine.served_models()
    entries = {}
    for name in state.served_names():
        root = name if name in models else engine.model_id
        entry = {
            "id": name, "object": "model", "created": state.created, "owned_by": owner,
            "root": root,
        }  # fmt: skip
        length = engine.context_length(root)
        if length is not None:  # an upstream that does not say: left out, not guessed
            entry["max_model_len"] = length
        entries[name] = entry
    return entries


def _visible(request: Request, state: ServerState) -> dict[str, dict[str, Any]]:
    """The models the request's key may use (all without keys): a key is not shown the
    others, which it gets 403 for."""
    key = key_of(request)
    if key is None:
        return _model_entries(state)
    return {
        name: entry
        for name, entry in _model_entries(state).items()
        if _may_use(state, key, entry["root"])
    }


def _may_use(state: ServerState, key: ApiKey, model: str) -> bool:
    try:
        key_admission.check_model(state, key, model)
    except PermissionDeniedError:
        return False
    return True


@router.get("/v1/models")
async def models(request: Request) -> Response:
    entries = _visible(request, state_of(request))
    return JSONResponse({"object": "list", "data": list(entries.values())})


@router.get("/v1/models/{model_id:path}")
async def model(request: Request, model_id: str) -> Response:
    """One served model (the SDK's ``models.retrieve``); the answer a request naming it
    would get otherwise (404 naming those served; 404 too for one the key may not use)."""
    state = state_of(request)
    check_model(state, model_id)
    entry = _visible(request, state).get(model_id)
    if entry is None:
        raise ModelNotFoundError(f"the model {model_id!r} does not exist", param="model")
    return JSONResponse(entry)
