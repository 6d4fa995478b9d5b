"""A URL as it may be shown in logs, errors and metric labels."""

from __future__ import annotations

from urllib.parse import urlsplit


def address(url: str) -> str:
    """``url`` without user info, query or fragment (where passwords go: ``user:pw@``,
    Redis's ``?password=``): safe to log and to use as a label."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:  # an IPv6 literal
        host = f"[{host}]"
    port = f":{parts.port}" if parts.port is not None else ""
    return f"{parts.scheme}://{host}{port}{parts.path.rstrip('/')}"
