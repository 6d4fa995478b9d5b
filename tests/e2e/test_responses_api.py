"""``POST /v1/responses`` (OpenAI's Responses API) on a real server with the synthetic
engine: the shapes the openai SDK reads, the SSE events, refusals, and the stream machinery
a chat stream has (coalescing, heartbeats, cancel by id, a failure after the start)."""

from __future__ import annotations

import json

import httpx
import pytest
from openai import BadRequestError, OpenAI

from tests.conftest import RunningServer
from tokenspout.engine.synthetic_engine import SyntheticEngine


@pytest.fixture
def client(synthetic_server: RunningServer) -> OpenAI:
    return OpenAI(base_url=f"{synthetic_server.url}/v1", api_key="unused", max_retries=0)


def sse_events(response: httpx.Response) -> list[tuple[str, dict]]:
    """``(event name, data)`` of each event of an SSE body; ``[DONE]`` would fail here."""
    events, name = [], None
    for line in response.iter_lines():
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            events.append((name, json.loads(line[6:])))
            name = None
    return events


def test_a_whole_response_as_the_sdk_reads_it(client: OpenAI) -> None:
    response = client.responses.create(
        model="synthetic", input="red green blue", instructions="be brief", max_output_tokens=5
    )
    assert response.object == "response" and response.id.startswith("resp_")
    assert response.output_text == "red green blue red green "
    assert response.status == "incomplete"  # the synthetic engine stops only at the limit
    assert response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens"
    (message,) = response.output
    assert message.type == "message" and message.role == "assistant"
    assert response.usage is not None
    assert (response.usage.input_tokens, response.usage.output_tokens) == (5, 5)
    assert response.usage.total_tokens == 10
    assert (response.instructions, response.max_output_tokens, response.store) == (
        "be brief",
        5,
        False,
    )


def test_a_stream_of_events_as_the_sdk_reads_it(client: OpenAI) -> None:
    stream = client.responses.create(
        model="synthetic",
        input=[{"role": "user", "content": [{"type": "input_text", "text": "à 日本 😀"}]}],
        max_output_tokens=12,
        stream=True,
    )
    events = list(stream)
    kinds = [e.type for e in events]
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[4 : 4 + len(deltas)] == ["response.output_text.delta"] * len(deltas)
    assert kinds[4 + len(deltas) :] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.incomplete",
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(d.delta for d in deltas)
    final = events[-1].response  # type: ignore[union-attr]
    assert final.output_text == text and final.usage.output_tokens == 12
    whole = client.responses.create(model="synthetic", input="à 日本 😀", max_output_tokens=12)
    assert whole.output_text == text


def test_sse_events_are_named_by_type_with_no_done_and_coalesced(start_server) -> None:  # type: ignore[no-untyped-def]
    # Coalesced by count alone: the first text at once, then 5 tokens to an event.
    server: RunningServer = start_server(SyntheticEngine(), flush_tokens=5, flush_ms=60_000)
    body = {"input": "a b c", "max_output_tokens": 20, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/responses", json=body) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["x-stream-id"]
        raw = r.read().decode()
    assert "[DONE]" not in raw and "\nid: " not in raw
    events = sse_events(httpx.Response(200, content=raw.encode()))
    assert all(name == data["type"] for name, data in events)
    deltas = [d["delta"] for name, d in events if name == "response.output_text.delta"]
    sizes = [len(d.split()) for d in deltas]
    assert len(sizes) < 20 and sizes[1:-1] == [5] * (len(sizes) - 2), sizes
    assert "".join(deltas).split() == ["a", "b", "c"] * 6 + ["a", "b"]


def test_ndjson_by_accept(synthetic_server: RunningServer) -> None:
    body = {"input": "x", "max_output_tokens": 3, "stream": True}
    r = httpx.post(
        f"{synthetic_server.url}/v1/responses",
        json=body,
        headers={"Accept": "application/x-ndjson"},
    )
    lines = [json.loads(line) for line in r.text.splitlines() if line]
    assert lines[0]["type"] == "response.created" and lines[-1]["type"] == "response.incomplete"


@pytest.mark.parametrize(
    ("asked", "param"),
    [
        ({"previous_response_id": "resp_1"}, "previous_response_id"),
        ({"store": True}, "store"),
        ({"extra_body": {"frequency_penalty": 1}}, "frequency_penalty"),
        ({"tools": [{"type": "web_search"}]}, "tools"),
        ({"max_output_tokens": 1_000_000}, "max_output_tokens"),
        ({"text": {"format": {"type": "json_object"}}}, "text.format"),
        # Chat's names, sent here by mistake, are named as sent (not renamed as an error of
        # the chat request a Responses request becomes).
        ({"extra_body": {"max_completion_tokens": 3}}, "max_completion_tokens"),
        ({"extra_body": {"response_format": {"type": "json_object"}}}, "response_format"),
        ({"extra_body": {"messages": [{"role": "user", "content": "x"}]}}, "messages"),
    ],
)
def test_what_is_not_served_is_a_400_naming_the_field(
    client: OpenAI, asked: dict, param: str
) -> None:
    with pytest.raises(BadRequestError) as caught:
        client.responses.create(model="synthetic", input="x", **asked)
    assert caught.value.body["param"] == param  # type: ignore[index]


def test_fields_the_sdk_sends_that_chat_accepts_are_accepted(client: OpenAI) -> None:
    """prompt_cache_key, safety_identifier, service_tier and stream_options were 400s."""
    stream = client.responses.create(
        model="synthetic",
        input="red green",
        max_output_tokens=3,
        prompt_cache_key="k",
        safety_identifier="u",
        service_tier="auto",
        stream=True,
        stream_options={"include_obfuscation": False},
    )
    assert [e.type for e in stream][-1] == "response.incomplete"


def test_metadata_is_echoed_in_the_response_whole_and_streamed(client: OpenAI) -> None:
    """OpenAI's response object carries the request's metadata back (vLLM echoes it too):
    it was a 400, though an answer can carry it without anything stored."""
    tags = {"session": "s-1", "lang": "en"}
    whole = client.responses.create(model="synthetic", input="x", max_output_tokens=2,
                                    metadata=tags)  # fmt: skip
    assert whole.metadata == tags
    stream = client.responses.create(
        model="synthetic", input="x", max_output_tokens=2, metadata=tags, stream=True
    )
    echoed = [e.response.metadata for e in stream if hasattr(e, "response")]
    assert echoed and all(m == tags for m in echoed), echoed
    plain = client.responses.create(model="synthetic", input="x", max_output_tokens=2)
    assert plain.metadata == {}


@pytest.mark.parametrize(
    ("asked", "param", "why"),
    [
        ({"service_tier": "flex"}, "service_tier", "every request is served alike"),
        (
            {"stream": True, "stream_options": {"include_obfuscation": True}},
            "stream_options.include_obfuscation",
            "no obfuscation padding",
        ),
        ({"stream_options": {"flush_ms": 5}}, "stream_options", "with stream: true"),
    ],
)
def test_values_of_those_fields_not_served_are_a_400_saying_why(
    synthetic_server: RunningServer, asked: dict, param: str, why: str
) -> None:
    r = httpx.post(f"{synthetic_server.url}/v1/responses", json={"input": "q", **asked})
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["param"] == param and why in error["message"]


def test_a_function_call_output_must_answer_a_call(synthetic_server: RunningServer) -> None:
    body = {
        "input": [
            {"role": "user", "content": "q"},
            {"type": "function_call_output", "call_id": "c9", "output": "1"},
        ]
    }
    r = httpx.post(f"{synthetic_server.url}/v1/responses", json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == "input[1].call_id"


@pytest.mark.parametrize("by", ["stream", "response"])
def test_cancel_by_id_ends_the_response_as_cancelled(start_server, by: str) -> None:  # type: ignore[no-untyped-def]
    """Cancelled by its stream's id (``X-Stream-Id``) or by its response's (``resp_<stream
    id>``, what a Responses client has: that was a 404)."""
    server: RunningServer = start_server(SyntheticEngine(itl_ms=10))
    body = {"input": "go", "max_output_tokens": 3000, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/responses", json=body) as r:
        stream_id = r.headers["x-stream-id"]
        cancel_id = stream_id if by == "stream" else f"resp_{stream_id}"
        lines = r.iter_lines()
        for line in lines:
            if line == "event: response.output_text.delta":
                cancel = httpx.post(f"{server.url}/v1/streams/{cancel_id}/cancel")
                assert cancel.status_code == 200
                break
        rest = [json.loads(line[6:]) for line in lines if line.startswith("data: ")]
    end = rest[-1]
    assert end["type"] == "response.incomplete" and end["response"]["status"] == "cancelled"
    assert end["response"]["id"] == f"resp_{stream_id}"
    assert server.metric("tokenspout_generation_tokens_total") < 3000
    # An unknown one is a 404 naming the id that was sent, not the id tried without resp_.
    missing = httpx.post(f"{server.url}/v1/streams/resp_nope/cancel")
    assert missing.status_code == 404 and "'resp_nope'" in missing.json()["error"]["message"]


def test_heartbeats_while_the_first_token_is_pending(start_server) -> None:  # type: ignore[no-untyped-def]
    server: RunningServer = start_server(SyntheticEngine(ttft_ms=60_000), heartbeat_interval_s=0.05)
    body = {"input": "slow", "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/responses", json=body, timeout=10) as r:
        seen = []
        for line in r.iter_lines():
            seen.append(line)
            if line == ": ping":
                break
    assert "event: response.in_progress" in seen


@pytest.mark.usefixtures("unencodable_output")
def test_a_failure_after_the_start_is_an_error_event_and_a_clean_end(start_server) -> None:  # type: ignore[no-untyped-def]
    server: RunningServer = start_server(SyntheticEngine(itl_ms=1))
    body = '{"input": "hi \\ud800 there", "max_output_tokens": 5, "stream": true}'
    headers = {"content-type": "application/json"}
    with httpx.stream(
        "POST", f"{server.url}/v1/responses", content=body, headers=headers, timeout=10
    ) as r:
        events = sse_events(r)
    name, error = events[-1]
    assert name == "error" and error["code"] == "internal_error"
    assert error["sequence_number"] == len(events) - 1
    server.wait_metric("tokenspout_requests_aborted_total", 1, labels='reason="error"')


def test_a_responses_stream_takes_no_second_reader(start_server) -> None:  # type: ignore[no-untyped-def]
    """Its sequence numbers are one reader's: not resumable, even on a --resumable server."""
    server: RunningServer = start_server(SyntheticEngine(itl_ms=10), resumable=True)
    body = {"input": "go", "max_output_tokens": 3000, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/responses", json=body) as r:
        stream_id = r.headers["x-stream-id"]
        resume = httpx.get(f"{server.url}/v1/streams/{stream_id}")
        assert resume.status_code == 409
        error = resume.json()["error"]
        assert error["code"] == "stream_not_resumable"
        # It advised stream_options.resumable or --resumable: neither can make it resumable.
        assert "Responses API stream, which is never resumable" in error["message"]
        assert '"resumable": true' not in error["message"]


def test_the_api_schema_lists_the_route(synthetic_server: RunningServer) -> None:
    schema = httpx.get(f"{synthetic_server.url}/openapi.json").json()
    operation = schema["paths"]["/v1/responses"]["post"]
    ref = operation["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    assert ref.endswith("/ResponsesRequest")
    fields = schema["components"]["schemas"]["ResponsesRequest"]["properties"]
    assert {"input", "instructions", "max_output_tokens", "tools", "text"} <= set(fields)
    assert "text/event-stream" in operation["responses"]["200"]["content"]


def test_an_earlier_answers_reasoning_sent_back_is_not_rendered(client: OpenAI) -> None:
    """A ``reasoning`` item (an earlier answer's, as its ``output`` is sent back) was a 400;
    it is accepted and, as chat's reasoning, left out of the prompt."""
    text = [{"type": "reasoning_text", "text": "many words of thought"}]
    thought = {"type": "reasoning", "id": "rs_1", "summary": [], "content": text}
    turns = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
             {"role": "user", "content": "red green"}]  # fmt: skip
    plain = client.responses.create(model="synthetic", input=turns, max_output_tokens=3)
    with_it = client.responses.create(
        model="synthetic", input=[turns[0], thought, *turns[1:]], max_output_tokens=3
    )
    assert with_it.output_text == plain.output_text
    assert with_it.usage is not None and plain.usage is not None
    assert with_it.usage.input_tokens == plain.usage.input_tokens
    with pytest.raises(BadRequestError, match="must be followed by") as caught:
        client.responses.create(model="synthetic", input=[turns[0], thought])
    assert caught.value.body["param"] == "input[1]"  # type: ignore[index]
