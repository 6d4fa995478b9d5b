"""Upstream failures through tokenspout: retried before the first token, continued on
another upstream after it (exactly: no duplicated or lost text, usage of both parts), a
4xx passed on, clear errors when nothing can answer or a tool call was cut.

The first request of a fresh front goes to its first upstream (ties of the balancer go in
turn from the first), which here is the fault-injecting one; the synthetic tokenspout
behind it gives the answer an uncut stream would have."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator

import httpx
import pytest

from tests.conftest import RunningServer, free_port
from tests.upstream_processes import UpstreamProcess, faulty, front, processes, tokenspout
from tokenspout.engine.synthetic_engine import SyntheticEngine

FAST = {"backoff_s": 0.001, "stall_timeout_s": 0.5, "first_token_timeout_s": 5.0}


@pytest.fixture(scope="module")
def upstreams() -> Iterator[list[UpstreamProcess]]:
    with processes(faulty, lambda: tokenspout("--engine", "synthetic")) as started:
        yield started


@pytest.fixture
def fault(upstreams: list[UpstreamProcess]) -> UpstreamProcess:
    upstreams[0].fault("none")
    return upstreams[0]


@pytest.fixture
def synthetic(upstreams: list[UpstreamProcess]) -> UpstreamProcess:
    return upstreams[1]


def stream(server: RunningServer, path: str, body: dict) -> tuple[str, dict, list[str]]:
    """The streamed text, the usage chunk and the raw data lines."""
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    lines: list[str] = []
    with httpx.stream("POST", f"{server.url}{path}", json=body, timeout=30) as r:
        assert r.status_code == 200
        lines = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    chunks = [json.loads(line) for line in lines[:-1]]
    text = "".join(
        c["choices"][0].get("delta", {}).get("content") or c["choices"][0].get("text") or ""
        for c in chunks
        if c.get("choices")
    )
    return text, chunks[-1].get("usage") or {}, lines


CHAT = ("/v1/chat/completions", {"messages": [{"role": "user", "content": "one two three"}]})
# A completion prompt that ends in a space continues the synthetic engine's words exactly.
COMPLETION = ("/v1/completions", {"prompt": "one two three "})


@pytest.mark.parametrize("fault_name", ["cut", "stall", "malformed"])
@pytest.mark.parametrize("request_kind", [CHAT, COMPLETION], ids=["chat", "completion"])
def test_mid_stream_failure_continues_exactly_on_another_upstream(
    start_server: Callable[..., RunningServer],
    fault: UpstreamProcess,
    synthetic: UpstreamProcess,
    fault_name: str,
    request_kind: tuple[str, dict],
) -> None:
    path, body = request_kind
    body = {**body, "model": "synthetic", "max_tokens": 11}
    uncut = httpx.post(f"{synthetic.url}{path}", json=body).json()
    expected = uncut["choices"][0].get("message", {}).get("content") or uncut["choices"][0].get(
        "text"
    )
    fault.fault(fault_name, after=4)
    server = front(start_server, fault, synthetic, **FAST)
    text, usage, _ = stream(server, path, body)
    assert text == expected
    assert usage["completion_tokens"] == 11
    reason = {"cut": "cut", "stall": "stall", "malformed": "malformed"}[fault_name]
    labels = f'reason="{reason}",upstream="{fault.base}"'
    assert server.metric("tokenspout_upstream_failovers_total", labels) == 1


def test_an_event_that_never_ends_is_a_malformed_upstream_and_the_answer_goes_on(
    start_server: Callable[..., RunningServer], fault: UpstreamProcess, synthetic: UpstreamProcess
) -> None:
    """A ``data:`` line that never ends was kept in memory without bound (until the stall
    timeout, when its chunks kept coming): past ``MAX_EVENT_BYTES`` it is a malformed
    upstream, and the answer continues elsewhere. The stall timeout is long here, so that
    only the limit can end that upstream's part."""
    path, body = CHAT
    body = {**body, "model": "synthetic", "max_tokens": 9}
    expected = httpx.post(f"{synthetic.url}{path}", json=body).json()
    fault.fault("endless", after=3)
    server = front(start_server, fault, synthetic, **{**FAST, "stall_timeout_s": 600})
    text, usage, _ = stream(server, path, body)
    assert text == expected["choices"][0]["message"]["content"]
    assert usage["completion_tokens"] == 9
    labels = f'reason="malformed",upstream="{fault.base}"'
    assert server.metric("tokenspout_upstream_failovers_total", labels) == 1


@pytest.mark.parametrize("reason", ["abort", "error", "cancelled"])
def test_an_answer_the_upstream_gave_up_on_is_continued_not_ended_as_whole(
    start_server: Callable[..., RunningServer],
    fault: UpstreamProcess,
    synthetic: UpstreamProcess,
    reason: str,
) -> None:
    """vLLM ends a request its engine aborted with ``finish_reason: "abort"`` (or
    ``"error"``), a 200 and [DONE]; an inner tokenspout a cancelled one with
    ``"cancelled"``: the answer was cut, not whole, and goes on elsewhere exactly."""
    path, body = CHAT
    body = {**body, "model": "synthetic", "max_tokens": 11}
    expected = httpx.post(f"{synthetic.url}{path}", json=body).json()
    fault.fault("finish", after=4, reason=reason)
    server = front(start_server, fault, synthetic, **FAST)
    text, usage, lines = stream(server, path, body)
    assert text == expected["choices"][0]["message"]["content"]
    assert usage["completion_tokens"] == 11
    finishes = [c["finish_reason"] for line in lines[:-1] for c in json.loads(line)["choices"]]
    assert [f for f in finishes if f] == ["length"]
    labels = f'reason="cut",upstream="{fault.base}"'
    assert server.metric("tokenspout_upstream_failovers_total", labels) == 1


def test_an_answer_the_upstream_gave_up_on_that_nothing_continues_is_an_error(
    start_server: Callable[..., RunningServer], fault: UpstreamProcess
) -> None:
    fault.fault("finish", after=3, reason="abort")
    server = front(start_server, fault, **{**FAST, "retries": 0})
    path, body = CHAT
    body = {**body, "model": "synthetic", "max_tokens": 9}
    text, _, lines = stream(server, path, body)
    assert text == "one two three "
    assert all(
        c["finish_reason"] is None for line in lines[:-2] for c in json.loads(line)["choices"]
    )
    error = json.loads(lines[-2])["error"]
    assert error["code"] == "upstream_failed" and "'abort'" in error["message"]
    assert lines[-1] == "[DONE]"
    whole = httpx.post(f"{server.url}{path}", json=body)
    assert whole.status_code == 502 and "'abort'" in whole.json()["error"]["message"]
    # A normal end under another server's name (TGI's) is a stop, as before.
    fault.fault("finish", after=3, reason="eos_token")
    whole = httpx.post(f"{server.url}{path}", json=body)
    assert whole.status_code == 200 and whole.json()["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize("logprobs", [{}, {"logprobs": 1}], ids=["echo", "echo+logprobs"])
def test_an_echoed_answer_cut_mid_stream_is_continued_without_a_second_echo(
    start_server: Callable[..., RunningServer],
    fault: UpstreamProcess,
    synthetic: UpstreamProcess,
    logprobs: dict,
) -> None:
    """The echo was delivered with the first chunk: the continuation asks for the rest
    only (no echo), and the echo is not one of the answer's tokens."""
    path, body = COMPLETION
    body = {**body, "model": "synthetic", "max_tokens": 6}
    uncut = httpx.post(f"{synthetic.url}{path}", json=body).json()["choices"][0]["text"]
    fault.fault("cut", after=3)
    # Another fault-injecting upstream, answering normally, continues: it gives logprobs.
    with processes(faulty) as (other,):
        server = front(start_server, fault, other, **FAST)
        text, usage, lines = stream(server, path, {**body, "echo": True, **logprobs})
        continued = other.stats()["body"]
    assert text == body["prompt"] + uncut
    assert usage["completion_tokens"] == 6
    assert "echo" not in continued and continued["max_tokens"] == 3
    if logprobs:
        values = [
            v
            for line in lines[:-1]
            for c in json.loads(line)["choices"]
            for v in (c.get("logprobs") or {}).get("token_logprobs", [])
        ]
        assert values == [None] + [-1.0] * (2 + 6)  # the prompt's 3 tokens, the answer's 6


@pytest.mark.parametrize(
    ("path", "body", "limit"),
    [
        (CHAT[0], {**CHAT[1], "max_completion_tokens": 6}, "max_completion_tokens"),
        (CHAT[0], {**CHAT[1], "max_tokens": 6}, "max_tokens"),
        (COMPLETION[0], {**COMPLETION[1], "max_tokens": 6}, "max_tokens"),
        ("/v1/responses", {"input": "one two three", "max_output_tokens": 6},
         "max_completion_tokens"),
    ],
    ids=["max_completion_tokens", "chat max_tokens", "completion", "responses"],
)  # fmt: skip
def test_the_token_limit_goes_upstream_under_the_clients_name_and_a_failover_reduces_it(
    start_server: Callable[..., RunningServer],
    fault: UpstreamProcess,
    path: str,
    body: dict,
    limit: str,
) -> None:
    """OpenAI's reasoning models refuse ``max_tokens`` (400): a chat's
    ``max_completion_tokens`` (a Responses request's ``max_output_tokens``) goes upstream
    as ``max_completion_tokens``, and the continuation after a cut asks for what is left
    of it under the same name."""
    fault.fault("cut", after=2)
    with processes(faulty) as (other,):
        server = front(start_server, fault, other, **FAST)
        r = httpx.post(f"{server.url}{path}", json={**body, "model": "synthetic"})
        assert r.status_code == 200, r.text
        first, continued = fault.stats()["body"], other.stats()["body"]
    limits = [{k: v for k, v in b.items() if k.startswith("max_")} for b in (first, continued)]
    assert limits == [{limit: 6}, {limit: 4}]


def test_chats_name_for_the_limit_on_a_completion_is_refused_not_dropped(
    start_server: Callable[..., RunningServer], fault: UpstreamProcess
) -> None:
    """An unknown field goes upstream as sent, but ``max_completion_tokens`` on
    /v1/completions went nowhere (the limit goes upstream as ``max_tokens``): the answer ran
    to the default limit, as the embedded engine's strict schema would not let happen."""
    server = front(start_server, fault)
    received = fault.stats()["received"]
    body = {**COMPLETION[1], "model": "synthetic", "max_completion_tokens": 4}
    r = httpx.post(f"{server.url}{COMPLETION[0]}", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "max_completion_tokens"
    assert fault.stats()["received"] == received


# logprobs, which the synthetic tokenspout refuses (400) and the fault-injecting one gives.
WITH_LOGPROBS = {"prompt": "one two three ", "model": "synthetic", "max_tokens": 6, "logprobs": 1}


def test_a_refused_continuation_is_an_upstream_failure_and_goes_on_elsewhere(
    start_server: Callable[..., RunningServer], fault: UpstreamProcess, synthetic: UpstreamProcess
) -> None:
    """The client's request was accepted: a continuation refused with a 4xx is the
    upstream's failure, not the client's, and the next upstream continues."""
    uncut = httpx.post(f"{synthetic.url}/v1/completions", json={**WITH_LOGPROBS, "logprobs": None})
    fault.fault("cut", after=2)
    with processes(faulty) as (other,):
        # In turn: the fault-injecting one, then the synthetic one refuses, then `other`.
        server = front(start_server, fault, synthetic, other, **FAST)
        text, usage, _ = stream(server, "/v1/completions", WITH_LOGPROBS)
    assert text == uncut.json()["choices"][0]["text"]
    assert usage["completion_tokens"] == 6
    labels = f'reason="upstream_error",upstream="{synthetic.base}"'
    assert server.metric("tokenspout_upstream_failovers_total", labels) == 1


def test_a_refused_continuation_nothing_else_takes_ends_with_an_error_naming_it(
    start_server: Callable[..., RunningServer], fault: UpstreamProcess, synthetic: UpstreamProcess
) -> None:
    fault.fault("cut", after=2)
    server = front(start_server, fault, synthetic, **{**FAST, "retries": 1})
    text, _, lines = stream(server, "/v1/completions", WITH_LOGPROBS)
    assert text == "one two "
    error = json.loads(lines[-2])["error"]
    assert error["code"] == "upstream_failed"
    assert "the continuation" in error["message"] and synthetic.base in error["message"]
    assert "logprobs" in error["message"]
    assert lines[-1] == "[DONE]"


def test_a_vision_chat_cut_mid_stream_is_continued_with_its_messages_as_sent(
    start_server: Callable[..., RunningServer], fault: UpstreamProcess
) -> None:
    """The continuation's messages are the client's as sent (an image part, a field
    tokenspout does not know) and the text so far as an assistant message, continued."""
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
    user = {"role": "user", "content": [{"type": "text", "text": "one two three"}, image],
            "x_vendor": 1}  # fmt: skip
    body = {"model": "synthetic", "messages": [user], "max_tokens": 11}
    with processes(faulty) as (other,):
        uncut = httpx.post(f"{other.url}/v1/chat/completions", json={**body, "stream": True})
        fault.fault("cut", after=4)
        server = front(start_server, fault, other, **FAST)
        text, usage, _ = stream(server, "/v1/chat/completions", body)
        first, rest = fault.stats()["body"], other.stats()["body"]
    expected = "".join(
        json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
        for line in uncut.text.splitlines()
        if line.startswith("data: {") and json.loads(line[6:])["choices"]
    )
    assert text == expected and usage["completion_tokens"] == 11
    assert first["messages"] == [user]
    so_far = {"role": "assistant", "content": "one two three one "}
    assert rest["messages"] == [user, so_far]
    assert rest["continue_final_message"] is True


def test_upstream_killed_mid_stream_is_continued(
    start_server: Callable[..., RunningServer], synthetic: UpstreamProcess
) -> None:
    with processes(faulty) as (dying,):
        dying.fault("exit", after=3)
        server = front(start_server, dying, synthetic, **FAST)
        path, body = CHAT
        text, usage, _ = stream(server, path, {**body, "model": "synthetic", "max_tokens": 8})
        assert dying.proc.wait(timeout=10) == 1
    assert text == "one two three one two three one two "
    assert usage["completion_tokens"] == 8


@pytest.mark.parametrize("request_kind", [CHAT, COMPLETION], ids=["chat", "completion"])
def test_a_coalescing_upstream_killed_mid_stream_is_continued_by_its_token_count(
    start_server: Callable[..., RunningServer], request_kind: tuple[str, dict]
) -> None:
    """Upstreams that send several tokens per chunk (a tokenspout's coalescing) say how many
    (continuous usage): the continuation's max_tokens takes off the tokens generated, not
    the chunks received, so the answer is exactly as long as the uncut one."""
    # 50 ms a token: the kill, after 5 tokens, comes well before the 30th on a loaded machine.
    flags = ("--engine", "synthetic", "--synthetic-itl-ms", "50", "--flush-tokens", "4",
             "--flush-ms", "10000")  # fmt: skip
    path, body = request_kind
    body = {**body, "model": "synthetic", "max_tokens": 30}
    with processes(lambda: tokenspout(*flags), lambda: tokenspout(*flags)) as (dying, other):
        uncut = httpx.post(f"{other.url}{path}", json=body).json()
        choice = uncut["choices"][0]
        expected = choice.get("message", {}).get("content") or choice.get("text")
        server = front(start_server, dying, other, **FAST)
        streamed = {**body, "stream": True, "stream_options": {"include_usage": True}}
        texts, usage = [], None
        with httpx.stream("POST", f"{server.url}{path}", json=streamed, timeout=30) as r:
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                usage = chunk.get("usage") or usage
                if chunk["choices"]:
                    c = chunk["choices"][0]
                    texts.append(c.get("delta", {}).get("content") or c.get("text") or "")
                # Killed once a chunk of several tokens reached the front.
                if dying.proc.poll() is None and len("".join(texts).split()) >= 5:
                    dying.kill()
    assert "".join(texts) == expected
    assert usage is not None and usage["completion_tokens"] == 30
    labels = f'reason="cut",upstream="{dying.base}"'
    assert server.metric("tokenspout_upstream_failovers_total", labels) == 1


def test_a_whole_answer_cut_before_its_usage_is_not_continued(
    start_server: Callable[..., RunningServer], fault: UpstreamProcess, synthetic: UpstreamProcess
) -> None:
    fault.fault("nousage")
    server = front(start_server, fault, synthetic, **FAST)
    path, body = CHAT
    text, usage, _ = stream(server, path, {**body, "model": "synthetic", "max_tokens": 4})
    assert text == "one two three one "
    assert usage["completion_tokens"] == 4
    labels = f'reason="cut",upstream="{fault.base}"'
    with pytest.raises(KeyError):
        server.metric("tokenspout_upstream_failovers_total", labels)


def test_a_whole_answer_ends_at_its_usage_without_waiting_for_done(
    start_server: Callable[..., RunningServer], fault: UpstreamProcess
) -> None:
    """An upstream that sends its finish and its usage but neither [DONE] nor the end of
    its body: the answer is whole, and ends then (not at the stall timeout, here far off);
    the upstream's response is closed."""
    fault.fault("hang")
    server = front(start_server, fault, stall_timeout_s=3600)
    path, body = CHAT
    body = {**body, "model": "synthetic", "max_tokens": 4, "user": "hang"}
    text, usage, lines = stream(server, path, body)
    assert text == "one two three one "
    assert usage["completion_tokens"] == 4
    assert json.loads(lines[-3])["choices"][0]["finish_reason"] == "length"
    fault.wait_abandoned("hang")


@pytest.mark.parametrize("status", [500, 503, 429, 204, 307])
def test_failure_before_the_first_token_is_retried_elsewhere(
    start_server: Callable[..., RunningServer],
    fault: UpstreamProcess,
    synthetic: UpstreamProcess,
    status: int,
) -> None:
    fault.fault("status", status=status)
    # A 429's Retry-After (1 s here) is waited for: the client sees heartbeats meanwhile.
    server = front(start_server, fault, synthetic, **FAST)
    path, body = CHAT
    r = httpx.post(f"{server.url}{path}", json={**body, "model": "synthetic", "max_tokens": 3})
    assert r.status_code == 200
    assert r.json()["choices"][0]["message"]["content"] == "one two three "
    assert server.metric("tokenspout_upstream_retries_total", f'upstream="{fault.base}"') == 1
    labels = f'status="{status}",upstream="{fault.base}"'
    assert server.metric("tokenspout_upstream_requests_total", labels) == 1


def test_a_200_that_is_not_a_stream_is_retried_elsewhere_else_a_502(
    start_server: Callable[..., RunningServer], fault: UpstreamProcess, synthetic: UpstreamProcess
) -> None:
    """An upstream that answers a whole JSON completion, not SSE: the request was not
    accepted, so the streamed client's status is still to come (it used to get a 200 and
    then an error event)."""
    fault.fault("json")
    path, body = CHAT
    streamed = {**body, "model": "synthetic", "max_tokens": 3, "stream": True}
    # Tried twice: the first failure's 200 went out while the second was asked.
    alone = front(start_server, fault, **{**FAST, "retries": 1, "backoff_s": 0.2})
    r = httpx.post(f"{alone.url}{path}", json=streamed)
    assert r.status_code == 502
    assert "not SSE" in r.json()["error"]["message"] and fault.base in r.text
    server = front(start_server, fault, synthetic, **FAST)
    text, _, _ = stream(server, path, streamed)
    assert text == "one two three "
    assert server.metric("tokenspout_upstream_retries_total", f'upstream="{fault.base}"') == 1


def test_a_4xx_is_the_clients_and_passes_through(
    start_server: Callable[..., RunningServer], fault: UpstreamProcess
) -> None:
    fault.fault("status", status=422)
    server = front(start_server, fault, **FAST)
    path, body = CHAT
    r = httpx.post(f"{server.url}{path}", json={**body, "model": "synthetic", "max_tokens": 3})
    assert r.status_code == 422
    error = r.json()["error"]
    assert error["message"].endswith("fault injected: 422")
    assert (error["type"], error["param"], error["code"]) == (
        "invalid_request_error",
        "temperature",
        "injected",
    )
    received = fault.stats()["received"]
    # Streamed, the refusal keeps its status too: the 200 waits for the upstream's.
    streamed = {**body, "model": "synthetic", "max_tokens": 3, "stream": True}
    r = httpx.post(f"{server.url}{path}", json=streamed)
    assert r.status_code == 422 and r.json()["error"] == error
    assert fault.stats()["received"] == received + 1, "a 4xx is not retried"
    # So with n choices, each its own upstream request.
    r = httpx.post(f"{server.url}{path}", json={**streamed, "n": 2})
    assert r.status_code == 422 and r.json()["error"] == error


@pytest.mark.parametrize("status", [401, 403])
def test_an_upstream_refusing_our_key_is_its_failure_not_the_clients(
    start_server: Callable[..., RunningServer],
    fault: UpstreamProcess,
    synthetic: UpstreamProcess,
    status: int,
) -> None:
    """The client's Authorization is never forwarded: a 401 or 403 refuses tokenspout's
    key for that upstream. Another upstream answers; the refusing one counts it against
    its health (ejected at once here); with none left, a 502 that says so, without the
    upstream's own text (which may quote the key, masked)."""
    fault.fault("status", status=status)
    server = front(start_server, fault, synthetic, eject_after=1, health_interval_s=600, **FAST)
    path, body = CHAT
    r = httpx.post(f"{server.url}{path}", json={**body, "model": "synthetic", "max_tokens": 3})
    assert r.status_code == 200, r.text
    assert server.metric("tokenspout_upstream_healthy", f'upstream="{fault.base}"') == 0
    labels = f'status="{status}",upstream="{fault.base}"'
    assert server.metric("tokenspout_upstream_requests_total", labels) == 1
    alone = front(start_server, fault, **{**FAST, "retries": 0})
    r = httpx.post(f"{alone.url}{path}", json={**body, "model": "synthetic", "max_tokens": 3})
    assert r.status_code == 502
    error = r.json()["error"]
    assert (error["type"], error["code"]) == ("server_error", "upstream_unavailable")
    assert "refused tokenspout's credentials" in error["message"]
    assert fault.base in error["message"] and "fault injected" not in error["message"]


def test_older_vllms_error_body_gives_its_message_not_its_json(
    start_server: Callable[..., RunningServer], fault: UpstreamProcess
) -> None:
    """vLLM before its OpenAI-shaped errors answered ``{"object": "error", "message": ...,
    "type": "BadRequestError", "code": 400}``: its message is read as an ``error``'s is,
    and its class name and numeric code, which are none of OpenAI's, are not passed on."""
    fault.fault("status", status=400, shape="vllm")
    server = front(start_server, fault, **FAST)
    path, body = CHAT
    streamed = {**body, "model": "synthetic", "max_tokens": 3, "stream": True}
    r = httpx.post(f"{server.url}{path}", json=streamed)
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["message"] == f"upstream {fault.base} refused the request: fault injected: 400"
    assert (error["type"], error["code"]) == ("invalid_request_error", "upstream_refused")


def test_a_stream_begins_when_the_upstream_accepts_it_not_at_its_first_token(
    start_server: Callable[..., RunningServer], fault: UpstreamProcess
) -> None:
    """The 200 waits for the upstream's own (its refusal would keep its status), not for
    a first token: a stream whose upstream has answered but not yet generated can be
    cancelled by its id (no heartbeat would open it first: they are 10 minutes apart)."""
    fault.fault("stall", after=0)
    server = front(
        start_server, fault, config={"heartbeat_interval_s": 600}, first_token_timeout_s=600
    )
    path, body = CHAT
    streamed = {**body, "model": "synthetic", "max_tokens": 3, "stream": True}
    with httpx.stream("POST", f"{server.url}{path}", json=streamed, timeout=60) as r:
        assert r.status_code == 200
        cancel = f"{server.url}/v1/streams/{r.headers['x-stream-id']}/cancel"
        assert httpx.post(cancel).status_code == 200
        lines = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert json.loads(lines[-2])["choices"][0]["finish_reason"] == "cancelled"


@pytest.mark.parametrize("streamed", [False, True])
def test_an_upstream_429_nothing_else_takes_keeps_its_retry_after(
    start_server: Callable[..., RunningServer], fault: UpstreamProcess, streamed: bool
) -> None:
    fault.fault("status", status=429, retry_after=2)
    server = front(start_server, fault, **{**FAST, "retries": 0})
    path, body = CHAT
    r = httpx.post(
        f"{server.url}{path}",
        json={**body, "model": "synthetic", "max_tokens": 3, "stream": streamed},
    )
    assert r.status_code == 429
    assert r.headers["retry-after"] == "2"
    error = r.json()["error"]
    assert (error["type"], error["code"]) == ("rate_limit_error", "upstream_rate_limited")


@pytest.mark.parametrize("status", [500, 429])
def test_behind_another_tokenspout_the_inner_error_message_is_kept(
    start_server: Callable[..., RunningServer], fault: UpstreamProcess, status: int
) -> None:
    """In a chain, the inner tokenspout's reason (which of its upstreams failed, how)
    reaches the client, not only the outer's 'status 502 at <the inner>'. Another server's
    own message does not (it is logged): OpenAI's 429 names its operator's organization
    and limits."""
    fault.fault("status", status=status, retry_after=0)
    inner = front(start_server, fault, **{**FAST, "retries": 0})
    outer = front(start_server, f"{inner.url}/v1", **{**FAST, "retries": 0})
    path, body = CHAT
    body = {**body, "model": "synthetic", "max_tokens": 3}
    for server in (inner, outer):
        r = httpx.post(f"{server.url}{path}", json=body)
        assert r.status_code == (429 if status == 429 else 502)
        message = r.json()["error"]["message"]
        assert fault.base in message and "fault injected" not in message, message
        assert (inner.url in message) == (server is outer), message


def test_first_token_timeout_is_a_504(
    start_server: Callable[..., RunningServer], fault: UpstreamProcess
) -> None:
    fault.fault("slow", delay_s=30)
    server = front(start_server, fault, first_token_timeout_s=0.3, retries=1, backoff_s=0.001)
    path, body = CHAT
    r = httpx.post(f"{server.url}{path}", json={**body, "model": "synthetic"}, timeout=30)
    assert r.status_code == 504
    assert "no first chunk within 0.3 s" in r.json()["error"]["message"]


@pytest.mark.parametrize("request_kind", [CHAT, COMPLETION], ids=["chat", "completion"])
def test_first_token_timeout_runs_past_a_chats_opening_role_chunk(
    start_server: Callable[..., RunningServer], request_kind: tuple[str, dict]
) -> None:
    """vLLM and tokenspout open a chat stream at once with a chunk that carries only the
    role, long before the first token: the first-token timeout still runs after it (the
    shorter stall timeout does not), and no time to first token is measured to it."""
    slow = f"{start_server(SyntheticEngine(ttft_ms=60_000)).url}/v1"
    server = front(
        start_server, slow, first_token_timeout_s=0.3, stall_timeout_s=0.1, retries=1,
        backoff_s=0.001,
    )  # fmt: skip
    path, body = request_kind
    r = httpx.post(f"{server.url}{path}", json={**body, "model": "synthetic"}, timeout=30)
    assert r.status_code == 504, r.text
    assert "no first chunk within 0.3 s" in r.json()["error"]["message"]
    with pytest.raises(KeyError):
        server.metric("tokenspout_upstream_time_to_first_token_seconds_count", f'upstream="{slow}"')


def test_time_to_first_token_is_measured_to_the_first_token_not_the_role_chunk(
    start_server: Callable[..., RunningServer],
) -> None:
    # The upstream's first token comes 0.5 s after the request, its role chunk at once.
    upstream = f"{start_server(SyntheticEngine(ttft_ms=500)).url}/v1"
    server = front(start_server, upstream)
    path, body = CHAT
    r = httpx.post(f"{server.url}{path}", json={**body, "model": "synthetic", "max_tokens": 2})
    assert r.status_code == 200, r.text
    name = "tokenspout_upstream_time_to_first_token_seconds"
    assert server.metric(f"{name}_count", f'upstream="{upstream}"') == 1
    assert server.metric(f"{name}_bucket", f'le="0.3",upstream="{upstream}"') == 0


def test_all_upstreams_down_is_a_clear_503(start_server: Callable[..., RunningServer]) -> None:
    nobody = [f"http://127.0.0.1:{free_port()}/v1" for _ in range(2)]
    server = front(start_server, *nobody, api_key="upstream-secret")
    health = httpx.get(f"{server.url}/health")
    assert health.status_code == 503
    # With or without a model named: none answered, so no model list says otherwise.
    for named in ({}, {"model": "some-model"}):
        r = httpx.post(
            f"{server.url}/v1/completions",
            json={"prompt": "hi", "stream": True, **named},
            timeout=30,
        )
        assert r.status_code == 503, named
        # Come back at the next health check (every 5 s by default), not "shortly".
        assert 1 <= int(r.headers["retry-after"]) <= 5
        message = r.json()["error"]["message"]
        assert "no upstream is healthy" in message and nobody[0].removesuffix("/v1") in message
        assert "upstream-secret" not in r.text + health.text


def test_nothing_can_continue_ends_with_an_error_event_then_done(
    start_server: Callable[..., RunningServer], fault: UpstreamProcess
) -> None:
    fault.fault("cut", after=2)
    server = front(start_server, fault, retries=1, backoff_s=0.001)
    path, body = CHAT
    text, _, lines = stream(server, path, {**body, "model": "synthetic", "max_tokens": 9})
    assert text.startswith("one two ")
    error = json.loads(lines[-2])["error"]
    assert "the answer was cut" in error["message"] and fault.base in error["message"]
    assert lines[-1] == "[DONE]"


def test_a_tool_call_cut_mid_stream_ends_with_a_clear_error_and_is_not_retried(
    start_server: Callable[..., RunningServer], fault: UpstreamProcess, synthetic: UpstreamProcess
) -> None:
    """Half a tool call cannot be continued elsewhere, and sending the request again would
    stream the call twice: the client gets the pieces it already had, an error event that
    says the call was interrupted, and [DONE]; no other upstream is asked."""
    fault.fault("toolcut", after=2)
    server = front(start_server, fault, synthetic, **FAST)
    received = fault.stats()["received"]
    path, body = CHAT
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    _, _, lines = stream(server, path, {**body, "model": "synthetic", "tools": tools})
    chunks = [json.loads(line) for line in lines[:-2]]
    calls = [c for ch in chunks for c in ch["choices"][0]["delta"].get("tool_calls") or ()]
    assert [c["function"].get("name") for c in calls if "id" in c] == ["get_weather"]
    assert "".join(c["function"].get("arguments") or "" for c in calls) == '{"city": "Paris"'
    assert all(ch["choices"][0]["finish_reason"] is None for ch in chunks)
    error = json.loads(lines[-2])["error"]
    assert error["code"] == "tool_call_interrupted"
    assert "tool call" in error["message"] and fault.base in error["message"]
    assert lines[-1] == "[DONE]"
    assert fault.stats()["received"] == received + 1
    server.wait_metric("tokenspout_upstream_in_flight", 0, labels=f'upstream="{fault.base}"')
    server.wait_metric("tokenspout_requests_running", 0)
    labels = 'endpoint="chat",status="error",transport="sse"'
    server.wait_metric("tokenspout_requests_total", 1, labels=labels)
    for name, labels in (
        ("tokenspout_upstream_failovers_total", f'reason="cut",upstream="{fault.base}"'),
        ("tokenspout_upstream_retries_total", f'upstream="{fault.base}"'),
        ("tokenspout_upstream_requests_total", f'status="200",upstream="{synthetic.base}"'),
    ):
        with pytest.raises(KeyError):
            server.metric(name, labels)
    assert (
        server.metric("tokenspout_upstream_requests_total", f'status="cut",upstream="{fault.base}"')
        == 1
    )
    # Not streamed: the same error, with its status.
    alone = front(start_server, fault, **{**FAST, "retries": 0})
    whole = httpx.post(f"{alone.url}{path}", json={**body, "model": "synthetic", "tools": tools})
    assert whole.status_code == 502
    assert whole.json()["error"]["code"] == "tool_call_interrupted"
    assert fault.stats()["received"] == received + 2, "the request was sent again"


def test_an_answer_cut_during_its_reasoning_ends_with_a_clear_error_and_is_not_continued(
    start_server: Callable[..., RunningServer], fault: UpstreamProcess, synthetic: UpstreamProcess
) -> None:
    """A continuation's prompt cannot carry the reasoning so far: going on elsewhere would
    stream a second reasoning, or an answer that never saw the first. The client gets the
    reasoning it already had, an error that says why, and [DONE]; no other upstream is
    asked."""
    fault.fault("reasoningcut", after=2)
    server = front(start_server, fault, synthetic, **FAST)
    received = fault.stats()["received"]
    path, body = CHAT
    _, _, lines = stream(server, path, {**body, "model": "synthetic", "max_tokens": 9})
    chunks = [json.loads(line) for line in lines[:-2]]
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == "Let me "
    assert not any(d.get("content") for d in deltas)
    error = json.loads(lines[-2])["error"]
    assert error["code"] == "reasoning_interrupted"
    assert "reasoning" in error["message"] and fault.base in error["message"]
    assert lines[-1] == "[DONE]"
    assert fault.stats()["received"] == received + 1
    with pytest.raises(KeyError):
        server.metric(
            "tokenspout_upstream_requests_total", f'status="200",upstream="{synthetic.base}"'
        )
    # Not streamed: the same error, with its status.
    alone = front(start_server, fault, **{**FAST, "retries": 0})
    whole = httpx.post(f"{alone.url}{path}", json={**body, "model": "synthetic", "max_tokens": 9})
    assert whole.status_code == 502
    assert whole.json()["error"]["code"] == "reasoning_interrupted"


def test_an_answer_cut_with_no_retry_left_counts_the_tokens_it_sent(
    start_server: Callable[..., RunningServer], fault: UpstreamProcess
) -> None:
    fault.fault("cut", after=3)
    server = front(start_server, fault, **{**FAST, "retries": 0})
    path, body = CHAT
    streamed = {**body, "model": "synthetic", "max_tokens": 11, "stream": True}
    with httpx.stream("POST", f"{server.url}{path}", json=streamed, timeout=30) as r:
        lines = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    chunks = [json.loads(line) for line in lines[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks[:-1])
    assert len(text.split()) == 3 and "error" in chunks[-1]  # a word a token
    assert server.metric("tokenspout_generation_tokens_total") == 3
