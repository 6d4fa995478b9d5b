"""``n > 1``: several choices for one prompt, through the openai SDK and raw HTTP, on the
synthetic engine (the real model's choices are in test_structured_output.py). The choices
are a group of streams read as one: merged with their ``index``, usage summed, cancelled
and aborted together, never resumable."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable

import httpx
import pytest
from openai import OpenAI
from websockets.sync.client import connect

from tests.conftest import RunningServer
from tokenspout.engine.request import Prompt, SamplingParams
from tokenspout.engine.synthetic_engine import SyntheticEngine
from tokenspout.protocols.stream_wire import StreamWire
from tokenspout.server.generation_request import GenerationRequest

CHAT = [{"role": "user", "content": "one two three four"}]


def sdk(server: RunningServer) -> OpenAI:
    return OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=30)


def test_chat_n3_gives_three_choices_and_usage_counts_them_all(
    synthetic_server: RunningServer,
) -> None:
    client = sdk(synthetic_server)
    one = client.chat.completions.create(model="synthetic", messages=CHAT, max_tokens=5)  # type: ignore[arg-type]
    out = client.chat.completions.create(model="synthetic", messages=CHAT, max_tokens=5, n=3)  # type: ignore[arg-type]
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert all(c.message.content and c.finish_reason == "length" for c in out.choices)
    assert out.usage is not None and one.usage is not None
    assert out.usage.prompt_tokens == one.usage.prompt_tokens  # the prompt once
    assert out.usage.completion_tokens == 3 * one.usage.completion_tokens == 15
    assert synthetic_server.metric("tokenspout_requests_running") == 0


def test_chat_n3_streams_every_choice_with_its_index(synthetic_server: RunningServer) -> None:
    stream = sdk(synthetic_server).chat.completions.create(
        model="synthetic",
        messages=CHAT,  # type: ignore[arg-type]
        max_tokens=6,
        n=3,
        stream=True,
        stream_options={"include_usage": True},
    )
    text: dict[int, str] = defaultdict(str)
    roles, finishes, usage = set(), {}, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
            assert chunk.choices == []
        for choice in chunk.choices:
            if choice.delta.role:
                roles.add(choice.index)
            text[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    assert roles == {0, 1, 2}
    assert finishes == {0: "length", 1: "length", 2: "length"}
    assert set(text) == {0, 1, 2} and all(text.values())
    assert usage is not None and usage.completion_tokens == 18


def test_a_groups_events_carry_no_id(synthetic_server: RunningServer) -> None:
    # Each event took its choice's position as its id, so the choices' events shared ids
    # (":1" twice, each choice's finish at the group's total): an id named no one event,
    # and a group is not resumable, so its events have none.
    body = {"messages": CHAT, "max_tokens": 3, "n": 2, "stream": True,
            "stream_options": {"include_usage": True, "flush_tokens": 1}}  # fmt: skip
    r = httpx.post(f"{synthetic_server.url}/v1/chat/completions", json=body)
    lines = r.text.splitlines()
    assert not [line for line in lines if line.startswith("id:")], lines
    chunks = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finishes.count("length") == 2 and chunks[-1]["usage"]["completion_tokens"] == 6
    assert lines[-2:] == ["data: [DONE]", ""]


def test_completions_n2_streamed_and_whole(synthetic_server: RunningServer) -> None:
    client = sdk(synthetic_server)
    whole = client.completions.create(model="synthetic", prompt="a b c", max_tokens=4, n=2)
    assert [c.index for c in whole.choices] == [0, 1]
    assert whole.choices[0].text == whole.choices[1].text == "a b c a "
    assert whole.usage is not None and whole.usage.completion_tokens == 8
    streamed: dict[int, str] = defaultdict(str)
    for chunk in client.completions.create(
        model="synthetic", prompt="a b c", max_tokens=4, n=2, stream=True
    ):
        for choice in chunk.choices:
            streamed[choice.index] += choice.text
    assert dict(streamed) == {0: "a b c a ", 1: "a b c a "}


def slow_server(start_server: Callable[..., RunningServer]) -> RunningServer:
    return start_server(SyntheticEngine(itl_ms=20))


def test_cancel_by_id_cancels_every_choice(start_server: Callable[..., RunningServer]) -> None:
    server = slow_server(start_server)
    body = {"messages": CHAT, "max_tokens": 2000, "n": 3, "stream": True}
    finishes = {}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=30) as r:
        stream_id = r.headers["x-stream-id"]
        lines = r.iter_lines()  # held: a dropped iterator would close the response
        for line in lines:
            if '"content":"one' in line.replace(" ", ""):
                break
        assert server.metric("tokenspout_requests_running") == 3
        # A multi-choice stream takes no second reader.
        follow = httpx.get(f"{server.url}/v1/streams/{stream_id}", timeout=5)
        assert follow.status_code == 409 and "n > 1" in follow.json()["error"]["message"]
        cancel = httpx.post(f"{server.url}/v1/streams/{stream_id}/cancel", timeout=5)
        assert cancel.status_code == 200, cancel.text
        for line in lines:
            if line.startswith("data: {"):
                for choice in json.loads(line[6:])["choices"]:
                    if choice["finish_reason"]:
                        finishes[choice["index"]] = choice["finish_reason"]
            if line == "data: [DONE]":
                break
    assert finishes == {0: "cancelled", 1: "cancelled", 2: "cancelled"}
    server.wait_metric("tokenspout_requests_running", 0)


def test_client_leaving_aborts_every_choice(start_server: Callable[..., RunningServer]) -> None:
    server = slow_server(start_server)
    body = {"prompt": "x y", "max_tokens": 2000, "n": 4, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()  # held: a dropped iterator would close the response
        for line in lines:
            if line.startswith("data: {"):
                break
        assert server.metric("tokenspout_requests_running") == 4
    server.wait_metric("tokenspout_requests_running", 0)
    aborted = server.metric("tokenspout_requests_aborted_total", 'reason="client_disconnect"')
    assert aborted == 4


def test_websocket_refuses_n(synthetic_server: RunningServer) -> None:
    url = synthetic_server.url.replace("http", "ws") + "/v1/ws"
    with connect(url) as ws:
        ws.send(json.dumps({"type": "generate", "id": "s1", "messages": CHAT, "n": 2}))
        reply = json.loads(ws.recv())
    assert reply["type"] == "error" and "n > 1" in reply["error"]["message"], reply


@pytest.mark.parametrize(
    ("seed", "expected"),
    [
        (None, [None] * 3),
        (7, [7, 8, 9]),
        # Wrapped as a signed 64-bit sum: past the largest seed comes the smallest.
        (2**63 - 2, [2**63 - 2, 2**63 - 1, -(2**63)]),
    ],
)
def test_choices_of_a_seeded_request_draw_from_derived_seeds(
    seed: int | None, expected: list[int | None]
) -> None:
    generation = GenerationRequest(
        Prompt((1,), "x"),
        SamplingParams(seed=seed),
        StreamWire("chat", "m"),
        resumable=False,
        n=3,
    )
    seeds = [p.seed for p in generation.choice_params()]
    assert seeds == expected
