"""Bearer-key check on the API routes (``--api-key``, ``--api-keys-file``) and on
``/metrics`` and the dashboard's data (``--metrics-api-key``).

A pure ASGI middleware in front of the HTTP ``/v1`` routes, installed only when keys are
configured: a server without keys pays nothing per request. (As a FastAPI dependency the
check made FastAPI parse every request's query string, headers and cookies once more.) The
key found is put in the scope for the routes (stream ownership, per-key limits). The
WebSocket route checks the key itself at the handshake. Browsers cannot set headers on a
WebSocket or an ``EventSource``, so the handshake and GET requests accept ``?api_key=`` too
(``log_redaction`` keeps it out of the logs).
"""

from __future__ import annotations

import hmac
from collections.abc import Callable

from starlette.datastructures import Headers, QueryParams
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Receive, Scope, Send

from tokenspout.errors import TokenspoutError
from tokenspout.protocols.json_text import dumps
from tokenspout.protocols.openai_errors import error_body
from tokenspout.server.api_keys import ApiKey, KeyStore, bearer_token, digest

#: Where the middleware leaves the request's ``ApiKey``.
SCOPE_KEY = "tokenspout.api_key"


class AuthenticationError(TokenspoutError):
    status_code = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


MISSING_KEY = "missing or wrong API key: send 'Authorization: Bearer <key>'"


def key_of(conn: HTTPConnection) -> ApiKey | None:
    """The key a request was authenticated with (None when the server has no keys)."""
    key: ApiKey | None = conn.scope.get(SCOPE_KEY)
    return key


def unauthorized_body() -> bytes:
    return dumps(error_body(AuthenticationError(MISSING_KEY))).encode()


async def _send_401(send: Send) -> None:
    body = unauthorized_body()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"www-authenticate", b"Bearer"),
    ]
    await send({"type": "http.response.start", "status": 401, "headers": headers})
    await send({"type": "http.response.body", "body": body})


#: Paths outside ``/v1`` that the API keys guard as they guard ``/v1`` (vLLM serves these
#: at the root).
KEYED_PATHS = ("/tokenize", "/detokenize")

#: What the metrics key guards: ``/metrics`` and the dashboard's data, the same numbers.
METRICS_PATHS = ("/metrics", "/dashboard/data")


class ApiKeyMiddleware:
    """Answers 401 (OpenAI-shaped, ``WWW-Authenticate: Bearer``) to an HTTP request under
    ``/v1`` (or to ``KEYED_PATHS``) without a valid key, and to ``METRICS_PATHS`` without
    the metrics key."""

    def __init__(
        self,
        app: ASGIApp,
        keys: KeyStore,
        metrics_key: str | None = None,
        on_refused: Callable[[], None] = lambda: None,
    ):
        """``on_refused``: called for each 401 (the server counts it)."""
        self.app = app
        self.keys = keys
        self.metrics_digest = None if metrics_key is None else digest(metrics_key)
        self.on_refused = on_refused

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path = scope["path"]
            if (path.startswith("/v1/") or path in KEYED_PATHS) and self.keys.enabled:
                token = bearer_token(Headers(scope=scope).get("authorization", ""))
                if token is None and scope["method"] == "GET":
                    token = QueryParams(scope["query_string"]).get("api_key")
                key = self.keys.authenticate(token)
                if key is None:
                    self.on_refused()
                    await _send_401(send)
                    return
                scope[SCOPE_KEY] = key
            elif path in METRICS_PATHS and self.metrics_digest is not None:
                token = bearer_token(Headers(scope=scope).get("authorization", ""))
                if token is None and path == "/dashboard/data":  # the page's fetch: a query
                    token = QueryParams(scope["query_string"]).get("api_key")
                if token is None or not hmac.compare_digest(digest(token), self.metrics_digest):
                    self.on_refused()
                    await _send_401(send)
                    return
        await self.app(scope, receive, send)
