"""The browser page at ``/`` and its files under ``/static/``, served from the package
(plain ES modules: no build step, no Node at run time)."""

from __future__ import annotations

from importlib.resources import files

from fastapi import APIRouter
from starlette.exceptions import HTTPException
from starlette.responses import Response

router = APIRouter()

_WEB = files("tokenspout") / "web"
# Only these are served; ``/static/tokenspout.js`` is a stable path for other pages to import.
_JS = "text/javascript; charset=utf-8"
_STATIC = {
    "app.js": _JS,
    "tokenspout.js": _JS,
    "markdown.js": _JS,
    "open_paragraph.js": _JS,
    "open_table.js": _JS,
    "dashboard.js": _JS,
    "style.css": "text/css; charset=utf-8",
    # Third-party libraries, committed as published (see web/vendor/README.md).
    "vendor/marked.esm.js": _JS,
    "vendor/purify.es.mjs": _JS,
}
# The page runs only its own scripts and talks only to this server: even if model text
# were ever inserted as HTML, an injected script or inline handler would not run.
_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


def _file(name: str, media_type: str) -> Response:
    # no-cache: the browser revalidates, so an upgraded server never runs a stale page.
    headers = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}
    if media_type.startswith("text/html"):
        headers["Content-Security-Policy"] = _CSP
    return Response((_WEB / name).read_bytes(), media_type=media_type, headers=headers)


@router.get("/", include_in_schema=False)
async def index() -> Response:
    return _file("index.html", "text/html; charset=utf-8")


@router.get("/dashboard", include_in_schema=False)
async def dashboard() -> Response:
    return _file("dashboard.html", "text/html; charset=utf-8")


@router.get("/static/{name:path}", include_in_schema=False)
async def static(name: str) -> Response:
    media_type = _STATIC.get(name)
    if media_type is None:
        raise HTTPException(404, f"no static file {name!r}")
    return _file(name, media_type)
