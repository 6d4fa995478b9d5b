"""Several `tokenspout serve` replicas sharing streams through a real Redis, behind the
shipped nginx config: resume, cancel, takeover after SIGKILL, a Redis restart, admission."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.cluster.conftest import RedisCutter, Replica, ReplicaSet, kill, needs_nginx
from tests.conftest import free_port
from tests.e2e.test_resume import chat_text, read_some, sse_events
from tests.upstream_processes import faulty, processes
from tokenspout.client import Client

PROMPT = "Ünïcödé 日本語 😀 alpha beta gamma delta epsilon zeta eta theta iota kappa lambda"


def chat_body(max_tokens: int, **options: object) -> dict:  # type: ignore[type-arg]
    return {
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"resumable": True, "flush_tokens": 1, **options},
    }


def read_until_cut(
    events: Iterator[tuple[str | None, str]], parts: list[str], last_id: str | None
) -> tuple[str | None, bool]:
    """Read the rest of a response's events into ``parts`` until its connection ends; the
    last event id, and whether ``[DONE]`` came."""
    done = False
    try:
        for event_id, data in events:
            done = data == "[DONE]"
            parts.append(chat_text(data))
            last_id = event_id or last_id
    except httpx.HTTPError:
        pass  # cut
    return last_id, done


def read_first(
    response: httpx.Response, parts: list[str], count: int = 20
) -> tuple[Iterator[tuple[str | None, str]], str | None]:
    """A response's first ``count`` events read into ``parts``: the events after them, and
    the last event id."""
    events = sse_events(response.iter_lines())
    last_id = None
    for event_id, data in itertools.islice(events, count):
        parts.append(chat_text(data))
        last_id = event_id or last_id
    return events, last_id


def one_key(tmp_path: Path, name: str, **limits: int) -> tuple[Path, dict[str, str]]:
    """A keys file with the key ``sk-<name>`` (and ``limits``), and its request header."""
    keys = tmp_path / "keys.toml"
    lines = [f'name = "{name}"', f'key = "sk-{name}"', *(f"{k} = {v}" for k, v in limits.items())]
    keys.write_text("[[keys]]\n" + "\n".join(lines) + "\n")
    return keys, {"Authorization": f"Bearer sk-{name}"}


def whole_text(max_tokens: int) -> str:
    """The synthetic engine's answer to PROMPT: its words cycled, one a token, each with a
    space (the engine's documented output), computed here rather than asked of a replica,
    which would take max_tokens steps of its --synthetic-itl-ms (15 s for 1,500)."""
    words = PROMPT.split()
    return "".join(words[i % len(words)] + " " for i in range(max_tokens))


def greedy_text(url: str, max_tokens: int) -> str:
    """A replica's whole greedy answer to PROMPT (the embedded engine's: a model's)."""
    body = {
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    answer = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=300)
    return answer.json()["choices"][0]["message"]["content"]


def resume_to_end(url: str, stream_id: str, last_id: str | None, parts: list[str]) -> None:
    headers = {"Last-Event-ID": last_id} if last_id else {}
    with httpx.stream(
        "GET", f"{url}/v1/streams/{stream_id}", headers=headers, timeout=60
    ) as response:
        assert response.status_code == 200, response.read()
        read_some(response, 100_000, parts)


@needs_nginx
def test_resume_across_replicas_through_nginx_after_three_cuts(
    replica_set: ReplicaSet, start_nginx: Callable[[list[int]], str]
) -> None:
    replicas = replica_set.start_many(3, "--synthetic-itl-ms", "5")
    url = start_nginx([r.port for r in replicas])
    expected = whole_text(150)
    rng = random.Random(12)
    parts: list[str] = []
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=chat_body(150)) as r:
        stream_id = r.headers["x-stream-id"]
        last_id = read_some(r, rng.randint(2, 20), parts)
    for _ in range(3):
        headers = {"Last-Event-ID": last_id}
        with httpx.stream("GET", f"{url}/v1/streams/{stream_id}", headers=headers) as r:
            assert r.status_code == 200
            last_id = read_some(r, rng.randint(2, 20), parts, last_id)
    resume_to_end(url, stream_id, last_id, parts)
    assert "".join(parts) == expected
    served = [r.metric("tokenspout_stream_resumes_total") for r in replicas]
    assert sum(served) == 4
    # Round robin: the resumes were not all answered by one replica (the owner).
    assert sum(1 for n in served if n) >= 2


def test_a_resume_past_a_finished_streams_end_is_400_on_every_replica(
    replica_set: ReplicaSet,
) -> None:
    import redis

    from tokenspout.cluster import redis_keys

    owner, other = replica_set.start_many(2, "--synthetic-itl-ms", "1")
    with httpx.stream("POST", f"{owner.url}/v1/chat/completions", json=chat_body(5)) as r:
        stream_id = r.headers["x-stream-id"]
        ids = [event_id for event_id, _ in sse_events(r.iter_lines()) if event_id]
    last = ids[-1]  # the end's last event: "<id>:5.1"
    # The owner writes the end to Redis behind the stream (within its 20 ms group commit):
    # until then the other replica follows a running stream. Polled: there is no signal.
    shared = redis.Redis.from_url(replica_set.redis.url)
    deadline = time.monotonic() + 30
    while shared.hget(redis_keys.meta(stream_id), "state") != b"ended":
        assert time.monotonic() < deadline, "the owner never wrote the stream's end"
        time.sleep(0.01)
    for replica in (owner, other):
        url = f"{replica.url}/v1/streams/{stream_id}"
        with httpx.stream("GET", url, headers={"Last-Event-ID": last}) as r:
            assert r.status_code == 200
            assert [d for _, d in sse_events(r.iter_lines())] == ["[DONE]"]
        r = httpx.get(url, headers={"Last-Event-ID": f"{stream_id}:999"})
        assert r.status_code == 400 and "position 999" in r.json()["error"]["message"], r.text


def test_an_expired_stream_is_410_on_every_replica(replica_set: ReplicaSet) -> None:
    import redis

    from tokenspout.cluster import redis_keys

    owner, other = replica_set.start_many(2, "--synthetic-itl-ms", "1", "--resume-ttl-s", "1")
    with httpx.stream("POST", f"{owner.url}/v1/chat/completions", json=chat_body(5)) as r:
        stream_id = r.headers["x-stream-id"]
        assert [d for _, d in sse_events(r.iter_lines())][-1] == "[DONE]"
    # Polled until the stream's keys expired in Redis (Redis's clock) and its owner
    # forgot it (its own): there is no signal.
    shared = redis.Redis.from_url(replica_set.redis.url)
    deadline = time.monotonic() + 30
    url = f"/v1/streams/{stream_id}"
    while shared.get(redis_keys.expired(stream_id)) is None or shared.exists(
        redis_keys.meta(stream_id)
    ) or httpx.get(owner.url + url).status_code != 410:  # fmt: skip
        assert time.monotonic() < deadline, "the stream never expired"
        time.sleep(0.05)
    for replica in (owner, other):
        gone = httpx.get(replica.url + url)
        assert gone.status_code == 410, (replica.url, gone.text)
        assert "has expired" in gone.json()["error"]["message"]
        assert httpx.post(f"{replica.url}{url}/cancel").status_code == 410
    assert httpx.get(f"{other.url}/v1/streams/never-issued").status_code == 404


def test_a_responses_stream_elsewhere_is_a_404_saying_where_it_lives(
    replica_set: ReplicaSet,
) -> None:
    """A Responses stream is never resumable, so never shared, even under --resumable: a
    cancel or resume sent to another replica was a bare 404 ("no stream with id"). It now
    says that such a stream is reached on its own replica only, where the cancel works."""
    owner, other = replica_set.start_many(2, "--synthetic-itl-ms", "10", "--resumable")
    body = {"input": PROMPT, "max_output_tokens": 4000, "stream": True}
    with httpx.stream("POST", f"{owner.url}/v1/responses", json=body, timeout=30) as r:
        stream_id = r.headers["x-stream-id"]
        lines = r.iter_lines()
        next(line for line in lines if line == "event: response.output_text.delta")
        for answer in (
            httpx.post(f"{other.url}/v1/streams/{stream_id}/cancel"),
            httpx.get(f"{other.url}/v1/streams/{stream_id}"),
        ):
            assert answer.status_code == 404
            message = answer.json()["error"]["message"]
            assert "a Responses API stream" in message
            assert "lives on the replica that serves it only" in message
        assert httpx.post(f"{owner.url}/v1/streams/{stream_id}/cancel").status_code == 200
        end = [json.loads(line[6:]) for line in lines if line.startswith("data: ")][-1]
    assert end["response"]["status"] == "cancelled"


def test_cancel_sent_to_another_replica_stops_the_owner(replica_set: ReplicaSet) -> None:
    """Over HTTP, then as a WebSocket cancel naming the stream id."""
    from websockets.sync.client import connect

    owner, other = replica_set.start_many(2, "--synthetic-itl-ms", "10")
    for how in ("http", "ws"):
        with httpx.stream(
            "POST", f"{owner.url}/v1/chat/completions", json=chat_body(4000), timeout=30
        ) as r:
            stream_id = r.headers["x-stream-id"]
            events = sse_events(r.iter_lines())
            # At once: the owner puts a stream's record in Redis before its response starts
            # (its chunks follow behind, up to 20 ms later).
            next(events)
            if how == "http":
                cancel = httpx.post(f"{other.url}/v1/streams/{stream_id}/cancel", json={})
                assert cancel.status_code == 200, cancel.text
            else:
                with connect(other.url.replace("http", "ws") + "/v1/ws") as ws:
                    ws.send(json.dumps({"type": "cancel", "id": stream_id}))
            chunks = [json.loads(d) for _, d in events if d != "[DONE]"]
        assert chunks[-1]["choices"][0]["finish_reason"] == "cancelled"
    assert owner.metric("tokenspout_requests_aborted_total", 'reason="cancelled"') == 2
    assert owner.metric("tokenspout_requests_running") == 0


@needs_nginx
@pytest.mark.parametrize(
    ("engine", "args", "max_tokens"),
    [
        ("synthetic", ("--synthetic-itl-ms", "10"), 300),
        pytest.param(
            "embedded",
            ("--max-num-seqs", "2"),
            120,
            marks=[pytest.mark.slow, pytest.mark.timeout(1200)],
        ),
    ],
)
def test_sigkill_owner_mid_stream_client_gets_the_whole_answer(
    replica_set: ReplicaSet,
    start_nginx: Callable[[list[int]], str],
    engine: str,
    args: tuple[str, ...],
    max_tokens: int,
) -> None:
    """The client, reconnecting through nginx with Last-Event-ID, receives exactly the
    uncut answer (greedy decoding for the embedded engine) and [DONE]."""
    replicas = replica_set.start_many(2, *args, engine=engine)
    url = start_nginx([r.port for r in replicas])
    expected = whole_text(max_tokens) if engine == "synthetic" else greedy_text(url, max_tokens)
    parts: list[str] = []
    with httpx.stream(
        "POST", f"{url}/v1/chat/completions", json=chat_body(max_tokens), timeout=60
    ) as r:
        stream_id = r.headers["x-stream-id"]
        events, last_id = read_first(r, parts)
        owner = replica_set.owner(stream_id)
        kill(owner)
        # What the dead replica had already sent is read too: the client keeps it.
        last_id, done = read_until_cut(events, parts, last_id)
    assert not done  # the connection was cut before the end
    resume_to_end(url, stream_id, last_id, parts)
    assert "".join(parts) == expected
    survivor = next(r for r in replicas if r is not owner)
    assert survivor.metric("tokenspout_stream_takeovers_total") == 1


#: A chat whose answer the embedded engine cannot continue (its grammar would have to replay
#: the first part), far longer than the few tokens the tests read before they stop its
#: replica: still generating then.
_SCHEMA = {
    "type": "object",
    "properties": {"n": {"type": "array", "items": {"type": "integer"}, "minItems": 300}},
    "required": ["n"],
}
CONSTRAINED = {
    "messages": [{"role": "user", "content": "Count."}],
    "response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": _SCHEMA}},
}


def test_an_answer_the_engine_cannot_continue_is_gone_after_its_replica_died(
    replica_set: ReplicaSet,
) -> None:
    """The embedded engine cannot continue a constrained answer (its grammar would have to
    replay the first part) nor an echoed one. Taken over, such a stream ended as if whole:
    "length", its JSON cut short, no error. Its readers get the reason instead (410)."""
    import redis

    from tokenspout.cluster import redis_keys

    owner, survivor = replica_set.start_many(2, engine="embedded")
    options = {"resumable": True, "flush_tokens": 1}
    constrained, echoed = CONSTRAINED, {"prompt": "One two three", "echo": True}
    requests = [
        ("chat/completions", constrained, "a constrained answer (response_format, tools)"),
        ("completions", echoed, "an echoed answer"),
    ]
    why: dict[str, str] = {}
    with contextlib.ExitStack() as connections:
        for path, body, refusal in requests:
            body = {**body, "max_tokens": 700, "temperature": 0, "stream": True,
                    "stream_options": options}  # fmt: skip
            r = connections.enter_context(
                httpx.stream("POST", f"{owner.url}/v1/{path}", json=body, timeout=60)
            )
            assert len(list(itertools.islice(sse_events(r.iter_lines()), 3))) == 3
            why[r.headers["x-stream-id"]] = refusal
        kill(owner)
    # Until the survivor has claimed each stream and ended it in Redis, a resume would follow
    # it live. Polled: there is no signal.
    shared = redis.Redis.from_url(replica_set.redis.url)
    deadline = time.monotonic() + 60
    for stream_id, refusal in why.items():
        while shared.hget(redis_keys.meta(stream_id), "state") == b"running":
            assert time.monotonic() < deadline, "the survivor never took the stream over"
            time.sleep(0.05)
        gone = httpx.get(f"{survivor.url}/v1/streams/{stream_id}")
        assert gone.status_code == 410, gone.text
        assert f"{refusal} cannot be continued" in gone.json()["error"]["message"]


def test_sigterm_hands_over_only_what_the_others_can_continue(
    replica_set: ReplicaSet,
) -> None:
    """A drain's end hands a plain answer over, but not a constrained one, which the
    embedded engine cannot continue: handed over, it was cut with no end here and then
    given up elsewhere (410). It ends where it runs, as on a lone server: the drain's
    error and [DONE], and Redis has it ended."""
    a, b = replica_set.start_many(2, engine="embedded")
    constrained = CONSTRAINED
    plain = {"messages": [{"role": "user", "content": "Count."}], "ignore_eos": True}
    options = {"resumable": True, "flush_tokens": 1}
    with contextlib.ExitStack() as connections:
        responses = {}
        for name, body in (("constrained", constrained), ("plain", plain)):
            body = {**body, "max_tokens": 700, "temperature": 0, "stream": True,
                    "stream_options": options}  # fmt: skip
            r = connections.enter_context(
                httpx.stream("POST", f"{a.url}/v1/chat/completions", json=body, timeout=60)
            )
            responses[name] = (r, *read_first(r, [], count=3))
        a.proc.send_signal(signal.SIGTERM)
        _, events, _ = responses["constrained"]
        datas = [data for _, data in events]
        _, events, last_id = responses["plain"]
        _, done = read_until_cut(events, [], last_id)
    assert a.proc.wait(30) == 0
    assert_ends_with_the_drains_error(datas)
    constrained_id = responses["constrained"][0].headers["x-stream-id"]
    assert replica_set.redis.cli("HGET", f"tokenspout:m:{constrained_id}", "state") == "ended"
    assert not done  # cut without an end: handed over
    b.wait_metric("tokenspout_stream_takeovers_total", 1)


def test_a_request_with_a_field_only_the_upstream_knows_is_taken_over(
    replica_set: ReplicaSet,
) -> None:
    """In front of upstreams, fields tokenspout does not know go on to them (the route
    validates with the schema that keeps them). The takeover validated the stored body with
    the strict schema: "Extra inputs are not permitted", and the stream was given up. The
    continuation's messages are the client's as sent: an image part, a vendor field."""
    with processes(faulty) as (upstream,):
        owner, survivor = replica_set.start_many(2, "--upstream", upstream.base, engine="upstream")
        expected = whole_text(40)
        # The owner's answer stalls after a few chunks: it is mid-answer when it dies.
        upstream.fault("stall", after=3)
        image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
        user = {"role": "user", "content": [{"type": "text", "text": PROMPT}, image], "x": 1}
        body = {**chat_body(40), "chat_template_kwargs": {"enable_thinking": False}}
        body["messages"] = [user]
        parts: list[str] = []
        with httpx.stream("POST", f"{owner.url}/v1/chat/completions", json=body) as r:
            stream_id = r.headers["x-stream-id"]
            last_id = read_some(r, 2, parts)
            upstream.fault("none")  # for the continuation
            kill(owner)
        resume_to_end(survivor.url, stream_id, last_id, parts)
        continued = upstream.stats()["body"]
    assert "".join(parts) == expected
    assert continued["chat_template_kwargs"] == {"enable_thinking": False}
    assert continued["messages"][0] == user
    assert continued["messages"][-1]["role"] == "assistant"
    assert survivor.metric("tokenspout_stream_takeovers_total") == 1


def wait_persisted(replica_set: ReplicaSet, stream_id: str, tokens: int) -> None:
    """Until Redis holds ``tokens`` of the stream's tokens (polled: the owner's writer gives
    no signal)."""
    deadline = time.monotonic() + 30
    while True:
        entries = replica_set.redis.cli("--raw", "XRANGE", f"tokenspout:s:{stream_id}", "-", "+")
        chunks = [json.loads(line) for line in entries.splitlines() if line.startswith("[")]
        if sum(n for batch in chunks for _, n, *_ in batch) >= tokens:
            return
        assert time.monotonic() < deadline, f"Redis never held {tokens} tokens of {stream_id}"
        time.sleep(0.02)


def test_an_echoed_completion_taken_over_in_front_of_upstreams_asks_for_the_rest_once(
    replica_set: ReplicaSet,
) -> None:
    """The first chunk of an echoed completion holds the prompt. The takeover took it for
    the answer so far: the continuation's prompt was the prompt twice, then the answer."""
    prompt = "One two three four "  # the words of the answer (the synthetic engine's) follow
    with processes(faulty) as (upstream,):
        owner, survivor = replica_set.start_many(2, "--upstream", upstream.base, engine="upstream")
        body = {"prompt": prompt, "echo": True, "max_tokens": 12, "temperature": 0}
        expected = httpx.post(f"{owner.url}/v1/completions", json=body).json()
        # The owner's answer stalls after three chunks (the echo and two words, then one).
        upstream.fault("stall", after=3)
        options = {"resumable": True, "flush_tokens": 1, "include_usage": True}
        parts: list[str] = []
        with httpx.stream(
            "POST", f"{owner.url}/v1/completions", json={**body, "stream": True,
            "stream_options": options},
        ) as r:  # fmt: skip
            stream_id = r.headers["x-stream-id"]
            last_id = ""
            for event_id, data in sse_events(r.iter_lines()):
                parts.append(json.loads(data)["choices"][0]["text"])
                last_id = event_id or last_id
                if last_id.endswith(":3"):  # its position: the three tokens sent before it stalls
                    break
            wait_persisted(replica_set, stream_id, 3)
            upstream.fault("none")  # for the continuation
            kill(owner)
        so_far = "".join(parts)
        assert so_far.startswith(prompt)
        rest = httpx.get(
            f"{survivor.url}/v1/streams/{stream_id}", headers={"Last-Event-ID": last_id}, timeout=60
        )
        assert rest.status_code == 200, rest.text
        chunks = [json.loads(d) for _, d in sse_events(rest.iter_lines()) if d != "[DONE]"]
        continued = upstream.stats()["body"]
    parts += [c["choices"][0]["text"] for c in chunks if c["choices"]]
    assert "".join(parts) == expected["choices"][0]["text"]
    # The prompt, then the answer so far (without its echo), and no echo asked again.
    assert continued["prompt"] == so_far
    assert not continued.get("echo")
    assert chunks[-1]["usage"]["completion_tokens"] == expected["usage"]["completion_tokens"]


def test_an_answer_taken_over_in_front_of_upstreams_reports_its_prompt_tokens(
    replica_set: ReplicaSet,
) -> None:
    """In front of upstreams the prompt's tokens are learned from the upstream's usage, after
    the stream's record is in Redis (it says 0): the takeover reported 0. The continuation's
    usage counts the answer so far as prompt too, which must come off."""
    with processes(faulty) as (upstream,):
        owner, survivor = replica_set.start_many(2, "--upstream", upstream.base, engine="upstream")
        body = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 40}
        expected = httpx.post(f"{owner.url}/v1/chat/completions", json=body).json()["usage"]
        # The owner's answer stalls after a few chunks: it is mid-answer when it dies.
        upstream.fault("stall", after=3)
        parts: list[str] = []
        with httpx.stream(
            "POST", f"{owner.url}/v1/chat/completions",
            json={**body, **chat_body(40, include_usage=True)},
        ) as r:  # fmt: skip
            stream_id = r.headers["x-stream-id"]
            last_id = read_some(r, 2, parts)
            upstream.fault("none")  # for the continuation
            kill(owner)
        rest = httpx.get(
            f"{survivor.url}/v1/streams/{stream_id}",
            headers={"Last-Event-ID": last_id or ""},
            timeout=60,
        )
        assert rest.status_code == 200, rest.text
    usage = [json.loads(d)["usage"] for _, d in sse_events(rest.iter_lines()) if '"usage":{' in d]
    assert expected["prompt_tokens"] > 0
    assert usage[-1] == expected
    assert survivor.metric("tokenspout_stream_takeovers_total") == 1


@needs_nginx
@pytest.mark.parametrize("stop", ["SIGKILL", "SIGTERM"])
def test_the_python_client_finishes_an_answer_whose_replica_stopped(
    replica_set: ReplicaSet, start_nginx: Callable[[list[int]], str], stop: str
) -> None:
    """``tokenspout.client.Client`` through nginx: the owner's SIGKILL, or a rolling
    restart's SIGTERM (whose drain hands the stream over), cuts its connection, and the
    client resumes from its last event on the other replica by itself."""
    replicas = replica_set.start_many(2, "--synthetic-itl-ms", "2")
    url = start_nginx([r.port for r in replicas])
    options = {"resumable": True, "flush_tokens": 1}
    with Client(url) as client:
        stream = client.stream_chat(PROMPT, max_tokens=1500, temperature=0, stream_options=options)
        deltas = []
        for delta in stream:
            deltas.append(delta)
            if len(deltas) == 20:
                owner = replica_set.owner(stream.result.stream_id or "")
                owner.proc.send_signal(getattr(signal, stop))
    assert "".join(deltas) == stream.result.text == whole_text(1500)
    assert stream.result.resumes >= 1 and stream.result.finish_reason == "length"
    assert owner.proc.wait(30) == (0 if stop == "SIGTERM" else -signal.SIGKILL)


def test_sigterm_hands_a_running_stream_over_and_its_client_resumes_it_elsewhere(
    replica_set: ReplicaSet,
) -> None:
    """A drain's end (1 s here) hands the owner's running stream over instead of ending it
    with an error: its reader's connection is cut with no error and no end, the other
    replica continues it, a resume there reads exactly the whole answer, and the stopped
    replica exits 0. At 2 ms a token the answer needs 3 s: still running at the end."""
    a, b = replica_set.start_many(2, "--synthetic-itl-ms", "2")
    expected = whole_text(1500)
    parts: list[str] = []
    with httpx.stream(
        "POST", f"{a.url}/v1/chat/completions", json=chat_body(1500), timeout=60
    ) as r:
        stream_id = r.headers["x-stream-id"]
        events, last_id = read_first(r, parts)
        a.proc.send_signal(signal.SIGTERM)
        last_id, done = read_until_cut(events, parts, last_id)  # KeyError on an error event
    assert not done
    assert a.proc.wait(30) == 0
    # Cut on purpose, for the client to resume: no error in the log (uvicorn's "returned
    # without completing response" was one per stream handed over).
    assert "ERROR" not in a.log.read_text(), a.log.read_text()
    resume_to_end(b.url, stream_id, last_id, parts)
    assert "".join(parts) == expected
    assert b.metric("tokenspout_stream_takeovers_total") == 1
    assert replica_set.owner(stream_id) is b


def test_sigterm_without_another_replica_ends_the_stream_with_an_error(
    replica_set: ReplicaSet,
) -> None:
    """Nobody could take it over: the drain ends it as a lone server does (an error event
    and [DONE]), and Redis has it ended, not running for a replica that never comes."""
    a = replica_set.start("--synthetic-itl-ms", "2")
    stream_id = stopped_mid_stream_with_the_error(a)
    assert replica_set.redis.cli("HGET", f"tokenspout:m:{stream_id}", "state") == "ended"


def stopped_mid_stream_with_the_error(replica: Replica) -> str:
    """A stream on ``replica``, which gets SIGTERM after 5 events: the stream must end with
    the drain's error event and [DONE], and the replica exit 0. Returns the stream's id."""
    with httpx.stream(
        "POST", f"{replica.url}/v1/chat/completions", json=chat_body(1500), timeout=60
    ) as r:
        datas = []
        for _, data in sse_events(r.iter_lines()):
            datas.append(data)
            if len(datas) == 5:
                replica.proc.send_signal(signal.SIGTERM)
    assert replica.proc.wait(30) == 0
    assert_ends_with_the_drains_error(datas)
    return r.headers["x-stream-id"]


def assert_ends_with_the_drains_error(datas: list[str]) -> None:
    """A stream's SSE data ends as a lone server's drain ends it: its error, then [DONE]."""
    assert datas[-1] == "[DONE]"
    assert json.loads(datas[-2])["error"]["code"] == "shutting_down"


def test_sigterm_while_the_other_replica_drains_ends_the_stream_with_an_error(
    replica_set: ReplicaSet,
) -> None:
    """A draining replica takes nothing over: streams are not handed over to it (they were,
    and then waited in Redis for a replica that never came), but end with the error."""
    a = replica_set.start("--synthetic-itl-ms", "2")
    b = replica_set.start("--synthetic-itl-ms", "2", "--drain-timeout-s", "60")
    b_id = b.health()["replica"]
    with httpx.stream("POST", f"{b.url}/v1/chat/completions", json=chat_body(100_000)) as kept:
        read_some(kept, 1, [])  # B's drain waits for this stream
        b.proc.send_signal(signal.SIGTERM)
        while replica_set.redis.cli("EXISTS", f"tokenspout:d:{b_id}") != "1":
            pass  # until B said it drains
        stopped_mid_stream_with_the_error(a)
    os.kill(b.proc.pid, signal.SIGKILL)


def test_replicas_stopped_together_end_their_streams_with_the_error(
    replica_set: ReplicaSet,
) -> None:
    """A whole deployment stopped at once (drain 0): each replica looked for another to
    hand its streams to before the other had marked itself draining, handed them to it, and
    the other stopped too: the streams were cut, with nobody left to continue them. Each
    must end its own with the drain's error and [DONE], as a lone server does."""
    a, b = replica_set.start_many(2, "--synthetic-itl-ms", "2", "--drain-timeout-s", "0")
    with contextlib.ExitStack() as connections:
        events = []
        for replica in (a, b):
            r = connections.enter_context(
                httpx.stream("POST", f"{replica.url}/v1/chat/completions",
                             json=chat_body(1500), timeout=60)
            )  # fmt: skip
            events.append(sse_events(r.iter_lines()))
            assert len(list(itertools.islice(events[-1], 5))) == 5
        for replica in (a, b):
            replica.proc.send_signal(signal.SIGTERM)
        endings = [[data for _, data in stream] for stream in events]
    assert a.proc.wait(30) == b.proc.wait(30) == 0
    for datas in endings:
        assert_ends_with_the_drains_error(datas)


def test_sigterm_cuts_the_readers_of_another_replicas_stream_at_the_drains_end(
    replica_set: ReplicaSet,
) -> None:
    """A reader here of a stream generated on B is cut without an end when the drain ends,
    and resumes on B to the whole answer. It used to wait for uvicorn's last timeout and be
    cancelled with an error and a traceback in the log."""
    a, b = replica_set.start_many(2, "--synthetic-itl-ms", "2")
    expected = whole_text(1500)
    parts: list[str] = []
    with httpx.stream("POST", f"{b.url}/v1/chat/completions", json=chat_body(1500)) as first:
        stream_id = first.headers["x-stream-id"]
        last_id = read_some(first, 5, parts)
    headers = {"Last-Event-ID": last_id or ""}
    with httpx.stream("GET", f"{a.url}/v1/streams/{stream_id}", headers=headers) as mirror:
        events, last_id = read_first(mirror, parts, 5)
        a.proc.send_signal(signal.SIGTERM)
        last_id, done = read_until_cut(events, parts, last_id)
    assert not done
    assert a.proc.wait(30) == 0
    resume_to_end(b.url, stream_id, last_id, parts)
    assert "".join(parts) == expected
    log = a.log.read_text()
    assert "Traceback" not in log and "graceful shutdown exceeded" not in log, log


def test_a_reader_on_another_replica_keeps_the_stream_past_the_owners_grace(
    replica_set: ReplicaSet,
) -> None:
    """The owner's own reader leaves; one on the other replica follows: the owner must not
    end the stream at its grace period as if nobody read it (it did: "cancelled")."""
    a, b = replica_set.start_many(2, "--synthetic-itl-ms", "10", "--resume-grace-s", "0.5")
    expected = whole_text(300)
    parts: list[str] = []
    with httpx.stream("POST", f"{a.url}/v1/chat/completions", json=chat_body(300)) as first:
        stream_id = first.headers["x-stream-id"]
        last_id = read_some(first, 5, parts)
        headers = {"Last-Event-ID": last_id or ""}
        with httpx.stream(
            "GET", f"{b.url}/v1/streams/{stream_id}", headers=headers, timeout=60
        ) as follower:
            assert follower.status_code == 200
            first.close()  # the owner's reader leaves; B's reads on
            read_some(follower, 100_000, parts, last_id)
    assert "".join(parts) == expected
    assert a.metric("tokenspout_requests_aborted_total", 'reason="client_disconnect"') == 0


def test_a_taken_over_stream_nobody_reads_ends_after_the_grace_period(
    replica_set: ReplicaSet, tmp_path: Path
) -> None:
    keys, alice = one_key(tmp_path, "alice")
    args = ("--synthetic-itl-ms", "10", "--resume-grace-s", "0.5", "--api-keys-file", str(keys))
    a, b = replica_set.start_many(2, *args)
    with httpx.stream(
        "POST", f"{a.url}/v1/chat/completions", json=chat_body(4000), headers=alice
    ) as r:
        stream_id = r.headers["x-stream-id"]
        read_some(r, 3, [])
        owner = replica_set.owner(stream_id)
        owner_id = owner.health()["replica"]
        kill(owner)
    survivor = b if owner is a else a
    survivor.wait_metric("tokenspout_stream_takeovers_total", 1)
    # Not generated on for nobody to the end (40 s here), holding a slot meanwhile.
    survivor.wait_metric(
        "tokenspout_requests_aborted_total", 1, labels='reason="client_disconnect"'
    )
    survivor.wait_metric("tokenspout_requests_running", 0)
    # Counted open where it was taken over, so its end does not take the gauge below 0.
    assert survivor.metric("tokenspout_key_streams_open", 'key="alice"') == 0
    # The dead replica's count in the key's hash goes at the key's next admission (fields
    # of dead replicas piled up there with every restart).
    dead = f"s:{owner_id}"
    assert dead in replica_set.redis.cli("HKEYS", "tokenspout:k:alice").split()
    body = {"messages": [{"role": "user", "content": "a"}], "max_tokens": 1}
    assert httpx.post(f"{survivor.url}/v1/chat/completions", json=body, headers=alice).is_success
    assert dead not in replica_set.redis.cli("HKEYS", "tokenspout:k:alice").split()


# Cut off, the owner must still be generating when it is back: 1,500 tokens, ~20 s.
@pytest.mark.parametrize("fault", ["sigstop", pytest.param("cut_off", marks=pytest.mark.slow)])
def test_a_replica_back_after_its_lease_stops_what_was_taken_over(
    replica_set: ReplicaSet, redis_cutter: RedisCutter, fault: str
) -> None:
    """The owner stopped (SIGSTOP), or cut off from Redis while it runs on, until another
    replica takes its stream over; then back. It must not go on with a second text for its
    own client: it stops generating (learning it at its next write, or when it asks Redis
    where its streams stand) and cuts its client's connection; the client resumes (through
    the owner, which now reads the stream from Redis) and gets the one text there is."""
    cut_off = fault == "cut_off"
    a = replica_set.start(
        "--synthetic-itl-ms", "10", *(("--redis-url", redis_cutter.url) * cut_off)
    )
    b = replica_set.start("--synthetic-itl-ms", "10")
    if cut_off:
        away, back = redis_cutter.cut, redis_cutter.restore
    else:
        away = lambda: os.kill(a.proc.pid, signal.SIGSTOP)  # noqa: E731
        back = lambda: os.kill(a.proc.pid, signal.SIGCONT)  # noqa: E731
    # Cut off, the owner generates on meanwhile: it must not be done by then.
    max_tokens = 1500 if cut_off else 400
    expected = whole_text(max_tokens)
    options = {"resumable": True, "flush_tokens": 1}
    with Client(a.url) as client:
        stream = client.stream_chat(
            PROMPT, max_tokens=max_tokens, temperature=0, stream_options=options
        )
        deltas = []
        for delta in stream:
            deltas.append(delta)
            if len(deltas) == 20:
                away()
                try:
                    b.wait_metric("tokenspout_stream_takeovers_total", 1)
                finally:
                    back()
    assert "".join(deltas) == stream.result.text == expected
    assert stream.result.resumes == 1 and stream.result.finish_reason == "length"
    assert a.metric("tokenspout_requests_aborted_total", 'reason="moved"') == 1
    assert a.metric("tokenspout_requests_running") == 0


def test_a_cancel_waiting_on_a_stopped_owner_ends_the_stream_where_it_was_taken_over(
    replica_set: ReplicaSet,
) -> None:
    """A cancel sent to B while the owner A is stopped: B takes the stream over and ends it.
    When A runs again, the cancel it then hears must not end its own copy one token on (its
    client's last id would then be past the stream's end: a 400 on resume)."""
    a, b = replica_set.start_many(2, "--synthetic-itl-ms", "10")
    parts: list[str] = []
    last_id = None
    with httpx.stream("POST", f"{a.url}/v1/chat/completions", json=chat_body(1500)) as r:
        stream_id = r.headers["x-stream-id"]
        events = sse_events(r.iter_lines())
        for event_id, data in itertools.islice(events, 10):
            parts.append(chat_text(data))
            last_id = event_id or last_id
        os.kill(a.proc.pid, signal.SIGSTOP)
        try:
            assert httpx.post(f"{b.url}/v1/streams/{stream_id}/cancel").status_code == 200
            b.wait_metric("tokenspout_stream_takeovers_total", 1)
        finally:
            os.kill(a.proc.pid, signal.SIGCONT)
        last_id, done = read_until_cut(events, parts, last_id)
    assert not done  # A did not end its own copy: the stream's end is elsewhere
    # The rest, from the one end: B ended the stream where Redis had it (A may have sent
    # its client a few tokens more, which that client keeps).
    ending: list[str] = []
    with httpx.stream(
        "GET", f"{b.url}/v1/streams/{stream_id}", headers={"Last-Event-ID": last_id or ""}
    ) as r:
        assert r.status_code == 200, r.read()
        ending = [data for _, data in sse_events(r.iter_lines())]
    assert ending[-1] == "[DONE]"
    assert any('"finish_reason":"cancelled"' in data for data in ending)
    whole: list[str] = []
    resume_to_end(b.url, stream_id, None, whole)
    assert "".join(parts).startswith("".join(whole))
    assert a.metric("tokenspout_requests_aborted_total", 'reason="moved"') == 1


def test_a_request_with_n_choices_is_one_request_of_a_keys_minute_limit(
    replica_set: ReplicaSet, tmp_path: Path
) -> None:
    # As on one process (README): n streams, one request. With Redis it took n requests.
    keys, carol = one_key(tmp_path, "carol", requests_per_minute=2)
    replica = replica_set.start("--synthetic-itl-ms", "1", "--api-keys-file", str(keys))
    body = {"prompt": "x", "max_tokens": 2, "n": 3}
    codes = [
        httpx.post(f"{replica.url}/v1/completions", json=body, headers=carol).status_code
        for _ in range(3)
    ]
    assert codes == [200, 200, 429]


def test_redis_restart_mid_stream_cuts_no_live_stream(replica_set: ReplicaSet) -> None:
    replicas = replica_set.start_many(2, "--synthetic-itl-ms", "10")
    expected = whole_text(200)
    results: dict[int, list[str]] = {}
    ids: dict[int, str] = {}
    started = threading.Barrier(5)

    def read(index: int) -> None:
        url = replicas[index % 2].url
        parts: list[str] = []
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=chat_body(200)) as r:
            ids[index] = r.headers["x-stream-id"]
            events = sse_events(r.iter_lines())
            parts += [chat_text(data) for _, data in itertools.islice(events, 5)]
            started.wait()
            parts += [chat_text(data) for _, data in events]
        results[index] = parts

    threads = [threading.Thread(target=read, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    started.wait()
    replica_set.redis.stop()
    # While Redis is down, a resume on a replica that does not generate the stream is a 503.
    down = httpx.get(f"{replicas[1].url}/v1/streams/{ids[0]}")
    assert down.status_code == 503
    assert down.json()["error"]["code"] == "redis_unavailable"
    replica_set.redis.start()
    for t in threads:
        t.join(60)
    for index in range(4):
        assert "".join(results[index]) == expected, index
    # Once Redis is back, the replicas write what it lost, and resumes work again.
    for replica in replicas:
        replica.wait_metric("tokenspout_redis_up", 1)
        replica.wait_metric("tokenspout_redis_write_pending_seconds", 0)
    for index in range(4):
        other = replicas[1 - index % 2]
        parts: list[str] = []
        resume_to_end(other.url, ids[index], None, parts)
        assert "".join(parts) == expected


def test_text_lost_while_redis_was_down_makes_the_stream_gone(replica_set: ReplicaSet) -> None:
    """The writer cannot catch up when what Redis missed was evicted meanwhile (a small
    replay bound here): resuming it answers 410 with the reason, never a shortened text."""
    owner, other = replica_set.start_many(
        2, "--synthetic-itl-ms", "2", "--max-stream-buffer-bytes", "300"
    )
    with httpx.stream(
        "POST", f"{owner.url}/v1/chat/completions", json=chat_body(400), timeout=30
    ) as r:
        stream_id = r.headers["x-stream-id"]
        events = sse_events(r.iter_lines())
        next(events)
        replica_set.redis.stop()
        assert [d for _, d in events][-1] == "[DONE]"
    replica_set.redis.start()
    owner.wait_metric("tokenspout_redis_streams_gone_total", 1)
    # The other replica may learn only now that Redis went away: its first call answers 503
    # (Redis unavailable, retry) while its link reconnects.
    deadline = time.monotonic() + 30
    while (gone := httpx.get(f"{other.url}/v1/streams/{stream_id}")).status_code == 503:
        assert time.monotonic() < deadline, gone.text
        time.sleep(0.05)
    assert gone.status_code == 410
    assert "cannot be resumed" in gone.json()["error"]["message"]


def test_admission_limits_hold_across_two_replicas(replica_set: ReplicaSet, tmp_path: Path) -> None:
    keys = tmp_path / "keys.toml"
    keys.write_text(
        '[[keys]]\nname = "alice"\nkey = "sk-alice"\nmax_concurrent_streams = 1\n'
        '[[keys]]\nname = "bob"\nkey = "sk-bob"\n'
    )
    args = ("--synthetic-itl-ms", "10", "--max-streams", "2", "--api-keys-file", str(keys))
    a, b = replica_set.start_many(2, *args)
    alice = {"Authorization": "Bearer sk-alice"}
    bob = {"Authorization": "Bearer sk-bob"}
    body = chat_body(4000)
    with httpx.stream("POST", f"{a.url}/v1/chat/completions", json=body, headers=alice) as r1:
        assert r1.status_code == 200
        # alice's second stream, on the other replica: over her own limit.
        refused = httpx.post(f"{b.url}/v1/chat/completions", json=body, headers=alice)
        assert refused.status_code == 429
        assert refused.json()["error"]["code"] == "rate_limit_exceeded"
        assert int(refused.headers["retry-after"]) >= 1
        with httpx.stream("POST", f"{b.url}/v1/chat/completions", json=body, headers=bob) as r2:
            assert r2.status_code == 200
            # Two streams are open across the replicas: a third is refused on either.
            for replica in (a, b):
                full = httpx.post(f"{replica.url}/v1/chat/completions", json=body, headers=bob)
                assert full.status_code == 429
                assert full.json()["error"]["code"] == "server_overloaded"
                assert "across the replicas" in full.json()["error"]["message"]


def test_a_token_limit_added_to_a_key_that_has_been_used_admits_it(
    replica_set: ReplicaSet, tmp_path: Path
) -> None:
    # Completion tokens are charged to every key's bucket level, limited or not, with no
    # refill time: a limit added later made every request of the key a 500 (Lua: nil).
    keys, carol = one_key(tmp_path, "carol")
    first = replica_set.start("--synthetic-itl-ms", "1", "--api-keys-file", str(keys))
    body = {"messages": [{"role": "user", "content": "a b"}], "max_tokens": 20}
    assert httpx.post(f"{first.url}/v1/chat/completions", json=body, headers=carol).is_success
    deadline = time.monotonic() + 30
    while not replica_set.redis.cli("HGET", "tokenspout:k:carol", "tl"):
        assert time.monotonic() < deadline, "the completion was never charged"
        time.sleep(0.05)
    one_key(tmp_path, "carol", tokens_per_minute=1000)
    second = replica_set.start("--synthetic-itl-ms", "1", "--api-keys-file", str(keys))
    answer = httpx.post(f"{second.url}/v1/chat/completions", json=body, headers=carol)
    assert answer.status_code == 200, answer.text


def test_unreachable_redis_at_start_is_one_line_and_exit_2() -> None:
    port = free_port()
    result = subprocess.run(
        [sys.executable, "-m", "tokenspout.cli", "serve", "--engine", "synthetic",
         "--redis-url", f"redis://:s3cretPW@127.0.0.1:{port}/0"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if "SYNTHETIC" not in line]
    assert len(lines) == 1, result.stderr
    assert f"cannot reach Redis at redis://127.0.0.1:{port}/0" in lines[0]
    assert "s3cretPW" not in result.stderr
