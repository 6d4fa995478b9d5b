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

from tokenspout.errors import ConfigError, PermissionDeniedError
from tokenspout.protocols.openai_errors import error_body


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` listens on loopback addresses only (a name is resolved:
    ``/etc/hosts`` may point any name at 127.0.0.1)."""
    if _loopback_address(host) or host == "localhost":
        return True
    try:
        found = [a[4][0] for a in socket.getaddrinfo(host, None)]
    except (OSError, UnicodeError):
        return False
    return bool(found) and all(_loopback_address(a) for a in found)


def _loopback_address(address: str) -> bool:
    try:  # without an IPv6 zone ("%eth0")
        return ipaddress.ip_address(str(address).split("%")[0]).is_loopback
    except ValueError:
        return False


def _name(host: str) -> str | None:
    """The name of a ``Host`` value or an ``--allowed-host`` (a port, a scheme and a final
    dot left out, lowercased); None if it is not one."""
    try:
        name = urlsplit(host if "://" in host else f"//{host}").hostname
    except ValueError:  # an unclosed "[" and such
        return None
    return name.rstrip(".") or None if name else None


def trusted_names(allowed_hosts: tuple[str, ...], allowed_origins: tuple[str, ...]) -> set[str]:
    """The names besides IP addresses and ``*.localhost`` (a ``*.`` one stands for its
    subdomains); ``ConfigError`` for an ``--allowed-host`` that is no name."""
    names = {"localhost", socket.gethostname().lower().rstrip(".")}
    for host in allowed_hosts:
        wildcard = host.startswith("*.")
        name = "*" if host == "*" else _name(host[2:] if wildcard else host)
        if name is None:
            raise ConfigError(f"--allowed-host {host!r} is not a host name")
        names.add(f"*.{name}" if wildcard else name)
    names.update(_name(o) or "" for o in allowed_origins if o != "*")
    names.discard("")
    return names


def host_allowed(host: str | None, names: set[str]) -> bool:
    """Whether a request's ``Host`` header names this machine; a request without one is
    not a browser's (browsers always send it)."""
    if host is None or "*" in names:
        return True
    name = _name(host)
    if name is None:
        return False
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        pass
    if name in names or name.endswith(".localhost"):
        return True
    return any(n.startswith("*.") and name.endswith(n[1:]) for n in names)


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
