"""The FastAPI application: routes, error handlers, and the engine's lifespan."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse
from starlette.routing import Match
from starlette.types import ASGIApp, Receive, Scope, Send

from tokenspout import __version__
from tokenspout.engine.interface import Engine
from tokenspout.errors import (
    InvalidRequestError,
    TokenspoutError,
)
from tokenspout.protocols.openai_errors import error_body
from tokenspout.server import (
    dashboard_data,
    model_routes,
    openai_routes,
    openapi_schema,
    seed_routes,
    stream_routes,
    system_routes,
    telemetry_routes,
    tokenize_routes,
    web_routes,
    websocket_routes,
)
from tokenspout.server.auth import ApiKeyMiddleware, AuthenticationError
from tokenspout.server.config import ServerConfig
from tokenspout.server.cors import JsonCorsMiddleware
from tokenspout.server.direct_routes import DirectRoutes, direct_table
from tokenspout.server.head_requests import HeadAsGet, path_matcher
from tokenspout.server.loop_lag import watch_loop_lag
from tokenspout.server.server_state import ServerState, state_of
from tokenspout.server.trusted_hosts import TrustedHostMiddleware, is_loopback, trusted_names

if TYPE_CHECKING:
    from tokenspout.server.otel_tracing import OtelTracing

logger = logging.getLogger("tokenspout")


def _error_response(
    request: Request, err: TokenspoutError, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    # Refusals are requests too: without this count, an error rate was invisible in /metrics.
    state_of(request).metrics.requests_refused.labels(str(err.status_code), str(err.code)).inc()
    headers = dict(headers or {})
    if err.retry_after_s is not None:
        headers["Retry-After"] = str(err.retry_after_s)
    if err.status_code in (408, 413):
        # The rest of the body is not read: the connection cannot carry another request.
        headers["Connection"] = "close"
    return JSONResponse(error_body(err), status_code=err.status_code, headers=headers)


async def _tokenspout_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, TokenspoutError)
    return _error_response(request, exc)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    err = InvalidRequestError(str(exc.detail), code=f"http_{exc.status_code}")
    err.status_code = exc.status_code
    headers = dict(exc.headers or {})
    if exc.status_code == 405:
        # Every method the path takes (RFC 9110 15.5.6): Starlette names only the first
        # route's, and a path with a GET and a POST route said "POST".
        headers["Allow"] = ", ".join(_allowed_methods(request))
    return _error_response(request, err, headers)


def _allowed_methods(request: Request) -> list[str]:
    methods: set[str] = set()
    for route in request.app.state.http_routes:
        match, _ = route.matches(request.scope)
        if match is not Match.NONE and getattr(route, "methods", None):
            methods |= route.methods
    if "GET" in methods and not _NO_HEAD(request.url.path):
        methods.add("HEAD")  # HeadAsGet answers it
    return sorted(methods)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return _error_response(request, InvalidRequestError(str(exc.errors())))


async def _direct_error(request: Request, exc: Exception) -> JSONResponse:
    if isinstance(exc, TokenspoutError):
        return _error_response(request, exc)
    return await _unexpected_error(request, exc)


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    if isinstance(exc, ClientDisconnect):
        # Routine: the client left while its body was arriving. Nobody reads this answer.
        logger.info("client left during its request body: %s %s", request.method, request.url.path)
        left = InvalidRequestError("the client left", code="client_disconnect")
        return _error_response(request, left)
    logger.exception("unhandled error on %s %s", request.method, request.url.path)
    err = TokenspoutError("internal server error; the request was not processed")
    return _error_response(request, err)


def create_app(engine: Engine, config: ServerConfig | None = None) -> FastAPI:
    """Build the app around an engine; the engine is started and stopped by the lifespan."""
    state = ServerState(engine, config or ServerConfig())
    tracing = _tracing(state.config)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await state.start_engine()
        if state.cluster is not None:
            await state.cluster.start(state)
        state.ready = True
        label = "SYNTHETIC engine (not a language model)" if engine.synthetic else "model"
        logger.info("serving %s %s", label, engine.model_id)
        lag_probe = asyncio.create_task(watch_loop_lag(state.metrics.event_loop_lag))
        try:
            yield
        finally:
            lag_probe.cancel()
            state.ready = False
            state.streams.abort_all("shutdown")
            if state.cluster is not None:
                await state.cluster.stop()
            await engine.shutdown()
            if tracing is not None:
                tracing.shutdown()

    app = TokenspoutApp(title="tokenspout", version=__version__, lifespan=lifespan)
    app.state.tokenspout = state
    routers = (
        system_routes.router, model_routes.router, stream_routes.router, openai_routes.router,
        seed_routes.router, tokenize_routes.router, websocket_routes.router,
        telemetry_routes.router, web_routes.router,
    )  # fmt: skip
    for router in routers:
        app.include_router(router)
    openapi_schema.describe(app)
    app.include_router(dashboard_data.router)
    #: Every HTTP route, for a 405's Allow (``_allowed_methods``): ours, and FastAPI's own
    #: (/openapi.json, /docs, /redoc), whose 405s had an empty Allow without them.
    fastapis = [r for r in app.router.routes if getattr(r, "methods", None)]
    ours = [r for x in (*routers, dashboard_data.router) for r in x.routes]
    app.state.http_routes = fastapis + ours
    app.add_middleware(HeadAsGet, refused=_NO_HEAD)
    direct: ASGIApp = DirectRoutes(_DIRECT, on_error=_direct_error)
    if state.keys.enabled or state.config.metrics_api_key is not None:
        refused = state.metrics.requests_refused.labels("401", AuthenticationError.code)
        auth = {
            "keys": state.keys,
            "metrics_key": state.config.metrics_api_key,
            "on_refused": refused.inc,
        }
        app.add_middleware(ApiKeyMiddleware, **auth)
        direct = ApiKeyMiddleware(direct, **auth)
    if state.config.allowed_origins:
        cors = {
            "allow_origins": list(state.config.allowed_origins),
            "allow_methods": ["GET", "POST"],
            # Any header a page's client adds (the openai JS SDK sends x-stainless-*), as
            # vLLM's server allows: the origin is what is checked.
            "allow_headers": ["*"],
            "expose_headers": ["X-Stream-Id", "Retry-After"],
        }
        app.add_middleware(JsonCorsMiddleware, **cors)
        direct = JsonCorsMiddleware(direct, **cors)
    if tracing is not None:
        from tokenspout.server.otel_tracing import TraceContextMiddleware

        routes = app.state.http_routes
        app.add_middleware(TraceContextMiddleware, tracing=tracing, routes=routes)
        direct = TraceContextMiddleware(direct, tracing, routes)
    if is_loopback(state.config.host):
        hosts = {
            "names": trusted_names(state.config.allowed_hosts, state.config.allowed_origins),
            "on_refused": state.metrics.requests_refused.labels("403", "host_not_allowed").inc,
        }
        app.add_middleware(TrustedHostMiddleware, **hosts)
        direct = TrustedHostMiddleware(direct, **hosts)
    app.direct_entry = direct
    app.add_exception_handler(TokenspoutError, _tokenspout_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _unexpected_error)
    return app


def _tracing(config: ServerConfig) -> OtelTracing | None:
    """The server's trace exporter with ``otlp_traces_endpoint``; OpenTelemetry is not even
    imported without it."""
    if config.otlp_traces_endpoint is None:
        return None
    from tokenspout.server.otel_tracing import OtelTracing

    return OtelTracing(config.otlp_traces_endpoint)


class TokenspoutApp(FastAPI):
    """FastAPI, with the generation endpoints answered before its middleware stack (see
    ``direct_routes``), behind the same API key and CORS middleware as the rest."""

    direct_entry: ASGIApp

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and (scope["method"], scope["path"]) in _DIRECT:
            scope["app"] = self
            await self.direct_entry(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


_DIRECT = direct_table(openai_routes.router, seed_routes.router)
#: GET routes HEAD must not run (``HeadAsGet``): those that start a generation, and a resume,
#: which subscribes to its stream. A HEAD there is a 405 (Allow: GET).
_NO_HEAD = path_matcher(
    [path for method, path in _DIRECT if method == "GET"] + [stream_routes.RESUME_PATH]
)
