"""Optional bearer-token check on the API routes (``--api-key``), as vLLM's server has.

A pure ASGI middleware in front of the HTTP ``/v1`` routes, installed only when a key is
configured: a server without a key pays nothing per request. (As a FastAPI dependency the
check made FastAPI parse every request's query string, headers and cookies once more.) The
WebSocket route checks the key itself at the handshake, where ``?api_key=`` is accepted too.
"""

from __future__ import annotations

import secrets

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from tokenspout.errors import TokenspoutError
from tokenspout.protocols.ndjson import dumps
from tokenspout.protocols.openai_errors import error_body


class AuthenticationError(TokenspoutError):
    status_code = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


def bearer_matches(authorization: str, expected: str) -> bool:
    """Whether an ``Authorization`` header value carries ``Bearer <expected>``."""
    scheme, _, token = authorization.partition(" ")
    return scheme.lower() == "bearer" and secrets.compare_digest(token.strip(), expected)


class ApiKeyMiddleware:
    """Answers 401 (OpenAI-shaped) to an HTTP request under ``/v1`` without the key."""

    def __init__(self, app: ASGIApp, api_key: str):
        self.app = app
        self.api_key = api_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            given = Headers(scope=scope).get("authorization", "")
            if not bearer_matches(given, self.api_key):
                err = AuthenticationError(
                    "missing or wrong API key: send 'Authorization: Bearer <key>'"
                )
                body = dumps(error_body(err)).encode()
                headers = [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"www-authenticate", b"Bearer"),
                ]
                await send({"type": "http.response.start", "status": 401, "headers": headers})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)
