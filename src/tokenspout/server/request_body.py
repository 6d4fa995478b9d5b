"""Reading a request body: JSON only, and no more than the limit.

Only ``application/json`` is taken (415 otherwise): a cross-site page can send a form or a
``text/plain`` POST without a CORS preflight, and such a request must not spend the
server's compute. Nor a body with a ``Content-Encoding`` (415, as RFC 9110 §15.5.16 has it
for an unsupported content coding): a gzipped body was read as if plain (a 400 that blamed
its JSON) and a plain one marked gzip was served; OpenAI's API and vLLM do not decode
request bodies either (a transfer coding other than chunked is refused before, with a 501:
``connection_limits``). The body is read as it arrives and reading stops at the limit (413):
a chunked body has no length to check first, and reading it whole took a 300 MB body into
memory before it was refused. A body that has not arrived within the time allowed is a 408:
one that never ends held its connection forever (uvicorn has no such limit, and the head's
limit, ``connection_limits``, ends at the head).
"""

from __future__ import annotations

import asyncio

from starlette.requests import Request

from tokenspout.errors import InvalidRequestError, UnsupportedMediaTypeError


class PayloadTooLargeError(InvalidRequestError):
    status_code = 413
    code = "payload_too_large"


class RequestTimeoutError(InvalidRequestError):
    status_code = 408
    code = "request_timeout"


def is_json(content_type: str) -> bool:
    media_type = content_type.partition(";")[0].strip().lower()
    return media_type == "application/json"


def _unsupported(content_type: str | None) -> UnsupportedMediaTypeError:
    return UnsupportedMediaTypeError(
        "the request body must be JSON sent with 'Content-Type: application/json' "
        f"(got {content_type or 'no Content-Type'})",
        param="Content-Type",
    )


def require_json(request: Request) -> None:
    content_type = request.headers.get("content-type")
    if content_type is None or not is_json(content_type):
        raise _unsupported(content_type)
    encoding = ", ".join(request.headers.getlist("content-encoding"))
    if any(c.strip().lower() not in ("", "identity") for c in encoding.split(",")):
        raise UnsupportedMediaTypeError(
            f"Content-Encoding {encoding} is not supported: send the request body uncompressed",
            param="Content-Encoding",
        )


def refuse_non_json_body(request: Request) -> None:
    """For bodiless POSTs (cancel): no Content-Type, or JSON; never a form or text."""
    content_type = request.headers.get("content-type")
    if content_type is not None and not is_json(content_type):
        raise _unsupported(content_type)


async def read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isascii() and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLargeError(f"request body is larger than {limit} bytes")
    parts: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLargeError(f"request body is larger than {limit} bytes")
                parts.append(chunk)
    except TimeoutError:
        raise RequestTimeoutError(
            f"request body not received within {timeout_s:g} s ({size} bytes came)"
        ) from None
    return b"".join(parts)
