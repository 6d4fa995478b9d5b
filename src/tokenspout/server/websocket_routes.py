"""``GET /v1/ws``: several streams over one WebSocket, with cancel."""

from __future__ import annotations

import secrets

from fastapi import APIRouter
from starlette.websockets import WebSocket

from tokenspout.server.server_state import ServerState
from tokenspout.server.websocket_session import WebSocketSession

router = APIRouter()


def _authorized(websocket: WebSocket, state: ServerState) -> bool:
    """Browsers cannot set headers on a WebSocket, so ``?api_key=`` is accepted too."""
    expected = state.config.api_key
    if expected is None:
        return True
    header = websocket.headers.get("authorization", "")
    token = header[7:] if header.lower().startswith("bearer ") else ""
    token = token or websocket.query_params.get("api_key", "")
    return secrets.compare_digest(token, expected)


@router.websocket("/v1/ws")
async def websocket_streams(websocket: WebSocket) -> None:
    state: ServerState = websocket.app.state.tokenspout
    if not _authorized(websocket, state):
        await websocket.close(code=1008, reason="missing or wrong API key")
        return
    await websocket.accept()
    await WebSocketSession(websocket, state).run()
