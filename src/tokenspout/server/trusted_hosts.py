"""Which ``Host`` names a server bound to a loopback address answers to: protection against
DNS rebinding.

A page on ``attacker.example`` whose name the attacker then points at 127.0.0.1 is, to the
browser, same-origin with this server: it could POST to ``/v1/chat/completions`` without a
preflight, read the answer, and pass the WebSocket's same-origin check (Ollama's
CVE-2024-28224 was this). The request still says ``Host: attacker.example``, so a server
that only this machine can reach answers only to names that mean this machine: IP
addresses (which rebinding cannot forge), ``localhost`` and ``*.localhost``, the machine's
own name, the hosts of ``--allowed-origin``, and ``--allowed-host`` (a reverse proxy's
name; ``*`` turns the check off). A server bound to another address is reachable from
elsewhere anyway, under whatever names point at it: it takes any.

Starlette's ``TrustedHostMiddleware`` matches name patterns only (no "any IP address") and
refuses in plain text; this one refuses with a 403 in OpenAI's error shape, counted as
every refusal is.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from tokenspout.errors import PermissionDeniedError
from tokenspout.protocols.openai_errors import error_body


def is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return address == "localhost"


def trusted_names(allowed_hosts: tuple[str, ...], allowed_origins: tuple[str, ...]) -> set[str]:
    """The names besides IP addresses and ``*.localhost``, lowercased."""
    names = {"localhost", socket.gethostname().lower(), *(h.lower() for h in allowed_hosts)}
    names.update((urlsplit(o).hostname or "") for o in allowed_origins if o != "*")
    names.discard("")
    return names


def host_allowed(host: str | None, names: set[str]) -> bool:
    """Whether a request's ``Host`` header names this machine; a request without one is
    not a browser's (browsers always send it)."""
    if host is None or "*" in names:
        return True
    name = urlsplit(f"//{host}").hostname
    if name is None:
        return False
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return name in names or name.endswith(".localhost")


class TrustedHostMiddleware:
    """Refuses (403) an HTTP request or WebSocket handshake whose ``Host`` is not trusted."""

    def __init__(self, app: ASGIApp, names: set[str], on_refused: Callable[[], None]):
        self.app = app
        self.names = names
        self.on_refused = on_refused

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            host = Headers(scope=scope).get("host")
            if not host_allowed(host, self.names):
                self.on_refused()
                err = PermissionDeniedError(
                    f"this server does not answer to the name {host!r} (DNS rebinding "
                    f"protection); start it with --allowed-host NAME to allow a name",
                    code="host_not_allowed",
                )
                await JSONResponse(error_body(err), status_code=403)(scope, receive, send)
                return
        await self.app(scope, receive, send)
