"""The generation endpoints answered around FastAPI's stack behave as the rest of the app:
OpenAI-shaped errors, a 500 for a bug (and the server goes on), 405 for a wrong method."""

from __future__ import annotations

import httpx

from tests.conftest import RunningServer
from tokenspout.engine.request import Prompt
from tokenspout.engine.synthetic_engine import SyntheticEngine


class _BuggyEngine(SyntheticEngine):
    """Raises an unexpected error while encoding one prompt."""

    def encode_completion(self, prompt: str) -> Prompt:
        if prompt == "crash":
            raise RuntimeError("a bug")
        return super().encode_completion(prompt)


def test_unexpected_error_is_a_500_json_and_the_server_goes_on(start_server) -> None:  # type: ignore[no-untyped-def]
    server: RunningServer = start_server(_BuggyEngine())
    for path in ("/v1/completions", "/v1/completions/stream"):
        r = httpx.post(f"{server.url}{path}", json={"prompt": "crash", "max_tokens": 2})
        assert r.status_code == 500
        assert r.json()["error"]["message"].startswith("internal server error")
        ok = httpx.post(f"{server.url}{path}", json={"prompt": "fine", "max_tokens": 2})
        assert ok.status_code == 200
    assert server.state.streams.running() == []


def test_invalid_request_and_wrong_method(start_server) -> None:  # type: ignore[no-untyped-def]
    server: RunningServer = start_server(SyntheticEngine())
    r = httpx.post(
        f"{server.url}/v1/chat/completions",
        content=b"{not json",
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 400
    assert r.json()["error"]["type"] == "invalid_request_error"
    assert httpx.put(f"{server.url}/v1/chat/completions", json={}).status_code == 405
    r = httpx.get(f"{server.url}/v1/completions/stream", params={"max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
