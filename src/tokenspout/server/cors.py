"""Cross-origin requests: Starlette's CORS middleware, with a refused preflight answered as
every other error here is, in OpenAI's JSON shape (Starlette answers it in plain text)."""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse, Response

from tokenspout.errors import InvalidRequestError
from tokenspout.protocols.openai_errors import error_body


class JsonCorsMiddleware(CORSMiddleware):
    """``CORSMiddleware`` whose refused preflights are JSON errors naming what was refused."""

    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code != 400:
            return response
        # Starlette's text says what failed: "Disallowed CORS origin, method".
        error = InvalidRequestError(bytes(response.body).decode(), code="cors_refused")
        kept = {
            name: value
            for name, value in response.headers.items()
            if name.lower() not in ("content-length", "content-type")
        }
        return JSONResponse(error_body(error), status_code=400, headers=kept)
