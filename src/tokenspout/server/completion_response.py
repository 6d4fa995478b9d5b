"""The ASGI response for ``stream: false``: wait for the whole answer, or abort when the
client leaves first (the same race as streaming, with nothing to send meanwhile)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from starlette.background import BackgroundTask
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from tokenspout.protocols.openai_errors import error_body
from tokenspout.server.disconnect import DisconnectWatch
from tokenspout.server.metrics import Metrics
from tokenspout.server.request_record import RequestRecord
from tokenspout.streaming.stream import Stream, StreamEnd


class CompletionResponse(Response):
    """Sends ``build(text, end)`` as JSON once ``stream`` ends."""

    def __init__(
        self,
        stream: Stream,
        build: Callable[[str, StreamEnd], dict[str, Any]],
        metrics: Metrics,
        *,
        endpoint: str,
        started_at: float,
        prompt: str | None = None,
    ):
        # A Response subclass only so that FastAPI hands it over unchanged: the body is
        # produced in __call__, so Response.__init__ (which renders content) is not called.
        self.stream = stream
        self.status_code = 200
        self.background: BackgroundTask | None = None
        self.build = build
        self.record = RequestRecord(
            metrics, stream, endpoint=endpoint, transport="json", started_at=started_at,
            prompt=prompt,
        )  # fmt: skip

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        watch = DisconnectWatch(receive)
        self.stream.attach()
        try:
            left = await watch.run(self.stream.wait_end())
        finally:
            self.stream.detach(None if self.stream.finished else "client_disconnect")
        end = self.stream.end
        if left is not None or end is None:
            self.record.finish("client_disconnect")
            return
        if end.error is not None:
            status, body = end.error.status_code, error_body(end.error)
        else:
            status, body = 200, self.build(self.stream.text(), end)
        payload = json.dumps(body, ensure_ascii=False).encode("utf-8")
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(payload)).encode()),
            (b"x-stream-id", self.stream.id.encode()),
        ]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})
        self.record.finish("ok" if status == 200 else "error")
