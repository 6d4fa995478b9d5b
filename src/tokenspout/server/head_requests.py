"""``HEAD``: what a ``GET`` of the same URL would answer, without its body (RFC 9110 9.3.2),
for uptime checks (``curl -I``) and caches. FastAPI's ``GET`` routes do not answer it (a 405).
Never on a ``GET`` that does more than read: one that generates (the seed's stream) must not
start a model, and a resume must not subscribe to its stream (it counted a resume, logged a
request the client left, and kept an abandoned stream generating past its grace)."""

from __future__ import annotations

from collections.abc import Callable, Collection

from starlette.routing import compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send


def path_matcher(route_paths: Collection[str]) -> Callable[[str], bool]:
    """True for a path one of ``route_paths`` (``/v1/streams/{stream_id}``) matches."""
    patterns = [compile_path(path)[0] for path in route_paths]
    return lambda path: any(pattern.match(path) for pattern in patterns)


class HeadAsGet:
    """Runs ``HEAD`` as ``GET`` and sends its status and headers with an empty body, but on
    paths ``refused`` matches, which keep their 405."""

    def __init__(self, app: ASGIApp, refused: Callable[[str], bool]):
        self.app = app
        self.refused = refused

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD" or self.refused(scope["path"]):
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
