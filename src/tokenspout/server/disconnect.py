"""The disconnect half of the race every response runs (see ARCHITECTURE.md)."""

from __future__ import annotations

import anyio
from starlette.types import Receive


class DisconnectWatch:
    """Listens for ``http.disconnect`` and cancels the body's scope when it comes.

    Starlette's own ``StreamingResponse`` only listens on ASGI spec < 2.4 and never while a
    request is queued with nothing to send; owning the race lets a queued request whose
    client left be dropped before it is ever prefilled.
    """

    def __init__(self) -> None:
        self.disconnected = False

    async def run(self, receive: Receive, scope: anyio.CancelScope) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self.disconnected = True
                scope.cancel()
                return
