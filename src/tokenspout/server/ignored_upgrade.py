"""An ``Upgrade`` the server does not take (``h2c`` from ``curl --http2``, Java's HTTP client)
is ignored, as RFC 9110 §7.8 allows: the request is served as HTTP/1.1, body included.

httptools (llhttp) cannot be told so: it takes any ``Connection: upgrade`` request with an
``Upgrade`` header for a protocol switch, ends the message at its head and stops, so the body
never reaches the app (uvicorn served a POST with an empty body, then answered its body's
bytes with a 400) (uvicorn issue #2722). The head is parsed again, without its ``Upgrade``
header, by a fresh parser, which then reads the body and what follows as usual.
"""

from __future__ import annotations


def head_without_upgrade(
    method: bytes, target: bytes, version: str, headers: list[tuple[bytes, bytes]]
) -> bytes:
    """The request head as parsed (``headers`` as uvicorn keeps them), less its ``Upgrade``."""
    lines = [b"%s %s HTTP/%s" % (method, target, version.encode())]
    lines += [name + b": " + value for name, value in headers if name != b"upgrade"]
    return b"\r\n".join(lines) + b"\r\n\r\n"
