"""The disconnect half of the race every response runs (see ARCHITECTURE.md)."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

from starlette.types import Receive

from tokenspout.server.cut_responses import cut_on_purpose


class DisconnectWatch:
    """Runs a response's body as its own task, racing it against the client leaving.

    A listener task waits for ``http.disconnect``; when it comes first, or when ``interrupt``
    is called (the send watchdog), the body is cancelled and ``run`` returns the reason.
    Plain asyncio rather than an anyio task group with cancel scopes: this runs once per
    request, and the task group's bookkeeping was a tenth of the server's CPU at 400 streams.
    The body runs in a task of its own so that each of its wake-ups (one per event) resumes
    a short stack rather than the dozen middleware frames above the response.

    Starlette's own ``StreamingResponse`` only listens on ASGI spec < 2.4 and never while a
    request is queued with nothing to send; owning the race lets a queued request whose
    client left be dropped before it is ever prefilled.
    """

    __slots__ = ("_body", "_receive", "reason")

    def __init__(self, receive: Receive):
        self._receive = receive
        self._body: asyncio.Task[Any] | None = None
        #: Why the body was stopped; None while it runs and after it ended by itself.
        self.reason: str | None = None

    async def run(self, body: Coroutine[Any, Any, Any]) -> str | None:
        """Run ``body``; return None if it ended by itself, else why it was stopped."""
        task = asyncio.current_task()
        assert task is not None
        loop = task.get_loop()
        self._body = loop.create_task(body)
        listener = loop.create_task(self._listen())
        try:
            await self._body
        except asyncio.CancelledError:
            # Ours only if nobody else (server shutdown) cancelled this task as well.
            if self.reason is None or task.cancelling():
                raise
        finally:
            self._body = None
            listener.cancel()
        if self.reason is not None:
            # Left incomplete on purpose: no "returned without completing" error in the log.
            cut_on_purpose(self.reason)
        return self.reason

    def interrupt(self, reason: str) -> None:
        """Stop the body with ``reason``; no effect once it has ended or was stopped."""
        if self._body is not None and self.reason is None:
            self.reason = reason
            self._body.cancel()

    async def _listen(self) -> None:
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                # Only a disconnect while the body runs means the client left: uvicorn also
                # reports one once the response is complete.
                self.interrupt("client_disconnect")
                return
