"""The context length an upstream's ``/models`` entry gives, in each server's own words,
and none where the entry does not say; how its chunks can be asked to count tokens; the
messages of a continuation as they were sent."""

from __future__ import annotations

import pytest

from tokenspout.engine.continuation import Continuation
from tokenspout.engine.request import ChatMessage, Prompt, SamplingParams
from tokenspout.engine.upstream_body import request_body
from tokenspout.engine.upstream_engine import UpstreamEngine
from tokenspout.engine.upstream_options import UpstreamOptions
from tokenspout.engine.upstream_server import context_length, token_counts


@pytest.mark.parametrize(
    ("entry", "length"),
    [
        ({"id": "m", "max_model_len": 4096}, 4096),  # vLLM, SGLang, tokenspout
        ({"id": "m", "meta": {"n_vocab": 49152, "n_ctx_train": 8192}}, 8192),  # llama.cpp
        # ...whose slots hold --ctx-size / --parallel: a longer prompt is refused there.
        ({"id": "m", "meta": {"n_ctx": 1024, "n_ctx_train": 8192}}, 1024),
        ({"id": "m", "meta": {"n_ctx": 16384, "n_ctx_train": 8192}}, 8192),
        ({"id": "m", "context_length": 131072}, 131072),  # OpenRouter-style hosted APIs
        ({"id": "m", "max_model_len": 2048, "meta": {"n_ctx_train": 8192}}, 2048),
        ({"id": "m"}, None),  # Ollama, TGI, OpenAI: nothing to report
        ({"id": "m", "max_model_len": None}, None),
        ({"id": "m", "max_model_len": "4096"}, None),
        ({"id": "m", "max_model_len": 0}, None),
        ({"id": "m", "max_model_len": True}, None),
        ({"id": "m", "meta": None}, None),
        ({"id": "m", "meta": {"n_ctx_train": -1}}, None),
    ],
)
def test_context_length_of_a_models_entry(entry: dict, length: int | None) -> None:
    assert context_length(entry) == length


@pytest.mark.parametrize(
    ("owners", "counts"),
    [
        (["vllm"], "usage"),
        (["tokenspout"], "tokenspout"),
        (["tokenspout-synthetic", "tokenspout"], "tokenspout"),
        (["vllm", "tokenspout"], "usage"),
        (["llamacpp"], "timings"),
        (["openai"], None),  # a hosted API may refuse a field it does not know: not asked
        (["vllm", "someone"], None),
        ([], None),
    ],
)
def test_which_upstreams_are_asked_to_count_the_tokens_of_chunks(
    owners: list[str], counts: str | None
) -> None:
    assert token_counts([{"id": f"m{i}", "owned_by": o} for i, o in enumerate(owners)]) == counts


def test_the_request_asks_for_the_counts_the_upstream_gives() -> None:
    prompt = Prompt(text="hi", token_ids=None)
    params = SamplingParams(max_tokens=5, model="m")
    _, plain = request_body(prompt, params)
    _, usage = request_body(prompt, params, "usage")
    _, timings = request_body(prompt, params, "timings")
    assert plain["stream_options"] == {"include_usage": True} and "timings_per_token" not in plain
    assert usage["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}
    assert timings["timings_per_token"] is True
    assert timings["stream_options"] == {"include_usage": True}
    # A tokenspout is asked for an event per token: its own coalescing off.
    _, ours = request_body(prompt, params, "tokenspout")
    assert ours["stream_options"] == {
        "include_usage": True, "continuous_usage_stats": True, "flush_tokens": 1, "flush_ms": 0,
    }  # fmt: skip


@pytest.mark.parametrize(
    ("chat", "sent", "limit"),
    [
        (True, {"max_completion_tokens": 9}, "max_completion_tokens"),
        (True, {"max_tokens": 9, "max_completion_tokens": 9}, "max_completion_tokens"),
        (True, {"max_tokens": 9, "max_completion_tokens": None}, "max_tokens"),
        (True, {"max_tokens": 9}, "max_tokens"),
        (False, {"max_tokens": 9}, "max_tokens"),
    ],
)
def test_the_token_limit_goes_upstream_under_the_clients_name(
    chat: bool, sent: dict, limit: str
) -> None:
    """OpenAI's reasoning models refuse ``max_tokens``: a chat's ``max_completion_tokens``
    stays that, with what is left of it after a first part (here 4 of 9)."""
    prompt = Prompt("hi", messages=(ChatMessage("user", "hi"),)) if chat else Prompt("hi")
    _, body = request_body(prompt, SamplingParams(max_tokens=4, extra_body=sent))
    assert {k: v for k, v in body.items() if k.startswith("max_")} == {limit: 4}
    # Left out when the client left it out (or sent null): the upstream knows the room.
    params = SamplingParams(max_tokens=4, max_tokens_given=False, extra_body={"max_tokens": None})
    _, body = request_body(prompt, params)
    assert not [k for k in body if k.startswith("max_")]


IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}


@pytest.mark.parametrize(
    ("content", "continued"),
    [
        ("a b ", "a b c d"),
        ([{"type": "text", "text": "a"}, {"type": "text", "text": "b "}],
         [{"type": "text", "text": "a"}, {"type": "text", "text": "b c d"}]),
        ([{"type": "text", "text": "a "}, IMAGE], [{"type": "text", "text": "a "}, IMAGE,
                                                  {"type": "text", "text": "c d"}]),
    ],
    ids=["string", "text parts", "ends with an image"],
)  # fmt: skip
def test_a_continued_final_message_goes_on_in_the_form_it_was_sent(
    content: object, continued: object
) -> None:
    """A failover (or a takeover) continues a final assistant message: its text goes on
    where the client's left it, its other parts and fields as they were sent."""
    sent = {"role": "assistant", "content": content, "x_vendor": {"k": 1}}
    messages = (
        ChatMessage("user", "hi", sent={"role": "user", "content": [IMAGE], "x_vendor": 1}),
        ChatMessage("assistant", "a b ", sent=sent),
    )
    prompt = Prompt("", messages=messages, add_generation_prompt=False, continue_final_message=True)
    engine = UpstreamEngine(UpstreamOptions(["http://127.0.0.1:9/v1"]))
    rest, _ = engine.continuation(prompt, SamplingParams(9), Continuation("c d", None, 2))
    _, body = request_body(rest, SamplingParams(7))
    assert body["messages"] == [
        {"role": "user", "content": [IMAGE], "x_vendor": 1},
        {"role": "assistant", "content": continued, "x_vendor": {"k": 1}},
    ]
    assert rest.messages[-1].content == "a b c d"
