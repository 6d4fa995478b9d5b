"""Two tenants on one server, from outside: ownership, limits, 401/403/429."""

from __future__ import annotations

import itertools
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect as sync_connect

from tests.conftest import RunningServer, free_port
from tokenspout.engine.synthetic_engine import SyntheticEngine

KEYS = """
[[keys]]
name = "alice"
key = "sk-alice-secret"
max_concurrent_streams = 2

[[keys]]
name = "bob"
key = "sk-bob-secret"

[[keys]]
name = "carol"
key = "sk-carol-secret"
models = ["some-other-model"]

[[keys]]
name = "dave"
key = "sk-dave-secret"
requests_per_minute = 2
"""
ALICE = {"Authorization": "Bearer sk-alice-secret"}
BOB = {"Authorization": "Bearer sk-bob-secret"}
LONG = {
    "messages": [{"role": "user", "content": "a b c"}],
    "max_tokens": 2000,
    "stream": True,
    "stream_options": {"resumable": True},
}


@pytest.fixture
def tenants(start_server, tmp_path: Path) -> RunningServer:  # type: ignore[no-untyped-def]
    path = tmp_path / "keys.toml"
    path.write_text(KEYS)
    server: RunningServer = start_server(
        SyntheticEngine(itl_ms=5), api_keys_file=str(path), metrics_api_key="metrics-secret"
    )
    return server


def test_more_choices_than_a_key_or_the_server_may_stream_is_400_not_429(
    tenants: RunningServer, start_server
) -> None:  # type: ignore[no-untyped-def]
    body = {"prompt": "a", "max_tokens": 2, "n": 3}
    r = httpx.post(f"{tenants.url}/v1/completions", json=body, headers=ALICE)  # 2 at once
    assert r.status_code == 400 and r.json()["error"]["param"] == "n", r.text
    assert httpx.post(f"{tenants.url}/v1/completions", json=body, headers=BOB).status_code == 200
    # Its three streams are counted open and closed alike: the gauge went to -2.
    metrics = {"Authorization": "Bearer metrics-secret"}
    text = httpx.get(f"{tenants.url}/metrics", headers=metrics).text
    assert 'tokenspout_key_streams_open{key="bob"} 0.0' in text, text
    small: RunningServer = start_server(max_streams=2)
    r = httpx.post(f"{small.url}/v1/completions", json=body)
    assert r.status_code == 400 and "--max-streams" in r.json()["error"]["message"]
    # Within the limit, n=2 is served: the 400 is for what could never run.
    assert httpx.post(f"{small.url}/v1/completions", json={**body, "n": 2}).status_code == 200


def test_one_key_cannot_touch_another_keys_stream(tenants: RunningServer) -> None:
    url = tenants.url
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=LONG, headers=ALICE) as r:
        assert r.status_code == 200
        stream_id = r.headers["x-stream-id"]
        # Unguessable: at least 96 random bits (16 base64url characters).
        assert len(stream_id) >= 16
        lines = r.iter_lines()
        first = next(line for line in lines if line.startswith("id: "))
        event_id = first[4:]
        for where, kwargs in (
            (f"/v1/streams/{stream_id}", {}),
            (f"/v1/streams/{stream_id}", {"params": {"last_event_id": event_id}}),
            ("/v1/completions/stream", {"params": {"last_event_id": event_id, "prompt": "x"}}),
        ):
            other = httpx.get(url + where, headers=BOB, **kwargs)  # type: ignore[arg-type]
            assert other.status_code == 404, where
            assert other.json()["error"]["code"] == "stream_not_found"
        # The same 404 as an id that was never issued: nothing tells the stream exists.
        unknown = httpx.post(f"{url}/v1/streams/nosuchstream00000/cancel", headers=BOB)
        cancel = httpx.post(f"{url}/v1/streams/{stream_id}/cancel", headers=BOB)
        assert cancel.status_code == unknown.status_code == 404
        assert cancel.json()["error"]["code"] == unknown.json()["error"]["code"]
        # The owner can follow and cancel it.
        with httpx.stream(
            "GET",
            f"{url}/v1/streams/{stream_id}",
            headers=ALICE,
            params={"last_event_id": event_id},
        ) as follow:
            assert follow.status_code == 200
        assert httpx.post(f"{url}/v1/streams/{stream_id}/cancel", headers=ALICE).status_code == 200
        rest = list(lines)
    assert rest[-1] == "data: [DONE]" or rest[-2:] == ["data: [DONE]", ""]
    assert any('"cancelled"' in line for line in rest)


def test_an_expired_stream_is_gone_for_its_owner_and_unknown_to_others(
    start_server,  # type: ignore[no-untyped-def]
    tmp_path: Path,
) -> None:
    path = tmp_path / "keys.toml"
    path.write_text(KEYS)
    server: RunningServer = start_server(
        SyntheticEngine(), api_keys_file=str(path), resume_ttl_s=0.2
    )
    short = {**LONG, "max_tokens": 3}
    r = httpx.post(f"{server.url}/v1/chat/completions", json=short, headers=ALICE)
    stream_id = r.headers["x-stream-id"]
    url = f"{server.url}/v1/streams/{stream_id}"
    deadline = time.monotonic() + 10
    while (mine := httpx.get(url, headers=ALICE)).status_code == 200:
        assert time.monotonic() < deadline, "never expired"
    assert mine.status_code == 410 and "expired" in mine.json()["error"]["message"]
    theirs = httpx.get(url, headers=BOB)
    unknown = httpx.get(f"{server.url}/v1/streams/nosuchstream00000", headers=BOB)
    assert theirs.status_code == unknown.status_code == 404
    assert theirs.json()["error"]["code"] == unknown.json()["error"]["code"]
    cancel = httpx.post(f"{url}/cancel", headers=BOB)
    assert cancel.status_code == 404


def test_third_concurrent_stream_gets_429_with_retry_after(tenants: RunningServer) -> None:
    url = f"{tenants.url}/v1/chat/completions"
    with (
        httpx.stream("POST", url, json=LONG, headers=ALICE) as one,
        httpx.stream("POST", url, json=LONG, headers=ALICE) as two,
    ):
        assert one.status_code == two.status_code == 200
        third = httpx.post(url, json=LONG, headers=ALICE)
        assert third.status_code == 429
        assert int(third.headers["retry-after"]) >= 1
        error = third.json()["error"]
        assert error["code"] == "rate_limit_exceeded" and "alice" in error["message"]
        # Another key is not affected by alice's limit.
        with httpx.stream("POST", url, json=LONG, headers=BOB) as bobs:
            assert bobs.status_code == 200
    metrics = httpx.get(
        f"{tenants.url}/metrics", headers={"Authorization": "Bearer metrics-secret"}
    ).text
    assert 'tokenspout_key_rate_limited_total{key="alice",limit="streams"} 1.0' in metrics
    assert 'tokenspout_key_requests_total{key="bob"} 1.0' in metrics
    assert "secret" not in metrics.replace("metrics-secret", "")


def test_requests_per_minute(tenants: RunningServer) -> None:
    url = f"{tenants.url}/v1/completions"
    body = {"prompt": "x", "max_tokens": 2}
    dave = {"Authorization": "Bearer sk-dave-secret"}
    codes = [httpx.post(url, json=body, headers=dave).status_code for _ in range(4)]
    assert codes == [200, 200, 429, 429]


def test_wrong_key_and_disallowed_model(tenants: RunningServer) -> None:
    url = f"{tenants.url}/v1/completions"
    body = {"prompt": "x", "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer sk-alice"}, {"Authorization": "sk-bob-secret"}):
        r = httpx.post(url, json=body, headers=headers)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert r.json()["error"]["code"] == "invalid_api_key"
    carol = {"Authorization": "Bearer sk-carol-secret"}
    r = httpx.post(url, json=body, headers=carol)
    assert r.status_code == 403 and r.json()["error"]["param"] == "model"
    # Nor is carol shown the model she may not use; the others are.
    models = f"{tenants.url}/v1/models"
    assert httpx.get(models, headers=carol).json()["data"] == []
    assert httpx.get(f"{models}/synthetic", headers=carol).status_code == 404
    assert [m["id"] for m in httpx.get(models, headers=BOB).json()["data"]] == ["synthetic"]
    # /metrics: only with its own key.
    assert httpx.get(f"{tenants.url}/metrics").status_code == 401
    assert httpx.get(f"{tenants.url}/metrics", headers=ALICE).status_code == 401
    # The dashboard's data holds the same numbers: the same key, also as ?api_key= (the page
    # passes on its own query's).
    data = f"{tenants.url}/dashboard/data"
    assert httpx.get(data).status_code == 401
    assert httpx.get(data, headers=ALICE).status_code == 401
    assert httpx.get(data + "?api_key=sk-alice").status_code == 401
    assert httpx.get(data, headers={"Authorization": "Bearer metrics-secret"}).status_code == 200
    assert httpx.get(data + "?api_key=metrics-secret").status_code == 200
    assert httpx.get(f"{tenants.url}/dashboard").status_code == 200  # the page itself
    assert httpx.get(f"{tenants.url}/health").status_code == 200


async def test_websocket_handshake_needs_a_key_and_streams_are_per_key(
    tenants: RunningServer,
) -> None:
    ws = tenants.url.replace("http://", "ws://") + "/v1/ws"
    for bad in ("", "?api_key=sk-alice"):
        with pytest.raises(InvalidStatus) as info:
            async with connect(ws + bad):
                pass
        assert info.value.response.status_code == 401
        assert info.value.response.headers["www-authenticate"] == "Bearer"
    body = {k: v for k, v in LONG.items() if k != "stream_options"}  # never resumable here
    async with (
        connect(ws, additional_headers=ALICE) as alice,
        connect(ws + "?api_key=sk-bob-secret") as bob,
    ):
        await alice.send(json.dumps({"type": "generate", "id": "s1", **body}))
        assert json.loads(await alice.recv())["type"] == "delta"
        await bob.send(json.dumps({"type": "cancel", "id": "s1"}))
        # Answered as a cancel of no stream: ignored (messages are handled in order, so the
        # next reply is the one to this bad generate).
        await bob.send(json.dumps({"type": "generate", "id": "b", "prompt": "x", "max_tokens": 0}))
        reply = json.loads(await bob.recv())
        assert reply["type"] == "error" and reply["id"] == "b"
        assert json.loads(await alice.recv())["type"] == "delta"  # still running
        # The WebSocket's stream counts against alice's limit of two like any other.
        await alice.send(json.dumps({"type": "generate", "id": "s2", **body}))
        await alice.send(json.dumps({"type": "generate", "id": "s3", **body}))
        while True:
            message = json.loads(await alice.recv())
            if message["type"] == "error":
                break
        assert message["id"] == "s3" and message["error"]["code"] == "rate_limit_exceeded"


async def test_a_websocket_whose_key_was_revoked_starts_no_more_streams(
    tenants: RunningServer, tmp_path: Path
) -> None:
    ws = tenants.url.replace("http://", "ws://") + "/v1/ws"
    short = {"prompt": "x y", "max_tokens": 2}
    async with connect(ws, additional_headers=BOB) as bob:
        await bob.send(json.dumps({"type": "generate", "id": "before", **short}))
        while (message := json.loads(await bob.recv()))["type"] == "delta":
            pass
        assert message["type"] == "done"
        (tmp_path / "keys.toml").write_text(KEYS.replace("sk-bob-secret", "sk-bob-rotated"))
        assert tenants.state.keys.reload()
        await bob.send(json.dumps({"type": "generate", "id": "after", **short}))
        refusal = json.loads(await bob.recv())
    assert refusal["type"] == "error" and refusal["id"] == "after", refusal
    assert refusal["error"]["code"] == "invalid_api_key"
    async with connect(ws, additional_headers=ALICE) as alice:  # a key kept works on
        await alice.send(json.dumps({"type": "generate", "id": "a", **short}))
        assert json.loads(await alice.recv())["type"] == "delta"


def test_tokens_per_minute_charges_max_tokens_ahead_and_gives_back_the_rest(
    start_server,  # type: ignore[no-untyped-def]
    tmp_path: Path,
) -> None:
    path = tmp_path / "keys.toml"
    path.write_text('[[keys]]\nname = "erin"\nkey = "sk-erin"\ntokens_per_minute = 200\n')
    server: RunningServer = start_server(SyntheticEngine(itl_ms=5), api_keys_file=str(path))
    url = f"{server.url}/v1/completions"
    erin = {"Authorization": "Bearer sk-erin"}
    # Answers that stop after a word give back the rest of their 90 (charged 92 each and
    # given nothing back, they would leave the bucket empty for the requests below).
    for _ in range(3):
        r = httpx.post(url, json={"prompt": "x y", "max_tokens": 90, "stop": ["y"]}, headers=erin)
        assert r.status_code == 200, r.text
    # At once, the requests could all pass against a full bucket when only their prompts
    # were charged as they opened: now the third finds the first two's 118s charged
    # (what the bucket holds by then is between 185 and 200).
    long = {"prompt": "x y", "max_tokens": 118, "stream": True}
    with (
        httpx.stream("POST", url, json=long, headers=erin) as first,
        httpx.stream("POST", url, json=long, headers=erin) as second,
    ):
        assert (first.status_code, second.status_code) == (200, 200)
        third = httpx.post(url, json=long, headers=erin)
        assert third.status_code == 429 and third.json()["error"]["code"] == "rate_limit_exceeded"


def _serve(*args: str) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "tokenspout.cli", "serve", "--engine", "synthetic", *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ('[[keys]]\nname = "a"\n', "exactly one of key or key_sha256"),
        ('[[keys]]\nname = "a"\nkey = "s1"\n[[keys]]\nname = "b"\nkey = "s1"\n', "same secret"),
        ('[[keys]]\nname = "a"\nkey = "s1"\n[[keys]]\nname = "a"\nkey = "s2"\n', "used twice"),
        ('[[keys]]\nname = "default"\nkey = "s1"\n', "used twice"),  # --api-key's name
    ],
)
def test_malformed_keys_file_exits_2_with_one_line(tmp_path: Path, text: str, says: str) -> None:
    path = tmp_path / "keys.toml"
    path.write_text(text)
    proc = _serve("--api-keys-file", str(path), "--api-key", "sk-x", "--port", str(free_port()))
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and says in lines[0], err


def test_sighup_reloads_keys_without_dropping_streams(tmp_path: Path) -> None:
    path = tmp_path / "keys.toml"
    path.write_text('[[keys]]\nname = "a"\nkey = "sk-old"\n')
    port = free_port()
    proc = _serve("--api-keys-file", str(path), "--port", str(port), "--synthetic-itl-ms", "5")
    url = f"http://127.0.0.1:{port}"
    try:
        assert proc.stderr is not None
        for line in proc.stderr:  # the server says when it listens
            if "Uvicorn running" in line:
                break
        old = {"Authorization": "Bearer sk-old"}
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=LONG, headers=old) as r:
            lines = r.iter_lines()
            assert r.status_code == 200
            next(lines)
            path.write_text('[[keys]]\nname = "a"\nkey = "sk-new"\n')
            os.kill(proc.pid, signal.SIGHUP)
            for line in proc.stderr:
                if "keys file reloaded" in line:
                    break
            new = {"Authorization": "Bearer sk-new"}
            body = {"prompt": "x", "max_tokens": 2}
            assert httpx.post(f"{url}/v1/completions", json=body, headers=new).status_code == 200
            assert httpx.post(f"{url}/v1/completions", json=body, headers=old).status_code == 401
            # A broken file on reload: an error line, the keys in use stay.
            path.write_text("[[keys]\n")
            os.kill(proc.pid, signal.SIGHUP)
            for line in proc.stderr:
                if "keys file not reloaded" in line:
                    break
            assert httpx.post(f"{url}/v1/completions", json=body, headers=new).status_code == 200
            # The stream opened with the old key is still flowing (11 events are enough: the
            # whole stream would take 2,000 tokens' time).
            events = (line for line in lines if line.startswith("data: {"))
            assert len(list(itertools.islice(events, 11))) == 11
            # Its key's new secret may end it (a resumable stream left unread would otherwise
            # go on generating, and the shutdown would wait for it).
            cancel = f"{url}/v1/streams/{r.headers['x-stream-id']}/cancel"
            assert httpx.post(cancel, headers=new).status_code == 200
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_sighup_without_a_keys_file_is_ignored() -> None:
    port = free_port()
    proc = _serve("--api-key", "sk-x", "--port", str(port), "--log-level", "info")
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            if "Uvicorn running" in line:
                break
        os.kill(proc.pid, signal.SIGHUP)
        for line in proc.stderr:
            if "nothing to reload" in line:
                break
        health = httpx.get(f"http://127.0.0.1:{port}/health")
        assert health.status_code == 200 and proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_request_log_names_the_key_never_the_secret(tenants: RunningServer, caplog) -> None:  # type: ignore[no-untyped-def]
    with caplog.at_level(logging.INFO, logger="tokenspout.requests"):
        body = {"prompt": "x", "max_tokens": 2}
        r = httpx.post(f"{tenants.url}/v1/completions", json=body, headers=BOB)
        assert r.status_code == 200
        deadline = time.monotonic() + 10
        while not [rec for rec in caplog.records if rec.name == "tokenspout.requests"]:
            assert time.monotonic() < deadline, "no request log line"
            time.sleep(0.01)  # polling for the line written after the last byte
    (line,) = [json.loads(rec.getMessage()) for rec in caplog.records
               if rec.name == "tokenspout.requests"]  # fmt: skip
    assert line["key"] == "bob"
    assert "sk-bob" not in json.dumps(line)


def test_a_key_sent_as_a_parameter_works_and_never_reaches_the_log() -> None:
    """Browsers send the key as ``?api_key=`` on a WebSocket and an EventSource (a GET): it
    authenticates there, and uvicorn's access and handshake logs print it blanked."""
    secret = "sk-param-secret-123"
    port = free_port()
    proc = _serve("--api-key", secret, "--port", str(port), "--log-level", "info")
    url = f"http://127.0.0.1:{port}"
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            if "Uvicorn running" in line:
                break
        seed = f"{url}/v1/completions/stream"
        params = {"prompt": "a b", "max_tokens": "2"}
        ok = httpx.get(seed, params={**params, "api_key": secret})
        assert ok.status_code == 200 and ok.text.rstrip().endswith("data: [DONE]")
        assert httpx.get(seed, params={**params, "api_key": "wrong"}).status_code == 401
        # Only GET: a POST carries its key in the Authorization header.
        body = {"prompt": "a", "max_tokens": 1}
        posted = httpx.post(f"{url}/v1/completions", params={"api_key": secret}, json=body)
        assert posted.status_code == 401
        encoded = httpx.get(f"{url}/v1/models?api%5Fkey={secret}")
        assert encoded.status_code == 200
        with sync_connect(f"ws://127.0.0.1:{port}/v1/ws?api_key={secret}"):
            pass
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=60)
    logs = out + err  # uvicorn's access lines go to stdout, the rest to stderr
    assert secret not in logs
    assert "Logging error" not in logs, logs
    # Printed, blanked: the four requests' access lines and the handshake line; and the two
    # GETs' prompts (no --log-prompts).
    assert logs.count("[redacted]") == 7, logs
    assert (
        '"GET /v1/completions/stream?prompt=[redacted]&max_tokens=2&api_key=[redacted] HTTP' in logs
    )
