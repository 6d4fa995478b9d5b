"""``GET /v1/ws``: several streams over one WebSocket, with cancel."""

from __future__ import annotations

from fastapi import APIRouter
from starlette.responses import JSONResponse
from starlette.websockets import WebSocket

from tokenspout.server.websocket_handshake import check_handshake
from tokenspout.server.websocket_session import WebSocketSession

router = APIRouter()


@router.websocket("/v1/ws")
async def websocket_streams(websocket: WebSocket) -> None:
    state = websocket.app.state.tokenspout
    key, refusal = check_handshake(websocket, state)
    if refusal is not None:
        await _refuse(websocket, refusal)
        return
    await websocket.accept()
    await WebSocketSession(websocket, state, key).run()


async def _refuse(websocket: WebSocket, response: JSONResponse) -> None:
    """An HTTP answer to the handshake (401, 403) where the server can send one; a close
    before accepting (which the client sees as 403) otherwise."""
    if "websocket.http.response" in websocket.scope.get("extensions", {}):
        await websocket.send_denial_response(response)
    else:
        await websocket.close(code=1008, reason=f"refused ({response.status_code})")
