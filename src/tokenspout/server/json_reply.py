"""One JSON body as a whole HTTP response on a raw ASGI ``send``: what the responses that
produce their own bodies (the whole completion; a stream refused before it began) answer
with, headers and all."""

from __future__ import annotations

import json
from typing import Any

from starlette.types import Send

from tokenspout.errors import TokenspoutError
from tokenspout.protocols.openai_errors import error_body


async def send_json(
    send: Send, status: int, body: dict[str, Any], stream_id: str, retry_after_s: int | None = None
) -> None:
    payload = json.dumps(body, ensure_ascii=False).encode("utf-8")
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(payload)).encode()),
        (b"x-stream-id", stream_id.encode()),
    ]
    if retry_after_s is not None:
        headers.append((b"retry-after", str(retry_after_s).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


async def send_error(send: Send, err: TokenspoutError, stream_id: str) -> None:
    """``err``'s status and OpenAI error body; an upstream's 429 says when to come back, as
    tokenspout's own 429s do."""
    await send_json(send, err.status_code, error_body(err), stream_id, err.retry_after_s)
