"""The disconnect half of the race every response runs (see ARCHITECTURE.md)."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

from starlette.types import Receive


class DisconnectWatch:
    """Runs a response's body in the current task, racing it against the client leaving.

    A listener task waits for ``http.disconnect``; when it comes first, or when ``interrupt``
    is called (the send watchdog), the body is cancelled and ``run`` returns the reason.
    Plain asyncio rather than an anyio task group with cancel scopes: this runs once per
    request, and the task group's bookkeeping was a tenth of the server's CPU at 400 streams.

    Starlette's own ``StreamingResponse`` only listens on ASGI spec < 2.4 and never while a
    request is queued with nothing to send; owning the race lets a queued request whose
    client left be dropped before it is ever prefilled.
    """

    def __init__(self, receive: Receive):
        self._receive = receive
        self._task: asyncio.Task[Any] | None = None
        #: Why the body was stopped; None while it runs and after it ended by itself.
        self.reason: str | None = None

    async def run(self, body: Coroutine[Any, Any, Any]) -> str | None:
        """Run ``body``; return None if it ended by itself, else why it was stopped."""
        task = asyncio.current_task()
        assert task is not None
        listener = task.get_loop().create_task(self._listen())
        self._task = task
        try:
            await body
        except asyncio.CancelledError:
            # Ours only if nobody else (server shutdown) cancelled the task as well.
            if self.reason is None or task.uncancel() > 0:
                raise
        finally:
            self._task = None
            listener.cancel()
        return self.reason

    def interrupt(self, reason: str) -> None:
        """Stop the body with ``reason``; no effect once it has ended or was stopped."""
        if self._task is not None and self.reason is None:
            self.reason = reason
            self._task.cancel()

    async def _listen(self) -> None:
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                # Only a disconnect while the body runs means the client left: uvicorn also
                # reports one once the response is complete.
                self.interrupt("client_disconnect")
                return
