"""Who may open ``/v1/ws``: the page's origin, then the key.

Browsers send ``Origin`` on a WebSocket handshake and apply no CORS to it: without this
check any web page a user visits could open a socket to a server on their machine or
network and read its output (cross-site WebSocket hijacking). Allowed: no ``Origin`` (a
non-browser client), the server's own origin, and the ``--allowed-origin`` list.
Browsers cannot set headers on a WebSocket, so the key may come as ``?api_key=`` too.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from starlette.responses import JSONResponse
from starlette.websockets import WebSocket

from tokenspout.errors import PermissionDeniedError
from tokenspout.protocols.openai_errors import error_body
from tokenspout.server.api_keys import ApiKey, bearer_token
from tokenspout.server.auth import MISSING_KEY, AuthenticationError
from tokenspout.server.server_state import ServerState


def origin_allowed(origin: str | None, host: str | None, allowed: tuple[str, ...]) -> bool:
    if origin is None:
        return True
    if "*" in allowed or origin in allowed:
        return True
    # Same origin: the page was served by this server, under the name the socket uses.
    netloc = urlsplit(origin).netloc.lower()
    return bool(netloc) and host is not None and netloc == host.lower()


def check_handshake(
    websocket: WebSocket, state: ServerState
) -> tuple[ApiKey | None, JSONResponse | None]:
    """The key of an allowed handshake, or the response that refuses it."""
    headers = websocket.headers
    origin = headers.get("origin")
    if not origin_allowed(origin, headers.get("host"), state.config.allowed_origins):
        err = PermissionDeniedError(f"WebSocket connections from {origin} are not allowed")
        return None, JSONResponse(error_body(err), status_code=403)
    if not state.keys.enabled:
        return None, None
    token = bearer_token(headers.get("authorization", "")) or websocket.query_params.get("api_key")
    key = state.keys.authenticate(token)
    if key is None:
        body = error_body(AuthenticationError(MISSING_KEY))
        return None, JSONResponse(body, status_code=401, headers={"WWW-Authenticate": "Bearer"})
    return key, None
