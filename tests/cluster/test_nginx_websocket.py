"""The page's WebSocket through the shipped nginx config: the browser sends
``Origin: http://host:port`` and the server compares it with the ``Host`` nginx passes on."""

from __future__ import annotations

import json
from collections.abc import Callable

from tests.cluster.conftest import needs_nginx
from tests.conftest import RunningServer


@needs_nginx
def test_the_pages_websocket_through_nginx_passes_the_same_origin_check(
    synthetic_server: RunningServer, start_nginx: Callable[[list[int]], str]
) -> None:
    from websockets.sync.client import connect

    url = start_nginx([synthetic_server.port])
    # What Chromium sends for a page loaded from nginx's address (port included).
    with connect(url.replace("http", "ws") + "/v1/ws", origin=url) as ws:  # type: ignore[arg-type]
        ws.send(json.dumps({"type": "generate", "id": "a", "prompt": "one two", "max_tokens": 2}))
        kinds = []
        while not kinds or kinds[-1] not in ("done", "error"):
            kinds.append(json.loads(ws.recv())["type"])
    assert kinds[-1] == "done", kinds
