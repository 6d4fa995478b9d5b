"""``GET /health`` and ``GET /metrics``: what probes and scrapers read, outside ``/v1``."""

from __future__ import annotations

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from tokenspout.server.server_state import state_of

router = APIRouter()


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
