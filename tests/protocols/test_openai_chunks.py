"""OpenAI chat and completion payloads against the API reference's shapes, and the delta
encoder's output against ``json.dumps`` byte for byte."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tokenspout.engine.request import OutputExtras, TokenLogprob
from tokenspout.errors import InternalError, StreamGoneError
from tokenspout.protocols.chunk_format import Usage, delta_encoder, delta_usage_encoder
from tokenspout.protocols.json_text import dumps
from tokenspout.protocols.openai_chunks import ChatChunks, ChoiceOutput, CompletionChunks
from tokenspout.protocols.seed_events import SeedEvents

USAGE = Usage(prompt_tokens=7, completion_tokens=5)
USAGE_DICT = {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12}
HEAD = {"id": "chatcmpl-1", "created": 1700000000, "model": "m"}


def chat(include_usage: bool = False) -> ChatChunks:
    return ChatChunks("chatcmpl-1", 1700000000, "m", include_usage)


def completion(include_usage: bool = False) -> CompletionChunks:
    return CompletionChunks("chatcmpl-1", 1700000000, "m", include_usage)


def chat_chunk(delta: dict[str, Any], finish: str | None, **extra: Any) -> dict[str, Any]:
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    return {**HEAD, "object": "chat.completion.chunk", "choices": [choice], **extra}


def text_chunk(text: str, finish: str | None, **extra: Any) -> dict[str, Any]:
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    return {**HEAD, "object": "text_completion", "choices": [choice], **extra}


def test_usage_counts_the_total() -> None:
    assert USAGE.as_dict() == USAGE_DICT


def test_a_chat_stream_without_usage() -> None:
    chunks = chat()
    assert chunks.ends_with_done
    assert chunks.opening() == [chat_chunk({"role": "assistant", "content": ""}, None)]
    assert chunks.delta("Hi") == chat_chunk({"content": "Hi"}, None)
    assert chunks.closing("stop", USAGE) == [chat_chunk({}, "stop")]
    # No "usage" key at all unless asked for.
    assert all("usage" not in c for c in [*chunks.opening(), chunks.delta("x")])


def test_a_chat_stream_with_usage_ends_with_a_usage_chunk_with_no_choices() -> None:
    chunks = chat(include_usage=True)
    assert chunks.opening() == [chat_chunk({"role": "assistant", "content": ""}, None, usage=None)]
    assert chunks.delta("Hi") == chat_chunk({"content": "Hi"}, None, usage=None)
    assert chunks.closing("length", USAGE) == [
        chat_chunk({}, "length", usage=None),
        {**HEAD, "object": "chat.completion.chunk", "choices": [], "usage": USAGE_DICT},
    ]


def test_a_whole_chat_completion() -> None:
    assert chat().response("Hello!", "stop", USAGE) == {
        **HEAD,
        "object": "chat.completion",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello!"},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": USAGE_DICT,
    }
    # Usage is part of a whole response whatever the stream option says.
    assert chat(include_usage=True).response("", "length", USAGE)["usage"] == USAGE_DICT


def test_a_completion_stream_without_usage() -> None:
    chunks = completion()
    assert chunks.ends_with_done
    assert chunks.opening() == []
    assert chunks.delta("Hi") == text_chunk("Hi", None)
    assert chunks.closing("stop", USAGE) == [text_chunk("", "stop")]


def test_a_completion_stream_with_usage() -> None:
    chunks = completion(include_usage=True)
    assert chunks.delta("Hi") == text_chunk("Hi", None, usage=None)
    assert chunks.closing("cancelled", USAGE) == [
        text_chunk("", "cancelled", usage=None),
        {**HEAD, "object": "text_completion", "choices": [], "usage": USAGE_DICT},
    ]


def test_a_whole_text_completion() -> None:
    assert completion().response("once upon", "length", USAGE) == {
        **text_chunk("once upon", "length"),
        "usage": USAGE_DICT,
    }


@pytest.mark.parametrize("chunks", [chat(), completion(), SeedEvents()])
def test_an_error_event_has_the_openai_error_shape(chunks: Any) -> None:
    err = InternalError("the server failed: boom")
    assert chunks.error(err) == {
        "error": {
            "message": "the server failed: boom",
            "type": "server_error",
            "param": None,
            "code": "internal_error",
        }
    }
    gone = StreamGoneError("gone", param="stream_id")
    assert chunks.error(gone)["error"]["param"] == "stream_id"
    assert chunks.error(gone)["error"]["code"] == "stream_gone"


def test_every_payload_is_json() -> None:
    for chunks in (chat(True), completion(True)):
        payloads = [
            *chunks.opening(),
            chunks.delta("a"),
            *chunks.closing("stop", USAGE),
            chunks.response("a", "stop", USAGE),
        ]
        for payload in payloads:
            assert json.loads(dumps(payload)) == payload


TEXTS = [
    "",
    "plain",
    " leading space",
    'quote " and backslash \\',
    "line\nbreak\r\tand tab",
    "controls \x00\x01\x1f\x7f",
    "é日本語 😀",
    "separators \u2028\u2029",
    "a lone \ud800 surrogate",
    "</script>",
    "\x00tokenspout-delta-text\x00",  # the encoder's own marker, as text
    '{"content":"x"}',
]


@pytest.mark.parametrize(
    "chunks", [chat(), chat(True), completion(), completion(True), SeedEvents()]
)
@pytest.mark.parametrize("text", TEXTS)
def test_the_delta_encoder_equals_json_dumps_byte_for_byte(chunks: Any, text: str) -> None:
    encode = delta_encoder(chunks)
    expected = json.dumps(chunks.delta(text), ensure_ascii=False, separators=(",", ":"))
    assert encode(text) == expected
    if "\ud800" not in text:  # a lone surrogate has no UTF-8 form
        assert encode(text).encode("utf-8") == expected.encode("utf-8")
        assert json.loads(encode(text)) == chunks.delta(text)


@pytest.mark.parametrize("chunks", [chat(True), completion(True)])
@pytest.mark.parametrize("text", TEXTS)
def test_the_continuous_usage_encoder_equals_json_dumps(chunks: Any, text: str) -> None:
    encode = delta_usage_encoder(chunks)
    assert encode is not None
    usage = Usage(12, 345)
    expected = chunks.usage_so_far(chunks.delta(text), usage)
    assert encode(text, usage) == json.dumps(expected, ensure_ascii=False, separators=(",", ":"))


def test_no_continuous_usage_encoder_without_a_usage_field() -> None:
    for chunks in (chat(), SeedEvents()):
        with pytest.raises(ValueError, match="usage"):
            delta_usage_encoder(chunks)


def test_the_delta_encoder_needs_the_text_as_a_json_string() -> None:
    class Counted(SeedEvents):
        def delta(self, text: str) -> dict[str, Any]:
            return {"length": len(text)}

    with pytest.raises(ValueError):
        delta_encoder(Counted())


def test_choices_of_a_group_carry_their_index_and_the_usage_comes_once() -> None:
    chunks = chat(include_usage=True)
    assert chunks.opening(2)[0]["choices"][0]["index"] == 2
    assert chunks.delta("hi", 1)["choices"][0] == {
        "index": 1,
        "delta": {"content": "hi"},
        "logprobs": None,
        "finish_reason": None,
    }
    assert chunks.choice_end("stop", 2)["choices"][0]["finish_reason"] == "stop"
    [usage] = chunks.usage_end(USAGE)
    assert usage["choices"] == [] and usage["usage"] == USAGE_DICT
    whole = completion().response_choices(
        [ChoiceOutput("a", "stop"), ChoiceOutput("b", "length")], USAGE
    )
    assert [(c["index"], c["text"], c["finish_reason"]) for c in whole["choices"]] == [
        (0, "a", "stop"),
        (1, "b", "length"),
    ]


def test_an_answer_without_tokens_has_empty_logprobs_when_they_were_asked_for() -> None:
    # An answer that ended at once (end of turn first): clients read logprobs.content or
    # logprobs.tokens and failed on null.
    asked = ChatChunks("chatcmpl-1", 1700000000, "m", logprobs=True)
    assert asked.response("", "stop", USAGE)["choices"][0]["logprobs"] == {"content": []}
    assert chat().response("", "stop", USAGE)["choices"][0]["logprobs"] is None
    legacy = CompletionChunks("cmpl-1", 1700000000, "m", logprobs=True)
    assert legacy.response("", "stop", USAGE)["choices"][0]["logprobs"] == {
        "tokens": [],
        "token_logprobs": [],
        "top_logprobs": [],
        "text_offset": [],
    }
    assert completion().response("", "stop", USAGE)["choices"][0]["logprobs"] is None
    # An answer with text whose logprobs an upstream did not give (llama.cpp for
    # logprobs 0): null, not empty lists that would say it had no tokens.
    assert asked.response("Paris", "stop", USAGE)["choices"][0]["logprobs"] is None
    assert legacy.response("Paris", "stop", USAGE)["choices"][0]["logprobs"] is None


def test_echoed_prompt_logprobs_come_first_the_first_one_null() -> None:
    prompt = (TokenLogprob("The", b"The", None, ()), TokenLogprob(" sky", b" sky", -2.0, ()))
    first = OutputExtras(
        logprob=TokenLogprob(" is", b" is", -0.5, ((" is", b" is", -0.5),)),
        prompt_logprobs=prompt,
    )
    payload = completion().delta_with("The sky is", [first])
    assert payload["choices"][0]["logprobs"] == {
        "tokens": ["The", " sky", " is"],
        "token_logprobs": [None, -2.0, -0.5],
        "top_logprobs": [None, {" sky": -2.0}, {" is": -0.5}],
        "text_offset": [0, 3, 7],
    }


def test_legacy_top_logprobs_always_list_the_token_itself() -> None:
    # The sampled ")" is not the most likely token; two different tokens that each hold
    # part of a character are written by their bytes, as OpenAI does: as "\ufffd" both,
    # one hid the other.
    sampled = TokenLogprob(")", b")", -0.8, (("0", b"0", -0.7),))
    partial = TokenLogprob("\ufffd", b"\xe6", -1.5, (("\ufffd", b"\xe3", -0.2),))
    alone = TokenLogprob(" is", b" is", -0.5, ())
    extras = [OutputExtras(logprob=t) for t in (sampled, partial, alone)]
    top = completion().delta_with(")\ufffd is", extras)["choices"][0]["logprobs"]["top_logprobs"]
    assert top == [
        {"0": -0.7, ")": -0.8},
        {"bytes:\\xe3": -0.2, "bytes:\\xe6": -1.5},
        {" is": -0.5},
    ]
    # Chat lists the alternatives alone, as OpenAI's chat API does.
    chat_top = chat().delta_with(")", extras[:1])["choices"][0]["logprobs"]["content"][0]
    assert [t["token"] for t in chat_top["top_logprobs"]] == ["0"]


def test_legacy_text_offsets_count_characters_of_the_text() -> None:
    # "日" is three bytes in two tokens: the first ends inside it and adds nothing to the
    # offset, the second completes it. Across chunks too (one encoder per response).
    first, rest = (
        TokenLogprob("\ufffd", b"\xe6\x97", -0.1, ()),
        TokenLogprob("\ufffd", b"\xa5", -0.2, ()),
    )
    chunks = completion()
    one = chunks.delta_with("", [OutputExtras(logprob=first)])["choices"][0]["logprobs"]
    two = chunks.delta_with(
        "日 is",
        [OutputExtras(logprob=rest), OutputExtras(logprob=TokenLogprob(" is", b" is", -0.3, ()))],
    )["choices"][0]["logprobs"]
    assert one["tokens"] == ["bytes:\\xe6\\x97"] and one["text_offset"] == [0]
    assert two["tokens"] == ["bytes:\\xa5", " is"] and two["text_offset"] == [0, 1]
    emoji = TokenLogprob("\ufffd", "🎉".encode()[:2], -0.1, ())
    whole = completion().response(
        "🎉!",
        "stop",
        USAGE,
        [
            OutputExtras(logprob=emoji),
            OutputExtras(logprob=TokenLogprob("\ufffd", "🎉".encode()[2:], -0.1, ())),
            OutputExtras(logprob=TokenLogprob("!", b"!", -0.1, ())),
        ],
    )["choices"][0]["logprobs"]
    assert whole["text_offset"] == [0, 0, 1]


def test_a_resumed_readers_text_offsets_go_on_from_the_events_it_skipped() -> None:
    # A resume starts after "a" and the first bytes of "日": its offsets are the whole
    # answer's, the character's last byte completing it at offset 1.
    tokens = [
        TokenLogprob("a", b"a", -0.1, ()),
        TokenLogprob("\ufffd", b"\xe6\x97", -0.1, ()),
        TokenLogprob("\ufffd", b"\xa5", -0.2, ()),
        TokenLogprob("!", b"!", -0.3, ()),
    ]
    extras = [OutputExtras(logprob=t) for t in tokens]
    whole = completion().delta_with("a日!", extras)["choices"][0]["logprobs"]["text_offset"]
    resumed = completion()
    resumed.skip(extras[:2])
    later = resumed.delta_with("日!", extras[2:])["choices"][0]["logprobs"]["text_offset"]
    assert whole == [0, 1, 1, 2] and later == whole[2:]


def test_reasoning_and_refusal_pieces_of_one_event_are_joined_in_order() -> None:
    """Coalesced outputs' pieces go out as one delta: reasoning as ``reasoning_content``
    (vLLM's name), a refusal as ``refusal`` (OpenAI's), each only when there is some."""
    reasoning = [OutputExtras(reasoning="Let"), OutputExtras(reasoning=" me"), OutputExtras()]
    assert chat().delta_with("", reasoning) == chat_chunk({"reasoning_content": "Let me"}, None)
    mixed = [OutputExtras(reasoning=" so."), OutputExtras(refusal="No")]
    assert chat().delta_with("Hi", mixed) == chat_chunk(
        {"content": "Hi", "reasoning_content": " so.", "refusal": "No"}, None
    )


def test_a_whole_chat_completion_carries_the_reasoning_and_the_refusal() -> None:
    extras = [OutputExtras(reasoning="Think"), OutputExtras(reasoning="ing.")]
    message = chat().response("Paris", "stop", USAGE, extras)["choices"][0]["message"]
    assert message == {"role": "assistant", "content": "Paris", "reasoning_content": "Thinking."}
    extras = [OutputExtras(refusal="I can't"), OutputExtras(refusal=" help.")]
    message = chat().response("", "stop", USAGE, extras)["choices"][0]["message"]
    # As OpenAI answers a refusal: content null.
    assert message == {"role": "assistant", "content": None, "refusal": "I can't help."}
