"""The real default model (SmolLM2-135M on the CPU) through HTTP, with real clients."""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Iterator

import httpx
import pytest
from openai import OpenAI

from tests.conftest import RunningServer, _start
from tests.e2e.test_disconnect import open_raw_stream
from tokenspout.engine.llm_engine import LLMEngine
from tokenspout.server.config import ServerConfig

# A real model on two shared cores: `make test-slow` (and CI, after `make test`) runs these.
pytestmark = pytest.mark.slow


def read_until_text(sock: socket.socket) -> None:
    """Read until a chunk with non-empty content (the opening chunk has ``"content":""``)."""
    sock.settimeout(60)
    data = b""
    while re.search(rb'"content":"[^"]', data) is None:
        chunk = sock.recv(65536)
        assert chunk, "connection closed early"
        data += chunk


@pytest.fixture(scope="module")
def real_server() -> Iterator[RunningServer]:
    running, stop = _start(LLMEngine(None, max_num_seqs=4), ServerConfig())
    yield running
    stop()


def chat(client: OpenAI, text: str, **kw: object) -> str:
    out = client.chat.completions.create(
        model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": text}], **kw
    )
    return out.choices[0].message.content or ""


def test_greedy_answer_is_right(real_server: RunningServer) -> None:
    client = OpenAI(base_url=f"{real_server.url}/v1", api_key="x", max_retries=0)
    assert "Paris" in chat(client, "What is the capital of France?", temperature=0, max_tokens=30)
    assert [m.id for m in client.models.list()] == ["SmolLM2-135M-Instruct"]


def test_the_seed_endpoint_with_chat_answers_as_a_chat_completion(
    real_server: RunningServer,
) -> None:
    # The page's EventSource transport sends the last message by GET: as text to continue it
    # got no answer at all ("[DONE]" at once); with chat=true it goes through the template.
    question = "What is the capital of France?"
    client = OpenAI(base_url=f"{real_server.url}/v1", api_key="x", max_retries=0)
    expected = chat(client, question, temperature=0, max_tokens=12)
    query = {"prompt": question, "chat": "true", "temperature": "0", "max_tokens": "12"}
    r = httpx.get(f"{real_server.url}/v1/completions/stream", params=query, timeout=120)
    data = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    assert "".join(json.loads(d)["token"] for d in data[:-1]) == expected
    assert "Paris" in expected


@pytest.mark.parametrize(
    "prompt", ["Say hello in Japanese.", "Reply with three emoji that describe happiness."]
)
def test_japanese_and_emoji_stream_whole_and_equal(real_server: RunningServer, prompt: str) -> None:
    client = OpenAI(base_url=f"{real_server.url}/v1", api_key="x", max_retries=0)
    args = {"temperature": 0, "max_tokens": 60}
    whole = chat(client, prompt, **args)
    deltas = [
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(
            model="SmolLM2-135M-Instruct",
            messages=[{"role": "user", "content": prompt}],
            stream=True,
            stream_options={"flush_tokens": 1, "flush_ms": 0},
            **args,
        )
        if c.choices
    ]
    assert not any("\ufffd" in d for d in deltas)
    assert "".join(deltas) == whole
    assert len([d for d in deltas if d]) > 5


def test_queued_request_whose_client_left_is_never_prefilled() -> None:
    running, stop = _start(LLMEngine(None, max_num_seqs=1), ServerConfig())
    try:
        body = {
            "messages": [{"role": "user", "content": "Count from one to a thousand."}],
            "max_tokens": 2000,
            "ignore_eos": True,
            "stream": True,
        }
        busy = open_raw_stream(running, body)
        read_until_text(busy)
        computed = running.metric("tokenspout_prompt_tokens_total")
        queued = open_raw_stream(running, {**body, "messages": [{"role": "user", "content": "Hi"}]})
        running.wait_metric("tokenspout_requests_waiting", 1, timeout=10)
        queued.close()
        running.wait_metric("tokenspout_requests_waiting", 0, timeout=2)
        busy.close()
        running.wait_metric("tokenspout_requests_running", 0, timeout=2)
        # The engine serves in order: had the queued request been kept, it would be
        # prefilled before this one.
        after = httpx.post(
            f"{running.url}/v1/completions", json={"prompt": "Hi", "max_tokens": 1}, timeout=60
        ).json()
        added = after["usage"]["prompt_tokens"]
        assert running.metric("tokenspout_prompt_tokens_total") == computed + added
    finally:
        stop()


def test_repeated_system_prompt_hits_the_prefix_cache(real_server: RunningServer) -> None:
    system = "You are a meticulous assistant. " + "Follow the house style guide closely. " * 60
    hits = real_server.metric("tokenspout_prefix_cache_hits_total")
    computed = real_server.metric("tokenspout_prompt_tokens_total")
    for question in ("Name a fruit.", "Name a colour."):
        r = httpx.post(
            f"{real_server.url}/v1/chat/completions",
            json={
                "messages": [
                    {"role": "system", "content": system},
                    {"role": "user", "content": question},
                ],
                "max_tokens": 4,
            },
            timeout=120,
        )
        assert r.status_code == 200
        if question == "Name a fruit.":
            prompt_tokens = r.json()["usage"]["prompt_tokens"]
            first_computed = real_server.metric("tokenspout_prompt_tokens_total") - computed
    second_computed = (
        real_server.metric("tokenspout_prompt_tokens_total") - computed - first_computed
    )
    assert prompt_tokens > 400
    assert real_server.metric("tokenspout_prefix_cache_hits_total") >= hits + 1
    assert second_computed < prompt_tokens / 10, "the shared system prompt was not recomputed"


def test_health_answers_while_streams_generate(real_server: RunningServer) -> None:
    body = {
        "messages": [{"role": "user", "content": "Tell me a story."}],
        "max_tokens": 200,
        "ignore_eos": True,
        "stream": True,
    }
    socks = [open_raw_stream(real_server, body) for _ in range(4)]
    try:
        for s in socks:
            read_until_text(s)
        for _ in range(5):
            assert httpx.get(f"{real_server.url}/health", timeout=2).status_code == 200
    finally:
        for s in socks:
            s.close()
    real_server.wait_metric("tokenspout_requests_running", 0, timeout=5)


@pytest.mark.parametrize("cut", [1, 7, 20])
def test_continue_final_message_gives_the_rest_of_the_greedy_answer(
    real_server: RunningServer, cut: int
) -> None:
    # What an upstream's failover sends to a tokenspout: the messages, the answer so far as
    # an open assistant message, and what is left of max_tokens.
    client = OpenAI(base_url=f"{real_server.url}/v1", api_key="x", max_retries=0)
    asked = [{"role": "user", "content": "Explain why the sky is blue."}]
    model = "SmolLM2-135M-Instruct"
    # The cut is counted in tokens, from each chunk's logprobs: a reader that falls behind
    # gets what is pending in one event, so a chunk is not always one token.
    tokens = [
        bytes(t.bytes or b"")
        for c in client.chat.completions.create(
            model=model,
            messages=asked,
            temperature=0,
            max_tokens=40,
            logprobs=True,
            stream=True,
            stream_options={"flush_tokens": 1, "flush_ms": 0},
        )
        if c.choices and c.choices[0].logprobs and c.choices[0].logprobs.content
        for t in c.choices[0].logprobs.content
    ]
    whole = b"".join(tokens).decode()
    first = b"".join(tokens[:cut]).decode()
    rest = client.chat.completions.create(
        model=model,
        messages=[*asked, {"role": "assistant", "content": first}],
        temperature=0,
        max_tokens=40 - cut,
        extra_body={"continue_final_message": True, "add_generation_prompt": False},
    )
    assert first + (rest.choices[0].message.content or "") == whole
