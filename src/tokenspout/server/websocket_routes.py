"""``GET /v1/ws``: several streams over one WebSocket, with cancel."""

from __future__ import annotations

import secrets

from fastapi import APIRouter
from starlette.websockets import WebSocket

from tokenspout.server.auth import bearer_matches
from tokenspout.server.server_state import ServerState
from tokenspout.server.websocket_session import WebSocketSession

router = APIRouter()


def _authorized(websocket: WebSocket, state: ServerState) -> bool:
    """Browsers cannot set headers on a WebSocket, so ``?api_key=`` is accepted too."""
    expected = state.config.api_key
    if expected is None:
        return True
    if bearer_matches(websocket.headers.get("authorization", ""), expected):
        return True
    return secrets.compare_digest(websocket.query_params.get("api_key", ""), expected)


@router.websocket("/v1/ws")
async def websocket_streams(websocket: WebSocket) -> None:
    state: ServerState = websocket.app.state.tokenspout
    if not _authorized(websocket, state):
        await websocket.close(code=1008, reason="missing or wrong API key")
        return
    await websocket.accept()
    await WebSocketSession(websocket, state).run()
