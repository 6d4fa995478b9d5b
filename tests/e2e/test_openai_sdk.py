"""The official ``openai`` SDK, unchanged, against a real server (synthetic engine)."""

from __future__ import annotations

import httpx
import pytest
from openai import BadRequestError, NotFoundError, OpenAI

from tests.conftest import RunningServer
from tokenspout.engine.synthetic_engine import SyntheticEngine


@pytest.fixture
def client(synthetic_server: RunningServer) -> OpenAI:
    return OpenAI(base_url=f"{synthetic_server.url}/v1", api_key="unused", max_retries=0)


def test_chat_streams_incrementally_with_usage(client: OpenAI) -> None:
    stream = client.chat.completions.create(
        model="synthetic",
        messages=[
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "red green blue"},
        ],
        max_tokens=20,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    texts = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(texts) > 3, "the answer must arrive in several chunks"
    words = "".join(texts).split()
    assert len(words) == 20 and words[:4] == ["red", "green", "blue", "red"]
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finishes == ["length"]
    usage = chunks[-1].usage
    assert chunks[-1].choices == []
    assert usage is not None and usage.completion_tokens == 20
    assert usage.prompt_tokens == 5  # synthetic counts the words of every message
    assert usage.total_tokens == 25


def test_streamed_equals_non_streamed(client: OpenAI) -> None:
    args = {"model": "synthetic", "messages": [{"role": "user", "content": "à 日本 😀 <b>x</b>"}]}
    whole = client.chat.completions.create(**args, max_tokens=13)
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(**args, max_tokens=13, stream=True)
        if c.choices
    )
    assert whole.choices[0].message.content == streamed
    assert whole.usage is not None and whole.usage.completion_tokens == 13
    assert whole.choices[0].finish_reason == "length"


def test_completions_stream_and_whole(client: OpenAI) -> None:
    whole = client.completions.create(model="synthetic", prompt="one two", max_tokens=5)
    assert whole.choices[0].text == "one two one two one "
    chunks = list(
        client.completions.create(
            model="synthetic", prompt="one two", max_tokens=5, stream=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5


def test_stop_strings_cut_streamed_and_whole_alike(client: OpenAI) -> None:
    asked = {"model": "synthetic", "prompt": "alpha beta gamma", "max_tokens": 8}
    whole = client.completions.create(**asked, stop=["a g"])
    assert whole.choices[0].text == "alpha bet" and whole.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(**asked, stop=["a g"], stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "alpha bet"
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_model_may_be_omitted_or_aliased(start_server) -> None:  # type: ignore[no-untyped-def]
    server = start_server(SyntheticEngine(), model_aliases=("smol",))
    raw = OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
    ids = [m.id for m in raw.models.list()]
    assert ids == ["synthetic", "smol"]
    out = raw.chat.completions.create(
        model="smol", messages=[{"role": "user", "content": "hi"}], max_tokens=2
    )
    assert out.choices[0].message.content == "hi hi "
    # The SDK always sends a model; a plain client may leave it out.
    omitted = httpx.post(
        f"{server.url}/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "yo"}], "max_tokens": 1},
    )
    assert omitted.json()["model"] == "synthetic"


def test_unknown_model_is_404_listing_served(client: OpenAI) -> None:
    with pytest.raises(NotFoundError) as info:
        client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "a"}])
    assert "synthetic" in info.value.message


def test_models_list_and_retrieve(client: OpenAI) -> None:
    listed = client.models.list().data
    assert [m.id for m in listed] == ["synthetic"] and listed[0].created > 0
    assert client.models.retrieve("synthetic") == listed[0]
    with pytest.raises(NotFoundError) as info:
        client.models.retrieve("org/gpt-9")
    assert "synthetic" in info.value.message


def test_tokens_arrive_before_the_end(start_server) -> None:  # type: ignore[no-untyped-def]
    # 2,000 tokens at 20 ms take 40 s: the first text must reach the SDK while the
    # engine is still generating, not after the whole answer.
    server = start_server(SyntheticEngine(itl_ms=20))
    raw = OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
    stream = raw.chat.completions.create(
        model="synthetic", messages=[{"role": "user", "content": "a b"}], max_tokens=2000,
        stream=True,
    )  # fmt: skip
    with stream:
        first = next(c for c in stream if c.choices and c.choices[0].delta.content)
        assert first.choices[0].finish_reason is None
        assert server.metric("tokenspout_requests_running") == 1
        assert server.metric("tokenspout_generation_tokens_total") < 2000


def test_heartbeats_between_events_do_not_break_the_sdk(start_server) -> None:  # type: ignore[no-untyped-def]
    # Heartbeats after an event id: the SDK's decoder used to see an empty event there.
    server = start_server(SyntheticEngine(itl_ms=150), heartbeat_interval_s=0.02)
    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    stream = client.chat.completions.create(
        model="synthetic",
        messages=[{"role": "user", "content": "slow words"}],
        max_tokens=4,
        stream=True,
        stream_options={"flush_tokens": 1, "flush_ms": 0},
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text.split() == ["slow", "words", "slow", "words"]


def test_chat_continues_the_final_assistant_message(client: OpenAI) -> None:
    # vLLM's continue_final_message, which an upstream's failover sends to a tokenspout.
    asked = [{"role": "user", "content": "one two three"}]
    whole = client.chat.completions.create(model="synthetic", messages=asked, max_tokens=8)
    assert whole.choices[0].message.content == "one two three one two three one two "
    rest = client.chat.completions.create(
        model="synthetic",
        messages=[*asked, {"role": "assistant", "content": "one two three one "}],
        max_tokens=4,
        extra_body={"continue_final_message": True, "add_generation_prompt": False},
    )
    assert rest.choices[0].message.content == "two three one two "


def test_continue_final_message_with_a_generation_prompt_is_refused(client: OpenAI) -> None:
    with pytest.raises(BadRequestError, match="cannot both be true") as err:
        client.chat.completions.create(
            model="synthetic",
            messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}],
            extra_body={"continue_final_message": True},
        )
    assert err.value.body["param"] == "continue_final_message"  # type: ignore[index]


def test_continuous_usage_counts_every_chunks_tokens(client: OpenAI) -> None:
    """vLLM's ``continuous_usage_stats``: each chunk's usage is the tokens so far, so a
    chunk that coalesced several tokens says so (a front relaying this server counts by it)."""
    chunks = list(
        client.chat.completions.create(
            model="synthetic", messages=[{"role": "user", "content": "a b c"}], max_tokens=12,
            stream=True,
            stream_options={  # type: ignore[typeddict-unknown-key]
                "include_usage": True, "continuous_usage_stats": True,
                "flush_tokens": 4, "flush_ms": 10_000,  # 4 tokens a chunk
            },
        )
    )  # fmt: skip
    usages = [c.usage for c in chunks]
    assert all(u is not None and u.prompt_tokens == 3 for u in usages)
    words = 0
    for chunk, usage in zip(chunks, usages, strict=True):
        if chunk.choices:
            words += len((chunk.choices[0].delta.content or "").split())
        assert usage is not None and usage.completion_tokens == words  # one word per token
        assert usage.total_tokens == 3 + words
    assert words == 12 and usages[-1] is not None and usages[-1].completion_tokens == 12
    per_chunk = [len((c.choices[0].delta.content or "").split()) for c in chunks if c.choices]
    assert max(per_chunk) == 4  # chunks of several tokens, each counted


def test_continuous_usage_is_for_one_choice(client: OpenAI) -> None:
    with pytest.raises(BadRequestError) as err:
        client.completions.create(
            model="synthetic", prompt="a", max_tokens=2, n=2, stream=True,
            stream_options={"include_usage": True, "continuous_usage_stats": True},  # type: ignore[typeddict-unknown-key]
        )  # fmt: skip
    assert err.value.body["param"] == "stream_options.continuous_usage_stats"  # type: ignore[index]


def test_continuous_usage_needs_include_usage(client: OpenAI) -> None:
    # Without include_usage there is no usage to repeat: it was accepted and ignored.
    with pytest.raises(BadRequestError) as err:
        client.completions.create(
            model="synthetic", prompt="a", max_tokens=2, stream=True,
            stream_options={"continuous_usage_stats": True},  # type: ignore[typeddict-unknown-key]
        )  # fmt: skip
    assert err.value.body["param"] == "stream_options.continuous_usage_stats"  # type: ignore[index]


@pytest.mark.parametrize("stream", [False, None])
def test_stream_options_need_a_stream(synthetic_server: RunningServer, stream: bool | None) -> None:
    # As vLLM: on a whole answer they were accepted and ignored.
    streaming = {} if stream is None else {"stream": stream}
    for path, body in (
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}], "max_tokens": 1}),
        ("/v1/completions", {"prompt": "a", "max_tokens": 1}),
    ):
        r = httpx.post(
            synthetic_server.url + path,
            json={**body, **streaming, "stream_options": {"include_usage": True}},
        )
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == "stream_options", r.text


def test_an_assistant_message_goes_back_as_the_sdk_returned_it(client: OpenAI) -> None:
    """A conversation goes on with the message the SDK returned, dumped as it is (OpenAI's
    ``annotations: []`` and ``refusal``, vLLM's ``reasoning_content``): accepted, and its
    reasoning and annotations are no words of the prompt (they were 400s)."""
    asked = {"role": "user", "content": "red green blue"}
    first = client.chat.completions.create(model="synthetic", messages=[asked], max_tokens=3)
    returned = first.choices[0].message.model_dump()
    assert returned["content"] == "red green blue "
    returned.update(annotations=[], reasoning_content="think think", reasoning="think")
    plain = {"role": "assistant", "content": returned["content"]}
    prompt_tokens = []
    for message in (returned, plain):
        again = client.chat.completions.create(
            model="synthetic", messages=[asked, message, asked], max_tokens=1
        )
        assert again.usage is not None
        prompt_tokens.append(again.usage.prompt_tokens)
    assert prompt_tokens[0] == prompt_tokens[1]
    with pytest.raises(BadRequestError) as err:
        client.chat.completions.create(
            model="synthetic", messages=[{**asked, "refusal": "no"}], max_tokens=1
        )
    assert err.value.body["param"] == "messages[0].refusal"  # type: ignore[index]
