"""``HEAD``: what a ``GET`` of the same URL would answer, without its body (RFC 9110 9.3.2),
for uptime checks (``curl -I``) and caches. FastAPI's ``GET`` routes do not answer it (a 405).
Never on a ``GET`` that generates (the seed's stream): a ``HEAD`` must not start a model."""

from __future__ import annotations

from collections.abc import Collection

from starlette.types import ASGIApp, Message, Receive, Scope, Send


class HeadAsGet:
    """Runs ``HEAD`` as ``GET`` and sends its status and headers with an empty body, but on
    ``generating`` paths, which keep their 405."""

    def __init__(self, app: ASGIApp, generating: Collection[str]):
        self.app = app
        self.generating = frozenset(generating)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD" or scope["path"] in self.generating:
            await self.app(scope, receive, send)
            return
        sent_end = False

        async def headers_only(message: Message) -> None:
            nonlocal sent_end
            if message["type"] != "http.response.body":
                await send(message)
            elif not sent_end:  # the body's first part ends it: the rest is dropped
                sent_end = True
                await send({"type": "http.response.body", "body": b"", "more_body": False})

        await self.app({**scope, "method": "GET"}, receive, headers_only)
