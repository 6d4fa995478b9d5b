"""The seed article's endpoint by POST and GET, with the streaming headers."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.conftest import RunningServer

STREAM_HEADERS = {
    "content-type": "text/event-stream",
    "cache-control": "no-cache",
    "x-accel-buffering": "no",
}


def events(body: str) -> list[str]:
    return [line[len("data: ") :] for line in body.splitlines() if line.startswith("data: ")]


@pytest.mark.parametrize("method", ["POST", "GET"])
def test_seed_format(synthetic_server: RunningServer, method: str) -> None:
    url = f"{synthetic_server.url}/v1/completions/stream"
    if method == "POST":
        r = httpx.post(url, json={"prompt": "hello world", "max_tokens": 6})
    else:
        r = httpx.get(url, params={"prompt": "hello world", "max_tokens": 6})
    assert r.status_code == 200
    for name, value in STREAM_HEADERS.items():
        assert r.headers[name] == value
    assert r.headers["x-stream-id"]
    data = events(r.text)
    assert data[-1] == "[DONE]"
    tokens = [json.loads(d)["token"] for d in data[:-1]]
    assert "".join(tokens) == "hello world hello world hello world "
    assert tokens[0] == "hello ", "the first token is sent alone, at once"


def test_get_validates_query(synthetic_server: RunningServer) -> None:
    url = f"{synthetic_server.url}/v1/completions/stream"
    for params in (
        {"max_tokens": "5"},
        {"prompt": "a", "max_tokens": "many"},
        {"prompt": "a", "max_tokens": "0"},
        {"prompt": "a", "chat": "maybe"},
    ):
        r = httpx.get(url, params=params)
        assert r.status_code == 400, params
        assert r.json()["error"]["type"] == "invalid_request_error"
    # Bytes that are not UTF-8 (a lone surrogate's, a stray 0xFF) are refused as a body's
    # are, not turned into U+FFFD and generated from.
    for raw in ("prompt=%ED%A0%80&max_tokens=2", "prompt=%FF%FE&max_tokens=2"):
        r = httpx.get(f"{url}?{raw}")
        assert r.status_code == 400, raw
        assert r.json()["error"]["param"] == "prompt", r.text
    assert httpx.get(f"{url}?prompt=caf%C3%A9+au+lait&max_tokens=2").status_code == 200


@pytest.mark.parametrize("accept", ["text/event-stream", "application/x-ndjson"])
def test_usage_is_refused_where_no_event_could_carry_it(
    synthetic_server: RunningServer, accept: str
) -> None:
    """A ``{"token": ...}`` event has no place for a usage: ``include_usage`` is a 400 naming
    it, as the GET's query refuses it, not a 200 whose events never carry one."""
    url = f"{synthetic_server.url}/v1/completions/stream"
    for options, field in (
        ({"include_usage": True}, "include_usage"),
        ({"include_usage": True, "continuous_usage_stats": True}, "include_usage"),
        ({"include_usage": False, "continuous_usage_stats": True}, "continuous_usage_stats"),
    ):
        body = {"prompt": "a b c", "max_tokens": 4, "stream_options": options}
        r = httpx.post(url, json=body, headers={"Accept": accept})
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == f"stream_options.{field}", error
        assert "carry no usage" in error["message"], error
    assert httpx.get(url, params={"prompt": "a", "include_usage": "true"}).status_code == 400
    # The knobs it honours are still taken: one event per token; a usage not asked for is no
    # refusal.
    options = {"flush_tokens": 1, "flush_ms": 0, "resumable": True, "include_usage": False,
               "continuous_usage_stats": False}  # fmt: skip
    r = httpx.post(url, json={"prompt": "a b", "max_tokens": 3, "stream_options": options})
    assert r.status_code == 200
    assert events(r.text) == ['{"token":"a "}', '{"token":"b "}', '{"token":"a "}', "[DONE]"]


def test_ndjson_by_accept(synthetic_server: RunningServer) -> None:
    r = httpx.post(
        f"{synthetic_server.url}/v1/completions/stream",
        json={"prompt": "x y", "max_tokens": 4},
        headers={"Accept": "application/x-ndjson"},
    )
    assert r.headers["content-type"] == "application/x-ndjson"
    lines = [json.loads(line) for line in r.text.splitlines() if line]
    assert "".join(obj["token"] for obj in lines) == "x y x y "


def test_another_sites_pages_cannot_start_a_generation_by_get(start_server) -> None:  # type: ignore[no-untyped-def]
    # A GET needs no preflight: any page could make a browser start generations here.
    server: RunningServer = start_server()
    url = f"{server.url}/v1/completions/stream?prompt=a&max_tokens=2"
    for headers in ({"Origin": "https://evil.example"}, {"Sec-Fetch-Site": "cross-site"}):
        r = httpx.get(url, headers=headers)
        assert r.status_code == 403 and r.json()["error"]["code"] == "permission_denied", headers
    same = {"Origin": server.url, "Sec-Fetch-Site": "same-origin"}
    assert httpx.get(url, headers=same).status_code == 200
    assert httpx.get(url).status_code == 200  # no browser: neither header
    allowed: RunningServer = start_server(allowed_origins=("https://app.example",))
    page = {"Origin": "https://app.example", "Sec-Fetch-Site": "cross-site"}
    url = f"{allowed.url}/v1/completions/stream?prompt=a&max_tokens=2"
    assert httpx.get(url, headers=page).status_code == 200
