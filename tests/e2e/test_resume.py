"""Streams survive dropped connections: replay after Last-Event-ID, byte for byte."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterator
from itertools import islice, pairwise

import httpx
import pytest

from tests.conftest import RunningServer
from tokenspout.engine.synthetic_engine import SyntheticEngine

TRICKY = (
    'Ünïcödé <b>bold</b> <img src=x onerror="alert(1)"> 日本語のテキスト 😀👍🏽 "quotes" \\ end'
)


def sse_events(lines: Iterator[str]) -> Iterator[tuple[str | None, str]]:
    """(id, data) per event, per the WHATWG parsing rules we rely on."""
    event_id, data = None, []
    for line in lines:
        if line == "":
            if data:
                yield event_id, "\n".join(data)
            event_id, data = None, []
        elif line.startswith("id: "):
            event_id = line[4:]
        elif line.startswith("data: "):
            data.append(line[6:])


def chat_text(data: str) -> str:
    if data == "[DONE]":
        return ""
    chunk = json.loads(data)
    return "".join(c["delta"].get("content") or "" for c in chunk["choices"])


def seed_text(events: list[tuple[str | None, str]]) -> str:
    return "".join(json.loads(data)["token"] for _, data in events if data != "[DONE]")


def read_some(
    response: httpx.Response, max_events: int, out: list[str], last_id: str | None = None
) -> str | None:
    """Read up to ``max_events`` events, appending their text; returns the last event id
    (``last_id`` when none of them has one: a resume after the end's events sends only
    ``[DONE]``)."""
    for count, (event_id, data) in enumerate(sse_events(response.iter_lines()), start=1):
        out.append(chat_text(data))
        last_id = event_id or last_id
        if data == "[DONE]" or count >= max_events:
            break
    return last_id


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_chat_stream_cut_three_times_resumes_exactly(start_server, seed: int) -> None:  # type: ignore[no-untyped-def]
    server: RunningServer = start_server(SyntheticEngine(itl_ms=2))
    rng = random.Random(seed)
    body = {"messages": [{"role": "user", "content": TRICKY}], "max_tokens": 120}
    expected = httpx.post(f"{server.url}/v1/chat/completions", json=body).json()
    expected_text = expected["choices"][0]["message"]["content"]

    stream_body = {**body, "stream": True, "stream_options": {"resumable": True, "flush_tokens": 1}}
    parts: list[str] = []
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=stream_body) as r:
        stream_id = r.headers["x-stream-id"]
        last_id = read_some(r, rng.randint(2, 20), parts)
    for _ in range(3):  # cut again at a random point of each resumed connection
        headers = {"Last-Event-ID": last_id}
        with httpx.stream("GET", f"{server.url}/v1/streams/{stream_id}", headers=headers) as r:
            assert r.status_code == 200
            last_id = read_some(r, rng.randint(2, 20), parts, last_id)
    with httpx.stream(
        "GET", f"{server.url}/v1/streams/{stream_id}", params={"last_event_id": last_id}
    ) as r:
        read_some(r, 10_000, parts)
    assert "".join(parts) == expected_text
    assert server.metric("tokenspout_stream_resumes_total") == 4


def test_a_resumed_reader_keeps_continuous_usage_counting_from_the_start(start_server) -> None:  # type: ignore[no-untyped-def]
    # It sent "usage": null in every chunk after the resume (only the last usage chunk had
    # one): a reader that starts later now counts the tokens of the events it skipped.
    server: RunningServer = start_server(SyntheticEngine(itl_ms=2))
    body = {"messages": [{"role": "user", "content": "a b c"}], "max_tokens": 30, "stream": True,
            "stream_options": {"resumable": True, "flush_tokens": 1, "include_usage": True,
                               "continuous_usage_stats": True}}  # fmt: skip
    counts: list[int] = []

    def read(response: httpx.Response, max_events: int) -> str | None:
        last = None
        for count, (event_id, data) in enumerate(sse_events(response.iter_lines()), start=1):
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                counts.append(chunk["usage"]["completion_tokens"])
            last = event_id or last
            if count >= max_events:
                break
        return last

    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body) as r:
        stream_id = r.headers["x-stream-id"]
        last_id = read(r, 4)
    headers = {"Last-Event-ID": str(last_id)}
    with httpx.stream("GET", f"{server.url}/v1/streams/{stream_id}", headers=headers) as r:
        read(r, 10_000)
    # The resumed reader gets the backlog coalesced into its first event, its usage the
    # tokens so far; then one token an event.
    assert counts[:3] == [1, 2, 3] and counts[3] > 3
    assert counts[3:] == list(range(counts[3], 31))


def test_event_source_reconnect_resumes_the_seed_stream(start_server) -> None:  # type: ignore[no-untyped-def]
    server: RunningServer = start_server(SyntheticEngine(itl_ms=2), resumable=True)
    url = f"{server.url}/v1/completions/stream"
    params = {"prompt": "a b c", "max_tokens": 50, "flush_tokens": 1}
    tokens: list[str] = []
    with httpx.stream("GET", url, params=params) as r:
        last_id = None
        for event_id, data in sse_events(r.iter_lines()):
            tokens.append(json.loads(data)["token"])
            last_id = event_id
            if len(tokens) == 7:
                break
    # What an EventSource does on its own: same URL, plus Last-Event-ID.
    with httpx.stream("GET", url, params=params, headers={"Last-Event-ID": last_id}) as r:
        for _, data in sse_events(r.iter_lines()):
            if data != "[DONE]":
                tokens.append(json.loads(data)["token"])
    assert "".join(tokens) == "a b c " * 16 + "a b "
    assert server.metric("tokenspout_generation_tokens_total") == 50, "no second generation"


RESUMABLE = {
    "prompt": "x",
    "max_tokens": 4000,
    "stream": True,
    "stream_options": {"resumable": True},
}


def leave_after_first_event(server: RunningServer, body: dict) -> str:
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body) as r:
        next(r.iter_lines())
        return r.headers["x-stream-id"]


def test_resumable_stream_keeps_generating_while_its_reader_is_away(start_server) -> None:  # type: ignore[no-untyped-def]
    server: RunningServer = start_server(SyntheticEngine(itl_ms=5), resume_grace_s=600)
    stream_id = leave_after_first_event(server, RESUMABLE)
    server.wait_metric("tokenspout_streams_active", 0)  # the reader is gone...
    assert server.metric("tokenspout_requests_running") == 1, "...the stream waits for it"
    assert server.state.streams.get(stream_id).readers == 0
    assert server.metric("tokenspout_requests_aborted_total", 'reason="client_disconnect"') == 0


def test_resumable_stream_is_aborted_after_its_grace(start_server) -> None:  # type: ignore[no-untyped-def]
    server: RunningServer = start_server(SyntheticEngine(itl_ms=5), resume_grace_s=0.2)
    leave_after_first_event(server, RESUMABLE)
    server.wait_metric("tokenspout_requests_running", 0, timeout=10)
    assert server.metric("tokenspout_requests_aborted_total", 'reason="client_disconnect"') == 1


def test_a_live_stream_that_is_not_resumable_refuses_a_second_reader(start_server) -> None:  # type: ignore[no-untyped-def]
    """Regression (issue 10, defect 2): a second reader could attach to a live non-resumable
    stream, and each reader then released text the other had not read."""
    server: RunningServer = start_server(SyntheticEngine(itl_ms=5))
    body = {"prompt": "x", "max_tokens": 4000, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body) as r:
        stream_id = r.headers["x-stream-id"]
        lines = r.iter_lines()
        next(lines)
        for headers in ({"Last-Event-ID": f"{stream_id}:0"}, {}):
            second = httpx.get(f"{server.url}/v1/streams/{stream_id}", headers=headers)
            assert second.status_code == 409
            error = second.json()["error"]
            assert error["code"] == "stream_not_resumable" and "resumable" in error["message"]
        seed = httpx.get(
            f"{server.url}/v1/completions/stream", headers={"Last-Event-ID": f"{stream_id}:0"}
        )
        assert seed.status_code == 409
        # The first reader is untouched.
        assert next(lines) is not None
        assert server.metric("tokenspout_streams_active") == 1


def test_non_resumable_and_unknown_streams(start_server) -> None:  # type: ignore[no-untyped-def]
    server: RunningServer = start_server(SyntheticEngine(itl_ms=5))
    stream_id = leave_after_first_event(server, {"prompt": "x", "max_tokens": 4000, "stream": True})
    server.wait_metric("tokenspout_requests_running", 0, timeout=2)
    r = httpx.get(
        f"{server.url}/v1/streams/{stream_id}", headers={"Last-Event-ID": f"{stream_id}:1"}
    )
    assert r.status_code == 404
    r = httpx.get(f"{server.url}/v1/streams/x", headers={"Last-Event-ID": "garbage"})
    assert r.status_code == 400 and "Last-Event-ID" in r.json()["error"]["message"]


def test_expired_and_evicted_streams_answer_410(start_server) -> None:  # type: ignore[no-untyped-def]
    server: RunningServer = start_server(
        SyntheticEngine(), resume_ttl_s=0.3, max_stream_buffer_bytes=200, max_buffer_bytes=10_000
    )
    body = {
        "prompt": "word",
        "max_tokens": 100,
        "stream": True,
        "stream_options": {"resumable": True},
    }
    r = httpx.post(f"{server.url}/v1/completions", json=body)
    stream_id = r.headers["x-stream-id"]
    # 500 bytes of text went through a 200-byte buffer: the start was evicted.
    gone = httpx.get(
        f"{server.url}/v1/streams/{stream_id}", headers={"Last-Event-ID": f"{stream_id}:1"}
    )
    assert gone.status_code == 410 and "evicted" in gone.json()["error"]["message"]
    deadline = time.monotonic() + 10
    while "expired" not in (message := replay_error(server, stream_id)):
        assert "evicted" in message  # until the TTL has passed
        assert time.monotonic() < deadline, "never expired"


def replay_error(server: RunningServer, stream_id: str) -> str:
    r = httpx.get(f"{server.url}/v1/streams/{stream_id}")
    assert r.status_code == 410
    return str(r.json()["error"]["message"])


def test_every_event_has_its_own_id_and_a_resume_from_it_sends_what_followed(start_server) -> None:  # type: ignore[no-untyped-def]
    server: RunningServer = start_server(SyntheticEngine(itl_ms=0))
    body = {
        "messages": [{"role": "user", "content": "a b"}],
        "max_tokens": 5,
        "stream": True,
        "stream_options": {"resumable": True, "flush_tokens": 1, "include_usage": True},
    }
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body) as r:
        stream_id = r.headers["x-stream-id"]
        events = list(sse_events(r.iter_lines()))
    ids = [event_id for event_id, _ in events if event_id is not None]
    assert len(ids) == len(set(ids)) == len(events) - 1  # all but [DONE]
    for i, event_id in enumerate(ids):
        headers = {"Last-Event-ID": event_id}
        with httpx.stream("GET", f"{server.url}/v1/streams/{stream_id}", headers=headers) as r:
            replayed = list(sse_events(r.iter_lines()))
        # What followed, the backlog coalesced: the same text, then each end event once,
        # with the same ids, then [DONE].
        later = events[i + 1 :]
        assert "".join(chat_text(d) for _, d in replayed) == "".join(chat_text(d) for _, d in later)
        end_events = [e for e in later if e[0] is not None and "." in e[0]]
        assert replayed[len(replayed) - len(end_events) - 1 :] == [*end_events, (None, "[DONE]")]
        assert all('"role"' not in d for _, d in replayed), "the opening chunk came again"


def test_a_seed_stream_resumed_from_any_id_sends_what_followed_and_nothing_after_done(
    synthetic_server: RunningServer,
) -> None:
    """The seed's [DONE] carries the stream's last id: a resume from it, or from an end
    event past it (as chat's are taken), used to send that [DONE] again."""
    url = f"{synthetic_server.url}/v1/completions/stream"
    params = {"prompt": "a b c", "max_tokens": 3, "resumable": "true", "flush_tokens": 1}
    with httpx.stream("GET", url, params=params) as r:
        stream_id = r.headers["x-stream-id"]
        events = list(sse_events(r.iter_lines()))
    assert events[-1] == (f"{stream_id}:3.1", "[DONE]")
    for i, (event_id, _) in enumerate(events):
        headers = {"Last-Event-ID": event_id}
        r = httpx.get(f"{synthetic_server.url}/v1/streams/{stream_id}", headers=headers)
        replayed = list(sse_events(iter(r.text.splitlines())))
        # What followed, the backlog coalesced: the same tokens, then [DONE] once, if at all.
        assert seed_text(replayed) == seed_text(events[i + 1 :]), event_id
        assert replayed[-1:] == events[i + 1 :][-1:], event_id
    past = {"Last-Event-ID": f"{stream_id}:3.5"}
    for resumed in (httpx.get(url, params=params, headers=past), httpx.get(url, headers=past)):
        assert resumed.status_code == 200 and resumed.text == ""


def test_a_resumed_reader_coalesces_as_the_request_asked(start_server) -> None:  # type: ignore[no-untyped-def]
    # It was given the server's coalescing: events 5 tokens apart, not 1.
    server: RunningServer = start_server(
        SyntheticEngine(itl_ms=50), flush_tokens=5, flush_ms=10_000
    )
    body = {
        "messages": [{"role": "user", "content": "a b"}],
        "max_tokens": 1000,
        "stream": True,
        "ignore_eos": True,
        "stream_options": {"resumable": True, "flush_tokens": 1, "flush_ms": 0},
    }
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body) as r:
        stream_id = r.headers["x-stream-id"]
        last_id = read_some(r, 3, [])
    url = f"{server.url}/v1/streams/{stream_id}"
    with httpx.stream("GET", url, headers={"Last-Event-ID": last_id}) as r:
        events = sse_events(r.iter_lines())
        # The first brings what was generated meanwhile; the next ones come live.
        positions = [int(event_id.split(":")[1]) for event_id, _ in islice(events, 8) if event_id]
    httpx.post(f"{url}/cancel")
    steps = [b - a for a, b in pairwise(positions[1:])]
    # One token an event, but for a reader woken late (the server's would be 5 every time).
    assert min(steps) == 1, positions


@pytest.mark.parametrize("stream_event", [False, True])
def test_seed_get_is_named_before_its_first_token_and_resumes_from_there(
    start_server,  # type: ignore[no-untyped-def]
    stream_event: bool,
) -> None:
    # An EventSource dropped before the first token used to reconnect without Last-Event-ID,
    # which started a second generation; and a page could not cancel a stream it could not
    # name (a queued one, say) until its first token came.
    server: RunningServer = start_server(SyntheticEngine(itl_ms=2))
    url = f"{server.url}/v1/completions/stream"
    params = {"prompt": "a b c", "max_tokens": 30, "resumable": "true"}
    if stream_event:
        params["stream_event"] = "true"
    with httpx.stream("GET", url, params=params) as r:
        stream_id = r.headers["x-stream-id"]
        opening = next(r.iter_raw())
    if stream_event:
        assert opening == f"event: stream\nid: {stream_id}:0\ndata: {stream_id}\n\n".encode()
    else:  # an id alone: no data line, no event for clients that read only the tokens
        assert opening == f"id: {stream_id}:0\n\n".encode()
    # What an EventSource does on its own: same URL, plus the last id it saw.
    headers = {"Last-Event-ID": f"{stream_id}:0"}
    with httpx.stream("GET", url, params=params, headers=headers) as r:
        events = list(sse_events(r.iter_lines()))
    # [DONE] says where the stream ended: the seed format's only token count.
    assert events[-1] == (f"{stream_id}:30.1", "[DONE]")
    assert "".join(json.loads(data)["token"] for _, data in events[:-1]) == "a b c " * 10
    assert server.metric("tokenspout_stream_resumes_total") == 1
    assert server.metric("tokenspout_generation_tokens_total") == 30, "no second generation"


def test_seed_get_refuses_a_stream_event_that_is_not_a_boolean(synthetic_server) -> None:  # type: ignore[no-untyped-def]
    url = f"{synthetic_server.url}/v1/completions/stream"
    r = httpx.get(url, params={"prompt": "a", "stream_event": "maybe"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stream_event"
