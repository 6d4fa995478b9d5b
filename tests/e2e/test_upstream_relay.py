"""tokenspout in front of other servers (``--engine upstream``): the openai SDK through it,
models and routing, fields passed through, tool calls, the upstream's key, usage.

Upstreams are real processes: a synthetic ``tokenspout serve`` and the fault-injecting
upstream (``tests/upstream_faults.py``), here answering normally."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
from collections.abc import Callable, Iterator

import httpx
import pytest
from openai import NotFoundError, OpenAI
from websockets.sync.client import connect

from tests.conftest import RunningServer
from tests.upstream_faults import INTERLEAVED
from tests.upstream_processes import UpstreamProcess, faulty, front, processes, tokenspout
from tokenspout.client.bench import BenchConfig, discover_model
from tokenspout.engine.interface import SYNTHETIC_OWNER
from tokenspout.engine.synthetic_engine import SyntheticEngine


@pytest.fixture(scope="module")
def upstreams() -> Iterator[list[UpstreamProcess]]:
    with processes(lambda: tokenspout("--engine", "synthetic"), faulty) as started:
        yield started


@pytest.fixture
def synthetic(upstreams: list[UpstreamProcess]) -> UpstreamProcess:
    return upstreams[0]


@pytest.fixture
def fault(upstreams: list[UpstreamProcess]) -> UpstreamProcess:
    upstreams[1].fault("none")
    return upstreams[1]


def sdk(server: RunningServer) -> OpenAI:
    return OpenAI(base_url=f"{server.url}/v1", api_key="client-key", max_retries=0)


def test_openai_sdk_streams_through_tokenspout(
    start_server: Callable[..., RunningServer], synthetic: UpstreamProcess
) -> None:
    server = front(start_server, synthetic)
    client = sdk(server)
    asked = {"model": "synthetic", "messages": [{"role": "user", "content": "red green blue"}]}
    chunks = list(
        client.chat.completions.create(
            **asked, max_tokens=9, stream=True, stream_options={"include_usage": True}
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    direct = OpenAI(base_url=synthetic.base, api_key="x").chat.completions.create(
        **asked, max_tokens=9
    )
    assert text == direct.choices[0].message.content == "red green blue " * 3
    assert chunks[-1].usage is not None
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (3, 9)
    whole = client.completions.create(model="synthetic", prompt="a b ", max_tokens=5)
    assert whole.choices[0].text == "a b a b a "
    assert whole.usage is not None and whole.usage.completion_tokens == 5


def test_models_come_from_the_upstreams_and_route_requests(
    start_server: Callable[..., RunningServer], upstreams: list[UpstreamProcess]
) -> None:
    server = front(start_server, *upstreams)
    client = sdk(server)
    assert [m.id for m in client.models.list()] == ["synthetic"]
    with pytest.raises(NotFoundError, match="not served here"):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    health = httpx.get(f"{server.url}/health")
    assert health.status_code == 200 and health.json()["engine"] == "upstream"


def test_a_synthetic_upstream_is_labelled_synthetic_here_too(
    start_server: Callable[..., RunningServer], upstreams: list[UpstreamProcess]
) -> None:
    # Through the relay, /v1/models said "tokenspout": bench took the synthetic engine's
    # figures for a model's, and the page showed no label.
    synthetic, other = upstreams
    for behind, expected in (((synthetic,), True), ((other,), False), ((synthetic, other), True)):
        server = front(start_server, *behind)
        owners = {m["owned_by"] for m in httpx.get(f"{server.url}/v1/models").json()["data"]}
        assert owners == {SYNTHETIC_OWNER if expected else "tokenspout"}, behind
        health = httpx.get(f"{server.url}/health").json()
        assert health["synthetic"] is expected
        # /metrics said engine="upstream",model="upstream" for good: set before the
        # upstreams' models were read.
        labels = f'engine="upstream",model="{health["model"]}",synthetic="{str(expected).lower()}"'
        assert server.metric("tokenspout_engine_info", labels) == 1
        config = asyncio.run(discover_model(BenchConfig(url=server.url)))
        assert config.synthetic is expected


def test_models_report_the_upstreams_context_length_or_none(
    start_server: Callable[..., RunningServer], synthetic: UpstreamProcess
) -> None:
    """Each upstream model's max_model_len is what its upstream says (vLLM's own field,
    llama.cpp's ``meta.n_ctx_train``, another tokenspout's); a model whose entry says
    nothing has no max_model_len rather than an invented one."""
    entries = [
        {"id": "vllm-like", "max_model_len": 4096},
        {"id": "llama-like", "meta": {"n_vocab": 49152, "n_ctx_train": 8192}},
        {"id": "plain", "owned_by": "someone"},
    ]
    with processes(lambda: faulty("--models", json.dumps(entries))) as (upstream,):
        server = front(start_server, upstream, synthetic)
        r = httpx.get(f"{server.url}/v1/models")
    listed = {m["id"]: m for m in r.json()["data"]}
    assert sorted(listed) == ["llama-like", "plain", "synthetic", "vllm-like"]
    assert listed["vllm-like"]["max_model_len"] == 4096
    assert listed["llama-like"]["max_model_len"] == 8192
    assert "max_model_len" not in listed["plain"]
    assert listed["synthetic"]["max_model_len"] == 1_000_000  # the synthetic engine's


def test_fields_pass_through_and_the_upstream_always_streams(
    start_server: Callable[..., RunningServer], fault: UpstreamProcess
) -> None:
    server = front(start_server, fault, api_key="upstream-secret")
    body = {
        "model": "synthetic",
        "messages": [{"role": "user", "content": "x y", "name": "ada"}],
        "max_tokens": 4,
        "temperature": 0.3,
        "seed": 7,
        "stop": ["zzz"],
        "min_tokens": 2,  # vendor extensions tokenspout does not know: kept for the upstream
        "chat_template_kwargs": {"enable_thinking": False},
        "top_k": 5,
    }
    r = httpx.post(
        f"{server.url}/v1/chat/completions",
        json=body,
        headers={"Authorization": "Bearer client-key"},
    )
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "x y x y "
    sent = fault.stats()
    expected = {k: v for k, v in body.items()}
    expected.update(stream=True, stream_options={"include_usage": True})
    assert sent["body"] == expected
    assert sent["headers"]["authorization"] == "Bearer upstream-secret"
    metrics = httpx.get(f"{server.url}/metrics").text
    assert "upstream-secret" not in metrics
    assert f'tokenspout_upstream_requests_total{{status="200",upstream="{fault.base}"}}' in metrics


def test_a_max_tokens_left_out_is_left_out_upstream_and_ours_ends_the_answer(
    start_server: Callable[..., RunningServer], fault: UpstreamProcess
) -> None:
    server = front(start_server, fault, config={"default_max_tokens": 3})
    body = {"model": "synthetic", "messages": [{"role": "user", "content": "a b c d"}]}
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["choices"][0]["finish_reason"] == "length"
    assert answer["usage"]["completion_tokens"] == 3
    assert answer["choices"][0]["message"]["content"] == "a b c "
    assert "max_tokens" not in fault.stats()["body"]


@pytest.mark.parametrize("streamed", [True, False], ids=["streamed", "whole"])
def test_a_max_tokens_the_upstream_ignores_still_ends_the_answer(
    start_server: Callable[..., RunningServer], fault: UpstreamProcess, streamed: bool
) -> None:
    """An upstream that goes on past the max_tokens it was sent (it ignores the field) is
    ended at it here, as one that was not sent it is: finish length, the usage of what the
    client has, the upstream's response closed (it stops generating)."""
    fault.fault("ignoremax")
    server = front(start_server, fault)
    user = f"ignoremax-{streamed}"
    body = {"model": "synthetic", "messages": [{"role": "user", "content": "a b c d"}],
            "max_tokens": 10, "user": user}  # fmt: skip
    text, finish, usage = _chat_answer(server, body, streamed)
    assert fault.stats()["body"]["max_tokens"] == 10
    assert text == "a b c d " * 2 + "a b "
    assert finish == "length" and usage["completion_tokens"] == 10
    fault.wait_abandoned(user)


def test_our_max_tokens_is_not_overshot_by_an_upstream_that_coalesces(
    start_server: Callable[..., RunningServer],
) -> None:
    """An upstream that sends 4 tokens a chunk (after its first token, sent alone): the
    default max_tokens 11 was checked only after a whole chunk, and the answer had 13 tokens.
    It ends before the chunk that would go past 11 (its text cannot be cut between its
    tokens): 9 tokens, text and usage agreeing."""
    flags = ("--engine", "synthetic", "--synthetic-itl-ms", "10", "--flush-tokens", "4",
             "--flush-ms", "10000")  # fmt: skip
    with processes(lambda: tokenspout(*flags)) as (upstream,):
        server = front(start_server, upstream, config={"default_max_tokens": 11})
        body = {"model": "synthetic", "prompt": "one two three ", "stream": True,
                "stream_options": {"include_usage": True, "flush_tokens": 1}}  # fmt: skip
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body) as r:
            lines = list(r.iter_lines())
    chunks = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    usage = chunks[-1]["usage"]
    finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1]
    positions = [line.rsplit(":", 1)[1] for line in lines if line.startswith("id: ")]
    # The synthetic engine's tokens are words: the text is the tokens counted.
    assert finish == "length"
    assert usage["completion_tokens"] == len(text.split()) <= 11
    assert text.split() == ("one two three " * 4).split()[: usage["completion_tokens"]]
    assert positions[-1].split(".")[0] == str(usage["completion_tokens"]), positions


@pytest.mark.parametrize("max_tokens", [None, 12])
def test_tokens_an_upstream_counts_beyond_its_logprobs_count_toward_max_tokens(
    start_server: Callable[..., RunningServer], fault: UpstreamProcess, max_tokens: int | None
) -> None:
    """llama.cpp sends a character of several tokens as one chunk with one logprobs entry,
    its ``timings.predicted_n`` counting them all. The relay counted a token per logprob:
    the default max_tokens let 3x as many tokens through, and the usage said a third."""
    fault.fault("pieces", pieces=3)
    server = front(start_server, fault, config={"default_max_tokens": 12})
    body = {"model": "synthetic", "prompt": "one two three ", "logprobs": 1, "stream": True,
            "stream_options": {"include_usage": True}, "max_tokens": max_tokens}  # fmt: skip
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1]
    assert finish == "length" and text == "one two three one "
    assert chunks[-1]["usage"]["completion_tokens"] == 12


def test_a_long_prompt_without_max_tokens_gets_the_contexts_room_as_directly(
    start_server: Callable[..., RunningServer],
) -> None:
    # The front cannot count the prompt's tokens: it used to send its default max_tokens
    # (512), and the upstream refused prompt + 512 as longer than its context.
    with processes(lambda: tokenspout("--engine", "synthetic", "--max-model-len", "1024")) as (
        upstream,
    ):
        words = " ".join(["alpha"] * 900)
        body = {"model": "synthetic", "messages": [{"role": "user", "content": words}]}
        direct = httpx.post(f"{upstream.base}/chat/completions", json=body, timeout=60)
        assert direct.status_code == 200, direct.text
        server = front(start_server, upstream)
        relayed = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)
        assert relayed.status_code == 200, relayed.text
        assert relayed.json()["usage"] == direct.json()["usage"]
        assert relayed.json()["usage"]["completion_tokens"] < 512  # the room, not the default


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_the_seed_endpoints_fields_reach_the_upstream(
    start_server: Callable[..., RunningServer], fault: UpstreamProcess, method: str
) -> None:
    """Every field of ``/v1/completions/stream`` that is the upstream's goes to it (the
    others, ``chat`` and ``stream_options``, are tokenspout's own)."""
    server = front(start_server, fault)
    given = {"prompt": "x y", "model": "synthetic", "max_tokens": 3, "temperature": 0, "seed": 7}
    url = f"{server.url}/v1/completions/stream"
    if method == "GET":
        r = httpx.get(url, params={**given, "flush_tokens": 1})
    else:
        r = httpx.post(url, json={**given, "stream_options": {"flush_tokens": 1}})
    assert r.status_code == 200, r.text
    expected = {**given, "stream": True, "stream_options": {"include_usage": True}}
    assert fault.stats()["body"] == expected


@pytest.mark.parametrize("stream", [False, True])
def test_a_content_filter_finish_passes_through(
    start_server: Callable[..., RunningServer], fault: UpstreamProcess, stream: bool
) -> None:
    """A filtered answer must not look like one that ended normally."""
    fault.fault("filtered")
    server = front(start_server, fault)
    body = {"model": "synthetic", "messages": [{"role": "user", "content": "x y"}],
            "max_tokens": 4, "stream": stream}  # fmt: skip
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    if stream:
        chunks = [json.loads(line[6:]) for line in r.text.splitlines() if line[6:7] == "{"]
        reasons = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
        assert reasons[-1] == "content_filter"
    else:
        assert r.json()["choices"][0]["finish_reason"] == "content_filter"


IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
AUDIO = {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}
FILE = {"type": "file", "file": {"file_data": "data:,", "filename": "a"}}
#: A vision model's conversation: parts of every type, fields tokenspout does not read.
SEEN = [
    {"role": "system", "content": [{"type": "text", "text": "Be brief.", "x_hint": 1}]},
    {"role": "user", "content": [{"type": "text", "text": "x"}, {"type": "text", "text": "y"},
                                 IMAGE], "x_vendor": {"k": [1, 2]}},
    {"role": "user", "content": [{"type": "text", "text": "z"}, AUDIO, FILE]},
]  # fmt: skip


def test_messages_reach_the_upstream_as_sent(
    start_server: Callable[..., RunningServer], fault: UpstreamProcess
) -> None:
    """tokenspout can front a vision model: content parts of any type and message fields
    it does not know go upstream as the client sent them (text parts were joined into one
    string, other parts and fields refused)."""
    server = front(start_server, fault)
    body = {"model": "synthetic", "messages": SEEN, "max_tokens": 4}
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    assert fault.stats()["body"]["messages"] == SEEN
    # An assistant message sent back as returned: its reasoning, refusal and annotations.
    returned = {"role": "assistant", "content": None, "refusal": "I can't.", "annotations": [],
                "reasoning_content": "Hm.", "reasoning": "Hm."}  # fmt: skip
    conversation = [*SEEN, returned, {"role": "user", "content": "w"}]
    r = httpx.post(f"{server.url}/v1/chat/completions", json={**body, "messages": conversation})
    assert r.status_code == 200, r.text
    del returned["content"]  # a null is a field not given
    assert fault.stats()["body"]["messages"] == conversation


def test_the_embedded_mode_still_refuses_unknown_fields(synthetic_server: RunningServer) -> None:
    body = {"messages": [{"role": "user", "content": "x"}], "min_tokens": 2}
    r = httpx.post(f"{synthetic_server.url}/v1/chat/completions", json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == "min_tokens"
    for message in SEEN:
        body = {"messages": [message]}
        r = httpx.post(f"{synthetic_server.url}/v1/chat/completions", json=body)
        assert r.status_code == 400 and r.json()["error"]["param"].startswith("messages"), r.text


def test_streamed_tool_call_reaches_the_sdk_intact(
    start_server: Callable[..., RunningServer], fault: UpstreamProcess
) -> None:
    fault.fault("tools")
    client = sdk(front(start_server, fault))
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ]
    stream = client.chat.completions.create(
        model="synthetic",
        messages=[{"role": "user", "content": "weather in Paris?"}],
        tools=tools,  # type: ignore[arg-type]
        tool_choice="auto",
        stream=True,
        stream_options={"flush_tokens": 1},  # type: ignore[typeddict-unknown-key]
    )
    calls: dict[int, dict[str, str]] = {}
    finish = None
    for chunk in stream:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        finish = choice.finish_reason or finish
        for d in choice.delta.tool_calls or ():
            call = calls.setdefault(d.index, {"id": "", "name": "", "arguments": ""})
            call["id"] = d.id or call["id"]
            call["name"] = (d.function and d.function.name) or call["name"]
            call["arguments"] += (d.function and d.function.arguments) or ""
    assert calls == {0: {"id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'}}
    assert finish == "tool_calls"
    assert fault.stats()["body"]["tools"] == tools
    whole = client.chat.completions.create(
        model="synthetic",
        messages=[{"role": "user", "content": "weather?"}],
        tools=tools,  # type: ignore[arg-type]
    )
    call = whole.choices[0].message.tool_calls[0]  # type: ignore[index]
    assert (call.function.name, call.function.arguments) == ("get_weather", '{"city": "Paris"}')


@pytest.mark.parametrize("kind", ["noindex", "noid"])
def test_tool_calls_streamed_without_their_index_reach_the_client_whole(
    start_server: Callable[..., RunningServer], fault: UpstreamProcess, kind: str
) -> None:
    """Gemini's OpenAI-compatible API and some proxies leave a tool call's ``index`` out:
    a piece with a new id (or name) begins the next call, one without goes on with the
    last. A call the upstream gave no id gets one, and its first delta has its name: that
    delta was sent without name or type (a name was only sent beside an id)."""
    fault.fault(kind)
    server = front(start_server, fault)
    body = {"model": "synthetic", "messages": [{"role": "user", "content": "weather?"}]}
    asked = {**body, "stream": True, "stream_options": {"flush_tokens": 1}}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=asked) as r:
        assert r.status_code == 200
        lines = [line[6:] for line in r.iter_lines() if line.startswith("data: {")]
    calls: dict[int, dict[str, str]] = {}
    for line in lines:
        for d in json.loads(line)["choices"][0]["delta"].get("tool_calls") or ():
            if d["index"] not in calls:  # a call's first delta: OpenAI's id, type and name
                assert d["type"] == "function" and d["function"]["name"], d
                calls[d["index"]] = {"id": d["id"], "name": d["function"]["name"], "arguments": ""}
            else:
                assert "id" not in d and "name" not in d["function"], d
            calls[d["index"]]["arguments"] += d["function"]["arguments"]
    expected = [("call_1", "get_weather", '{"city": "Paris"}'), ("call_2", "get_time", "{}")]

    def named(got: list[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
        """The ids as expected where the upstream gave none: made up, one per call."""
        if kind == "noid":
            ids = [i for i, _, _ in got]
            assert all(i.startswith("call_") for i in ids) and len(set(ids)) == 2, ids
            return [(f"call_{n}", *rest) for n, (_, *rest) in enumerate(got, 1)]  # type: ignore[misc]
        return got

    streamed = [(c["id"], c["name"], c["arguments"]) for _, c in sorted(calls.items())]
    assert named(streamed) == expected
    whole = httpx.post(f"{server.url}/v1/chat/completions", json=body)
    assert whole.status_code == 200, whole.text
    choice = whole.json()["choices"][0]
    got = [(c["id"], c["function"]["name"], c["function"]["arguments"])
           for c in choice["message"]["tool_calls"]]  # fmt: skip
    assert named(got) == expected and choice["finish_reason"] == "tool_calls"


@pytest.mark.parametrize("streamed", [True, False], ids=["streamed", "whole"])
def test_an_upstreams_unusable_usage_is_taken_as_none_not_as_a_failure(
    start_server: Callable[..., RunningServer], fault: UpstreamProcess, streamed: bool
) -> None:
    """A usage with null counts in the finish chunk and ``usage: {}`` after it: the answer
    is whole, counted here as for an upstream that sends no usage."""
    fault.fault("badusage")
    server = front(start_server, fault, retries=0)
    body = {"model": "synthetic", "messages": [{"role": "user", "content": "a b c"}],
            "max_tokens": 5}  # fmt: skip
    text, finish, usage = _chat_answer(server, body, streamed)
    assert (text, finish) == ("a b c a b ", "length")
    assert usage["completion_tokens"] == 5


def test_responses_api_through_tokenspout_is_a_chat_request_upstream(
    start_server: Callable[..., RunningServer],
    synthetic: UpstreamProcess,
    fault: UpstreamProcess,
) -> None:
    """/v1/responses in front of an upstream: the upstream is sent the chat completion the
    request asks for (chat's tools, no Responses fields), and its call comes back as a
    function_call item."""
    direct = OpenAI(base_url=synthetic.base, api_key="x").responses.create(
        model="synthetic", input="red green blue", max_output_tokens=7
    )
    relayed = sdk(front(start_server, synthetic)).responses.create(
        model="synthetic", input="red green blue", max_output_tokens=7
    )
    assert relayed.output_text == direct.output_text == "red green blue red green blue red "
    fault.fault("tools")
    weather = {"type": "object", "properties": {"city": {"type": "string"}}}
    stream = sdk(front(start_server, fault)).responses.create(
        model="synthetic",
        input="weather in Paris?",
        tools=[{"type": "function", "name": "get_weather", "parameters": weather, "strict": True}],
        store=False,
        stream=True,
    )
    events = list(stream)
    added = next(e for e in events if e.type == "response.output_item.added")
    assert (added.item.type, added.item.name) == ("function_call", "get_weather")  # type: ignore[union-attr]
    pieces = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
    assert "".join(pieces) == '{"city": "Paris"}'
    final = events[-1]
    assert final.type == "response.completed"
    (call,) = final.response.output
    assert call.type == "function_call" and call.call_id == "call_1"
    sent = fault.stats()["body"]
    assert sent["tools"] == [
        {
            "type": "function",
            "function": {"name": "get_weather", "parameters": weather, "strict": True},
        }
    ]
    assert "messages" in sent and not {"input", "store", "max_output_tokens"} & set(sent)


@pytest.mark.parametrize("streamed", [False, True], ids=["whole", "streamed"])
def test_an_upstreams_refusal_of_a_responses_request_names_the_responses_fields(
    start_server: Callable[..., RunningServer], streamed: bool
) -> None:
    """The upstream refuses the chat request a Responses request became, naming chat's
    fields (messages, max_completion_tokens): the client, which sent neither, is told
    input and max_output_tokens, as the embedded engine tells it."""
    inner = start_server(SyntheticEngine(max_model_len=16))
    server = front(start_server, f"{inner.url}/v1")
    for body, param in (
        ({"input": "a " * 40}, "input"),
        ({"input": "a b c", "max_output_tokens": 15}, "max_output_tokens"),
    ):
        asked = {"model": "synthetic", **body} | ({"stream": True} if streamed else {})
        r = httpx.post(f"{server.url}/v1/responses", json=asked)
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == param, error
        assert "messages" not in error["message"], error
        assert "max_completion_tokens" not in error["message"], error


def test_n_choices_are_requests_of_their_own_upstream(
    start_server: Callable[..., RunningServer], fault: UpstreamProcess
) -> None:
    server = front(start_server, fault)
    body = {"model": "synthetic", "prompt": "p q ", "max_tokens": 2, "n": 2, "seed": 5}
    r = httpx.post(f"{server.url}/v1/completions", json=body)
    assert r.status_code == 200, r.text
    assert [c["text"] for c in r.json()["choices"]] == ["p q ", "p q "]
    sent = fault.stats()
    assert sent["received"] >= 2 and "n" not in sent["body"]
    assert sent["body"]["seed"] in (5, 6)


def test_usage_along_the_stream_and_the_request_log_have_the_upstreams_prompt_tokens(
    start_server: Callable[..., RunningServer],
    synthetic: UpstreamProcess,
    caplog,  # type: ignore[no-untyped-def]
) -> None:
    body = {"model": "synthetic", "messages": [{"role": "user", "content": "hi there"}],
            "max_tokens": 5, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}  # fmt: skip
    server = front(start_server, synthetic)
    with (
        caplog.at_level(logging.INFO, logger="tokenspout.requests"),
        httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body) as r,
    ):
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    texts = [c for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content")]
    usages = [c["usage"] for c in texts]
    assert usages and all(u["prompt_tokens"] == 2 for u in usages), usages
    logged = [json.loads(r.getMessage()) for r in caplog.records if r.name == "tokenspout.requests"]
    assert [line["prompt_tokens"] for line in logged] == [2]


@pytest.mark.parametrize("streamed", [False, True], ids=["whole", "streamed"])
def test_n_choices_report_the_upstreams_prompt_tokens_once(
    start_server: Callable[..., RunningServer], synthetic: UpstreamProcess, streamed: bool
) -> None:
    """The front never tokenizes: the prompt's tokens are the upstream's usage, counted
    once for all choices, as the upstream itself reports them."""
    body = {"model": "synthetic", "messages": [{"role": "user", "content": "hi there"}],
            "max_tokens": 5, "n": 2}  # fmt: skip
    direct = httpx.post(f"{synthetic.base}/chat/completions", json=body).json()["usage"]
    assert (direct["prompt_tokens"], direct["completion_tokens"]) == (2, 10)
    url = f"{front(start_server, synthetic).url}/v1/chat/completions"
    if streamed:
        body.update(stream=True, stream_options={"include_usage": True})
        with httpx.stream("POST", url, json=body) as r:
            lines = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
        assert lines[-1] == "[DONE]"
        usage = json.loads(lines[-2])["usage"]
    else:
        r = httpx.post(url, json=body)
        assert r.status_code == 200, r.text
        usage = r.json()["usage"]
    assert usage == direct


def test_echo_with_logprobs_passes_the_prompts_null_logprob_through(
    start_server: Callable[..., RunningServer], fault: UpstreamProcess
) -> None:
    """An echoed prompt's first token has no logprob: the upstream says null, and so does
    the client's answer (as from that upstream directly)."""
    server = front(start_server, fault)
    body = {"model": "synthetic", "prompt": "one two three ", "max_tokens": 2, "echo": True,
            "logprobs": 1}  # fmt: skip
    r = httpx.post(f"{server.url}/v1/completions", json=body)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["text"] == "one two three one two "
    logprobs = choice["logprobs"]
    assert logprobs["tokens"] == ["one ", "two ", "three ", "one ", "two "]
    assert logprobs["token_logprobs"] == [None, -1.0, -1.0, -1.0, -1.0]
    assert logprobs["top_logprobs"][0] is None


def _chat_answer(server: RunningServer, body: dict, streamed: bool) -> tuple[str, str, dict]:
    """A chat answer's text, finish reason and usage, streamed (with the usage) or whole."""
    if streamed:
        asked = {**body, "stream": True, "stream_options": {"include_usage": True}}
        with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=asked) as r:
            assert r.status_code == 200, r.read()
            lines = [line[6:] for line in r.iter_lines() if line.startswith("data: {")]
        chunks = [json.loads(line) for line in lines]
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks[:-1])
        return text, chunks[-2]["choices"][0]["finish_reason"], chunks[-1]["usage"]
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    return choice["message"]["content"], choice["finish_reason"], r.json()["usage"]


def _chat_deltas(lines: list[str]) -> tuple[dict[str, str], list[dict]]:
    """A streamed chat's ``delta`` fields joined (content, reasoning_content, refusal), and
    its chunks."""
    chunks = [json.loads(line) for line in lines if line.startswith("{")]
    joined: dict[str, str] = {}
    for c in chunks:
        for key, value in (c["choices"][0]["delta"] if c["choices"] else {}).items():
            if key != "role" and value:
                joined[key] = joined.get(key, "") + value
    return joined, chunks


def test_a_reasoning_models_reasoning_is_relayed_and_counted(
    start_server: Callable[..., RunningServer], fault: UpstreamProcess, synthetic: UpstreamProcess
) -> None:
    """vLLM's reasoning parsers send ``reasoning_content`` before the answer: it reaches
    the client streamed (SSE and NDJSON: ``delta.reasoning_content``), over WebSocket, and
    whole (``message.reasoning_content``), and its tokens count as generated ones."""
    fault.fault("reasoning")
    server = front(start_server, fault)
    asked = {"model": "synthetic", "messages": [{"role": "user", "content": "x y"}],
             "max_tokens": 8}  # fmt: skip
    answer = httpx.post(
        f"{synthetic.url}/v1/chat/completions", json={**asked, "max_tokens": 5}
    ).json()["choices"][0]["message"]["content"]
    options = {"include_usage": True, "continuous_usage_stats": True}
    body = {**asked, "stream": True, "stream_options": options}
    for accept in ("text/event-stream", "application/x-ndjson"):
        r = httpx.post(f"{server.url}/v1/chat/completions", json=body, headers={"Accept": accept})
        assert r.status_code == 200, r.text
        lines = [line.removeprefix("data: ") for line in r.text.splitlines()]
        joined, chunks = _chat_deltas(lines)
        assert joined == {"reasoning_content": "Let me think.", "content": answer}
        # Each reasoning piece is a token (as each word of the answer): the usage along the
        # stream counts them however the chunks were coalesced.
        said = ""
        for c in chunks[1:-1]:
            delta = c["choices"][0]["delta"]
            said += " " + delta.get("reasoning_content", "") + " " + delta.get("content", "")
            assert c["usage"]["completion_tokens"] == len(said.split())
        assert chunks[-1]["usage"]["completion_tokens"] == 8
    whole = httpx.post(f"{server.url}/v1/chat/completions", json=asked).json()
    assert whole["choices"][0]["message"] == {
        "role": "assistant",
        "content": answer,
        "reasoning_content": "Let me think.",
    }
    assert whole["usage"]["completion_tokens"] == 8
    with connect(f"{server.url.replace('http', 'ws')}/v1/ws") as ws:
        ws.send(json.dumps({"type": "generate", "id": "a", **asked}))
        messages = []
        while not messages or messages[-1]["type"] == "delta":
            messages.append(json.loads(ws.recv()))
    assert "".join(m.get("reasoning_content", "") for m in messages) == "Let me think."
    assert "".join(m.get("text", "") for m in messages) == answer
    assert messages[-1]["usage"]["completion_tokens"] == 8


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "whole"])
def test_a_refusal_is_relayed_not_an_empty_answer(
    start_server: Callable[..., RunningServer], fault: UpstreamProcess, stream: bool
) -> None:
    """OpenAI's ``refusal`` reaches the client (``delta.refusal``; ``message.refusal``
    with content null, as OpenAI answers), its tokens counted."""
    fault.fault("refusal")
    server = front(start_server, fault)
    body = {"model": "synthetic", "messages": [{"role": "user", "content": "x"}],
            "max_tokens": 9, "stream": stream}  # fmt: skip
    if stream:
        body["stream_options"] = {"include_usage": True}
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    if stream:
        joined, chunks = _chat_deltas([line[6:] for line in r.text.splitlines()])
        assert joined == {"refusal": "I can't help with that."}
        usage = chunks[-1]["usage"]
    else:
        message = r.json()["choices"][0]["message"]
        refused = "I can't help with that."
        assert message == {"role": "assistant", "content": None, "refusal": refused}
        usage = r.json()["usage"]
    assert usage["completion_tokens"] == 3


def test_responses_api_image_input_upstream_is_a_400_saying_where_images_go(
    start_server: Callable[..., RunningServer], synthetic: UpstreamProcess
) -> None:
    """It was pydantic's union dump with param "input", and said nothing of chat."""
    image = {"type": "input_image", "image_url": "https://example.com/a.png"}
    body = {"input": [{"role": "user", "content": [image]}]}
    r = httpx.post(f"{front(start_server, synthetic).url}/v1/responses", json=body)
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["param"] == "input[0].content[0]"
    assert "/v1/chat/completions sends it image_url" in error["message"]


def test_responses_api_streams_interleaved_parallel_calls_each_into_its_own_item(
    start_server: Callable[..., RunningServer], fault: UpstreamProcess
) -> None:
    """An upstream's parallel calls whose pieces interleave by ``index`` (both calls'
    first pieces, then each one's arguments): each piece went to the last call's item, so
    the first call streamed empty arguments and the second both calls' run together. Each
    call's arguments now go to its own item, whose ``.done`` events carry them; the SDK's
    accumulated response (``responses.stream``) and the whole answer agree."""
    fault.fault("interleaved")
    client = sdk(front(start_server, fault))
    expected = [(f"call_{n}", json.dumps({"city": city})) for n, city in enumerate(INTERLEAVED, 1)]
    with client.responses.stream(model="synthetic", input="weather?") as stream:
        events = list(stream)
        final = stream.get_final_response()
    assert [e.sequence_number for e in events] == list(range(len(events)))
    added = {e.item.id: e.output_index for e in events if e.type == "response.output_item.added"}
    deltas: dict[int, str] = {}
    for e in events:
        if e.type == "response.function_call_arguments.delta":
            assert added[e.item_id] == e.output_index
            deltas[e.output_index] = deltas.get(e.output_index, "") + e.delta
    assert [deltas[i] for i in sorted(deltas)] == [a for _, a in expected]
    done = [(e.output_index, e.arguments) for e in events
            if e.type == "response.function_call_arguments.done"]  # fmt: skip
    assert done == list(enumerate(a for _, a in expected))
    items = [e.item for e in events if e.type == "response.output_item.done"]
    assert [(i.call_id, i.arguments) for i in items] == expected  # type: ignore[union-attr]
    completed = events[-1]
    assert completed.type == "response.completed"
    whole = client.responses.create(model="synthetic", input="weather?")
    for response in (final, completed.response, whole):
        calls = [(c.call_id, c.arguments) for c in response.output]  # type: ignore[union-attr]
        assert calls == expected


def test_responses_api_relays_a_reasoning_models_reasoning_as_a_reasoning_item(
    start_server: Callable[..., RunningServer], fault: UpstreamProcess, synthetic: UpstreamProcess
) -> None:
    """/v1/responses dropped an upstream's reasoning. It is now a ``reasoning`` output item
    before the message, streamed with ``response.reasoning_text.delta``, whole and
    streamed alike; sent back as input, it reaches the upstream as the assistant message's
    ``reasoning_content``."""
    fault.fault("reasoning")
    client = sdk(front(start_server, fault))
    asked = {"model": "synthetic", "input": "x y", "max_output_tokens": 8}
    answer = httpx.post(
        f"{synthetic.url}/v1/chat/completions",
        json={"model": "synthetic", "messages": [{"role": "user", "content": "x y"}],
              "max_tokens": 5},
    ).json()["choices"][0]["message"]["content"]  # fmt: skip
    whole = client.responses.create(**asked)  # type: ignore[call-overload]
    thought, message = whole.output
    assert thought.type == "reasoning" and thought.content is not None
    assert [c.text for c in thought.content] == ["Let me think."]
    assert message.type == "message" and whole.output_text == answer
    assert whole.usage is not None and whole.usage.output_tokens == 8
    events = list(client.responses.create(**asked, stream=True))  # type: ignore[call-overload]
    deltas = [e for e in events if e.type == "response.reasoning_text.delta"]
    assert "".join(e.delta for e in deltas) == "Let me think."
    assert {(e.output_index, e.content_index, e.item_id) for e in deltas} == {
        (0, 0, deltas[0].item_id)
    }
    added = [e for e in events if e.type == "response.output_item.added"]
    assert [(e.output_index, e.item.type) for e in added] == [(0, "reasoning"), (1, "message")]
    texts = [e for e in events if e.type == "response.output_text.delta"]
    assert "".join(e.delta for e in texts) == answer and {e.output_index for e in texts} == {1}
    final = events[-1]
    assert final.type == "response.incomplete"  # max_output_tokens: reasoning + answer
    assert [i.type for i in final.response.output] == ["reasoning", "message"]
    assert final.response.output[0].id == deltas[0].item_id
    # The round trip: the answer's output sent back, then the next question.
    fault.fault("none")
    again = [{"role": "user", "content": "x y"},
             *[i.model_dump(exclude_none=True) for i in whole.output],
             {"role": "user", "content": "and?"}]  # fmt: skip
    client.responses.create(model="synthetic", input=again, max_output_tokens=2)
    sent = fault.stats()["body"]["messages"]
    assert sent[1] == {"role": "assistant", "content": answer, "reasoning_content": "Let me think."}


def test_responses_api_relays_a_refusal_as_a_refusal_part(
    start_server: Callable[..., RunningServer], fault: UpstreamProcess
) -> None:
    """/v1/responses made an upstream's refusal an empty answer. It is now the message's
    ``refusal`` part, streamed with ``response.refusal.delta``; the SDK's final response
    (``responses.stream``) and a whole one carry it, and it can be sent back."""
    fault.fault("refusal")
    client = sdk(front(start_server, fault))
    refused = "I can't help with that."
    whole = client.responses.create(model="synthetic", input="x")
    (message,) = whole.output
    assert message.type == "message" and whole.status == "completed"
    assert [(p.type, getattr(p, "refusal", None)) for p in message.content] == [
        ("refusal", refused)
    ]
    assert whole.usage is not None and whole.usage.output_tokens == 3
    streamed = list(client.responses.create(model="synthetic", input="x", stream=True))
    kinds = [e.type for e in streamed]
    assert "response.output_text.delta" not in kinds
    part = next(e for e in streamed if e.type == "response.content_part.added")
    assert part.part.type == "refusal"
    assert "".join(e.delta for e in streamed if e.type == "response.refusal.delta") == refused
    done = next(e for e in streamed if e.type == "response.refusal.done")
    assert done.refusal == refused
    with client.responses.stream(model="synthetic", input="x") as stream:
        final = stream.get_final_response()
    assert final.output[0].type == "message"
    assert final.output[0].content[0].type == "refusal"
    assert final.output[0].content[0].refusal == refused
    fault.fault("none")
    again = [{"role": "user", "content": "x"}, message.model_dump(exclude_none=True),
             {"role": "user", "content": "why?"}]  # fmt: skip
    client.responses.create(model="synthetic", input=again, max_output_tokens=2)
    assert fault.stats()["body"]["messages"][1] == {"role": "assistant", "refusal": refused}


def test_event_ids_count_tokens_behind_an_upstream_that_coalesces(
    start_server: Callable[..., RunningServer], synthetic: UpstreamProcess
) -> None:
    # The synthetic tokenspout upstream sends 5 tokens a chunk (its --flush-tokens): each
    # chunk was one position here, so 50 tokens ended at id ":11.1" and bench, which counts
    # a seed stream's tokens from its ids, reported 22 tokens and 5x their real TPOT.
    server = front(start_server, synthetic)
    url = f"{server.url}/v1/completions/stream"
    seed = httpx.get(url, params={"prompt": "one two", "max_tokens": 50}).text
    ids = [line[4:] for line in seed.splitlines() if line.startswith("id: ")]
    assert ids[-1].endswith(":50.1"), ids[-3:]
    body = {"model": "synthetic", "prompt": "one two", "max_tokens": 12, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body) as r:
        lines = list(r.iter_lines())
    positions = [line.rsplit(":", 1)[1] for line in lines if line.startswith("id: ")]
    texts = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    text = "".join(c["choices"][0]["text"] for c in texts if c["choices"])
    assert text == "one two " * 6 and texts[-1]["usage"]["completion_tokens"] == 12
    assert positions[-1].split(".")[0] == "12", positions


@pytest.mark.parametrize("stop", ["three", "two three"])
def test_event_ids_count_the_last_tokens_when_a_stop_string_took_their_text(
    start_server: Callable[..., RunningServer], synthetic: UpstreamProcess, stop: str
) -> None:
    # The tokens of the stop have no text in any chunk, but the upstream's usage counts
    # them: the ids ended short of completion_tokens (":2.2" for 3 tokens), as they did
    # after an end of text (EOS). The embedded engine counts them, as here now.
    server = front(start_server, synthetic)
    body = {"model": "synthetic", "prompt": "one two three", "max_tokens": 10,
            "stop": [stop], "stream": True,
            "stream_options": {"include_usage": True, "flush_tokens": 1}}  # fmt: skip
    ends = []
    for base in (synthetic.url, server.url):
        with httpx.stream("POST", f"{base}/v1/completions", json=body) as r:
            lines = list(r.iter_lines())
        ids = [line.rsplit(":", 1)[1] for line in lines if line.startswith("id: ")]
        usage = json.loads([line for line in lines if line.startswith("data: {")][-1][6:])
        assert usage["usage"]["completion_tokens"] == 3
        ends.append(ids[-2:])
    assert ends[1] == ends[0] == ["3.1", "3.2"], ends


def test_tokenize_says_the_upstreams_tokenize(
    start_server: Callable[..., RunningServer], synthetic: UpstreamProcess
) -> None:
    server = front(start_server, synthetic)
    r = httpx.post(f"{server.url}/tokenize", json={"messages": [{"role": "user", "content": "a"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    assert "does not tokenize" in r.json()["error"]["message"]
    # An image the upstream could read said the model reads text only, hiding the reason.
    image = {"type": "image_url", "image_url": {"url": "https://x/a.png"}}
    parts = [{"role": "user", "content": [{"type": "text", "text": "a"}, image]}]
    r = httpx.post(f"{server.url}/tokenize", json={"messages": parts})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages", r.text
    assert "does not tokenize" in r.json()["error"]["message"]
    r = httpx.post(f"{server.url}/tokenize", json={"prompt": "a"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text
    r = httpx.post(f"{server.url}/detokenize", json={"tokens": [1, 2]})
    assert r.status_code == 400 and "no tokenizer" in r.json()["error"]["message"]


def test_a_coalescing_tokenspout_upstream_is_asked_for_a_chunk_per_token(
    start_server: Callable[..., RunningServer],
) -> None:
    # It sent 5 tokens a chunk (its default), each chunk's text at the chunk's last position
    # here: the continuation of a stream taken over by another replica is chunked anew, and
    # a reader resuming mid-chunk got text it already had (the request's flush settings:
    # test_upstream_server). This reader asks for an event per token, but one that falls
    # behind (a loaded machine) gets the tokens it missed in one event: each event's id is
    # the count of the tokens it ends at, and no event holds the upstream's 5 (with a token
    # every 20 ms, a reader would have to fall 80 ms behind).
    coalescing = lambda: tokenspout(  # noqa: E731
        "--engine", "synthetic", "--synthetic-itl-ms", "20", "--flush-tokens", "5",
        "--flush-ms", "2000",
    )  # fmt: skip
    with processes(coalescing) as (upstream,):
        server = front(start_server, upstream)
        body = {"model": "synthetic", "prompt": "one two three", "max_tokens": 12,
                "stream": True, "stream_options": {"flush_tokens": 1}}  # fmt: skip
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body) as r:
            lines = list(r.iter_lines())
    events = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    texts = [e["choices"][0]["text"] for e in events if e["choices"] and e["choices"][0]["text"]]
    ids = [line.rsplit(":", 1)[1] for line in lines if line.startswith("id: ")]
    assert "".join(texts) == "one two three " * 4, texts
    ends = list(itertools.accumulate(len(text.split()) for text in texts))
    assert ids[: len(texts)] == [str(end) for end in ends], (ids, texts)
    assert max(len(text.split()) for text in texts) < 5, texts
