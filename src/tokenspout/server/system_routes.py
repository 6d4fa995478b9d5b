"""Health, model list, metrics, and cancel-by-id."""

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
from tokenspout.server.request_body import refuse_non_json_body
from tokenspout.server.resume import last_event_id, resume
from tokenspout.server.server_state import ServerState, state_of
from tokenspout.server.stream_ownership import cancel_owned, owner_of

router = APIRouter()
api = APIRouter()


@router.get("/health")
async def health(request: Request) -> Response:
    """200 when ready to serve; 503 while loading, draining, or after the engine failed."""
    state = state_of(request)
    failure = state.engine.failure
    if failure is not None:
        status = "engine_failed"
    elif state.draining:
        status = "draining"
    else:
        status = "ok" if state.ready else "loading"
    ok = status == "ok"
    body = {
        "status": status,
        "model": state.engine.model_id,
        "engine": state.engine.kind,
        # An upstream engine in front of a synthetic one is labelled as that is (the page).
        "synthetic": state.engine.synthetic,
    }
    if failure is not None:
        body["error"] = failure
    if state.cluster is not None:
        # Still 200 without Redis: this replica's live streams go on from memory.
        body["replica"] = state.cluster.id
        body["redis"] = "up" if state.cluster.link.up else "unreachable"
    return JSONResponse(body, status_code=200 if ok else 503)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(state_of(request).metrics.render(), media_type="text/plain; version=0.0.4")


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


@api.get("/v1/models")
async def models(request: Request) -> Response:
    entries = _visible(request, state_of(request))
    return JSONResponse({"object": "list", "data": list(entries.values())})


@api.get("/v1/models/{model_id:path}")
async def model(request: Request, model_id: str) -> Response:
    """One served model (the SDK's ``models.retrieve``); the answer a request naming it
    would get otherwise (404 naming those served; 404 too for one the key may not use)."""
    state = state_of(request)
    check_model(state, model_id)
    entry = _visible(request, state).get(model_id)
    if entry is None:
        raise ModelNotFoundError(f"the model {model_id!r} does not exist", param="model")
    return JSONResponse(entry)


@api.get("/v1/streams/{stream_id}")
async def get_stream(stream_id: str, request: Request) -> Response:
    """Replay a stream after ``Last-Event-ID`` (header or ``?last_event_id=``) in its own
    format, then follow it live to ``[DONE]``; without one, from the beginning."""
    return await resume(state_of(request), request, last_event_id(request), stream_id)


@api.post("/v1/streams/{stream_id}/cancel")
async def cancel_stream(stream_id: str, request: Request) -> Response:
    """Stop a stream by id; its readers see ``finish_reason: "cancelled"``."""
    refuse_non_json_body(request)
    await cancel_owned(state_of(request), owner_of(request), stream_id)
    return JSONResponse({"id": stream_id, "object": "stream.cancel", "cancelled": True})
