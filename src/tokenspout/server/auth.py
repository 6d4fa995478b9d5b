"""Optional bearer-token check on the API routes (``--api-key``), as vLLM's server has."""

from __future__ import annotations

import secrets

from starlette.requests import Request

from tokenspout.errors import TokenspoutError
from tokenspout.server.server_state import state_of


class AuthenticationError(TokenspoutError):
    status_code = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


async def require_api_key(request: Request) -> None:
    """FastAPI dependency: pass when no key is configured or the right one is given."""
    expected = state_of(request).config.api_key
    if expected is None:
        return
    given = request.headers.get("authorization", "")
    scheme, _, token = given.partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip(), expected):
        raise AuthenticationError("missing or wrong API key: send 'Authorization: Bearer <key>'")
