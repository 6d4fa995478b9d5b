"""The generation endpoints, served from the app's entry on a short path around FastAPI's
middleware stack.

A stream lives for as long as its answer, and for all that time FastAPI's stack keeps about
ten middleware coroutines suspended above the response (exception handling, telemetry, body
limit, exit stacks, routing): a third of the memory an open stream held, ~100 µs of CPU per
request, and two wrapper calls on every send. These routes need none of it: their handlers
parse and validate the body themselves, and errors get the same OpenAI-shaped responses as
everywhere else, here. The same handlers stay registered with FastAPI too, so that the API
schema and the 405 for a wrong method are unchanged.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

Handler = Callable[[Request], Awaitable[Response]]
ErrorHandler = Callable[[Request, Exception], Awaitable[Response]]


def generation_router(routes: dict[tuple[str, str], Handler]) -> APIRouter:
    """Register ``(method, path) -> handler`` once: with FastAPI (API schema, 405 for a
    wrong method), and for ``DirectRoutes``, which reads its table from the router."""
    router = APIRouter()
    for (method, path), handler in routes.items():
        # An API route (in the schema; ``openapi_schema`` describes the body it parses).
        router.add_api_route(path, handler, methods=[method])
    return router


def direct_table(*routers: APIRouter) -> dict[tuple[str, str], Handler]:
    """The exact ``(method, path)`` matches of the routers' plain routes."""
    table: dict[tuple[str, str], Handler] = {}
    for router in routers:
        for route in router.routes:
            assert isinstance(route, Route) and route.methods is not None
            for method in route.methods - {"HEAD"}:
                table[method, route.path] = route.endpoint
    return table


class DirectRoutes:
    """An ASGI app for exact ``(method, path)`` matches of ``routes``; ``on_error`` turns an
    exception raised before the response started into a response."""

    def __init__(self, routes: dict[tuple[str, str], Handler], on_error: ErrorHandler):
        self.routes = routes
        self.on_error = on_error

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        handler = self.routes[scope["method"], scope["path"]]
        try:
            response = await handler(request)
        except Exception as exc:
            response = await self.on_error(request, exc)
        await response(scope, receive, send)
