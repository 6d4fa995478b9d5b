"""Reading an upstream's OpenAI streaming chunks: what each shape gives, and what is
malformed (which the relay treats as a failed upstream)."""

from __future__ import annotations

import json

import pytest

from tokenspout.engine.request import TokenLogprob, ToolCallDelta
from tokenspout.engine.upstream_chunks import (
    MalformedChunkError,
    ToolCallSlots,
    UpstreamChunk,
    parse_chunk,
)


def chat(delta: dict, finish: str | None = None, **more: object) -> str:
    return json.dumps({"choices": [{"index": 0, "delta": delta, "finish_reason": finish, **more}]})


@pytest.mark.parametrize(
    ("data", "chunk"),
    [
        (
            chat({"role": "assistant", "content": ""}),
            UpstreamChunk("", (), None, None, output=False),
        ),
        (chat({"content": "Hi"}), UpstreamChunk("Hi", (), None, None)),
        (chat({}, "length"), UpstreamChunk("", (), "length", None)),
        (
            json.dumps({"choices": [{"index": 0, "text": " there", "finish_reason": None}]}),
            UpstreamChunk(" there", (), None, None),
        ),
        (
            json.dumps({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 9}}),
            UpstreamChunk("", (), None, (3, 9), output=False),
        ),
        (
            chat(
                {
                    "tool_calls": [
                        {"index": 0, "id": "c1", "function": {"name": "f", "arguments": ""}}
                    ]
                }
            ),
            UpstreamChunk("", (ToolCallDelta(0, "c1", "f", ""),), None, None),
        ),
        (
            chat({"tool_calls": [{"index": 0, "function": {"arguments": '{"a"'}}]}),
            UpstreamChunk("", (ToolCallDelta(0, None, None, '{"a"'),), None, None),
        ),
        (
            chat(
                {"content": "é"},
                logprobs={
                    "content": [
                        {
                            "token": "é",
                            "logprob": -0.5,
                            "bytes": [195, 169],
                            "top_logprobs": [{"token": "e", "logprob": -1.0, "bytes": [101]}],
                        }
                    ]
                },
            ),
            UpstreamChunk(
                "é", (), None, None, (TokenLogprob("é", b"\xc3\xa9", -0.5, (("e", b"e", -1.0),)),)
            ),
        ),
        (  # echo with logprobs: the prompt's first token has a null logprob and top entry
            json.dumps(
                {
                    "choices": [
                        {
                            "index": 0,
                            "text": "Hi there",
                            "finish_reason": None,
                            "logprobs": {
                                "tokens": ["Hi", " there"],
                                "token_logprobs": [None, -0.5],
                                "top_logprobs": [None, {" there": -0.5}],
                                "text_offset": [0, 2],
                            },
                        }
                    ]
                }
            ),
            UpstreamChunk(
                "Hi there",
                (),
                None,
                None,
                (
                    TokenLogprob("Hi", b"Hi", None, ()),
                    TokenLogprob(" there", b" there", -0.5, ((" there", b" there", -0.5),)),
                ),
            ),
        ),
        (  # a completion's logprobs in the chat's shape, as llama.cpp's server sends them
            json.dumps(
                {
                    "choices": [
                        {
                            "index": 0,
                            "text": " blue",
                            "finish_reason": None,
                            "logprobs": {
                                "content": [
                                    {
                                        "id": 3,
                                        "token": " blue",
                                        "logprob": -0.25,
                                        "bytes": [32, 98, 108, 117, 101],
                                        "top_logprobs": [
                                            {"id": 3, "token": " blue", "logprob": -0.25},
                                            {"id": 4, "token": " clear", "logprob": -2.0},
                                        ],
                                    }
                                ]
                            },
                        }
                    ]
                }
            ),
            UpstreamChunk(
                " blue",
                (),
                None,
                None,
                (
                    TokenLogprob(
                        " blue",
                        b" blue",
                        -0.25,
                        ((" blue", b" blue", -0.25), (" clear", b" clear", -2.0)),
                    ),
                ),
            ),
        ),
        (  # the same token in a chat's shape
            chat(
                {"content": "Hi"},
                logprobs={"content": [{"token": "Hi", "logprob": None, "top_logprobs": None}]},
            ),
            UpstreamChunk("Hi", (), None, None, (TokenLogprob("Hi", b"Hi", None, ()),)),
        ),
        (  # vLLM's and tokenspout's continuous usage: the tokens so far, in every chunk
            json.dumps(
                {
                    "choices": [{"index": 0, "delta": {"content": "ab"}, "finish_reason": None}],
                    "usage": {"prompt_tokens": 3, "completion_tokens": 4},
                }
            ),
            UpstreamChunk("ab", (), None, (3, 4), (), 4),
        ),
        (  # llama.cpp's timings_per_token: the prompt computed and from its cache
            json.dumps(
                {
                    "choices": [{"index": 0, "delta": {"content": "😀"}, "finish_reason": None}],
                    "timings": {"cache_n": 28, "prompt_n": 3, "predicted_n": 7},
                }
            ),
            UpstreamChunk("😀", (), None, None, (), 7, prompt_tokens=31),
        ),
    ],
)
def test_chunk_shapes(data: str, chunk: UpstreamChunk) -> None:
    for raw in (data, data.encode()):  # bytes: as the relay reads it (SSE data)
        slots = ToolCallSlots()
        if chunk.tool_calls and chunk.tool_calls[0].id is None:
            slots.place(0, "c1", "f")  # a later piece of a call already begun
        assert parse_chunk(raw, slots) == chunk


@pytest.mark.parametrize(
    ("delta", "reasoning", "refusal"),
    [
        # vLLM's reasoning parsers, DeepSeek's API: content null while it reasons.
        ({"content": None, "reasoning_content": "Let me"}, "Let me", ""),
        ({"reasoning": " think"}, " think", ""),  # newer vLLM's name
        # vLLM versions in between send both, the same piece: it is taken once.
        ({"reasoning_content": "so", "reasoning": "so"}, "so", ""),
        ({"content": None, "refusal": "I can't help with that."}, "", "I can't help with that."),
        ({"content": "", "refusal": None, "reasoning_content": None}, "", ""),
    ],
)
def test_reasoning_and_refusal_pieces_are_read(delta: dict, reasoning: str, refusal: str) -> None:
    chunk = parse_chunk(chat(delta))
    assert (chunk.text, chunk.reasoning, chunk.refusal) == ("", reasoning, refusal)
    assert chunk.output == bool(reasoning or refusal)


@pytest.mark.parametrize("field", ["reasoning_content", "reasoning", "refusal"])
def test_a_reasoning_or_refusal_that_is_not_text_is_malformed(field: str) -> None:
    with pytest.raises(MalformedChunkError):
        parse_chunk(chat({field: ["a"]}))


@pytest.mark.parametrize(
    ("data", "output"),
    [
        # A chat stream's opening role, as vLLM and tokenspout, llama.cpp, OpenAI send it.
        (chat({"role": "assistant", "content": ""}), False),
        (chat({"role": "assistant", "content": None}), False),
        (chat({"role": "assistant", "content": "", "refusal": None, "tool_calls": []}), False),
        (  # vLLM's with continuous usage: no token generated yet
            json.dumps(
                {
                    "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}],
                    "usage": {"prompt_tokens": 3, "completion_tokens": 0},
                }
            ),
            False,
        ),
        (json.dumps({"choices": [{"index": 0, "text": ""}]}), False),
        (json.dumps({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 9}}), False),
        # The answer itself, even without text.
        (chat({"role": "assistant", "content": "Hi"}), True),  # TGI's, Ollama's: role each time
        (chat({}, "stop"), True),  # an answer that ends before any text
        (chat({"role": "assistant", "content": ""}, "length"), True),
        (json.dumps({"choices": [{"index": 0, "text": "", "finish_reason": "stop"}]}), True),
        (chat({"tool_calls": [{"index": 0, "function": {"arguments": "{"}}]}), True),
        (chat({"content": None, "reasoning_content": "Let me think"}), True),
        (
            chat(
                {"content": ""},
                logprobs={"content": [{"token": "", "logprob": -0.1, "bytes": []}]},
            ),
            True,
        ),
        (
            json.dumps(
                {
                    "choices": [{"index": 0, "delta": {"content": ""}}],
                    "timings": {"prompt_n": 3, "predicted_n": 1},
                }
            ),
            True,
        ),
    ],
)
def test_what_is_output_and_what_only_opens_a_chat(data: str, output: bool) -> None:
    """The relay's first-token timeout and time to first token wait for output: a chat's
    opening role chunk comes before any token is generated."""
    assert parse_chunk(data).output is output


@pytest.mark.parametrize(
    ("data", "why"),
    [
        ("{not json", "not JSON"),
        ("[1, 2]", "not a JSON object"),
        ('{"error": {"message": "engine died"}}', "engine died"),
        # Older vLLM's ErrorResponse, sent as it is.
        ('{"object": "error", "message": "CUDA out of memory", "code": 500}', "CUDA out of"),
        ('{"choices": [{"delta": {"content": 5}}]}', "unexpected shape"),
        ('{"object": "chunk"}', "unexpected shape"),
    ],
)
def test_malformed_chunks(data: str, why: str) -> None:
    with pytest.raises(MalformedChunkError, match=why):
        parse_chunk(data)
    with pytest.raises(MalformedChunkError, match=why):
        parse_chunk(data.encode())


def test_a_chunk_that_is_not_utf8_is_malformed() -> None:
    # "é" in Latin-1: an upstream that does not send UTF-8.
    with pytest.raises(MalformedChunkError, match="not UTF-8"):
        parse_chunk(b'{"choices": [{"delta": {"content": "\xe9"}}]}')


def test_a_parts_prompt_tokens_come_from_its_usage_or_else_its_timings() -> None:
    # Before llama.cpp's last chunk (usage), its timings say the prompt: usage sent along
    # and a cancelled answer's usage had 0 prompt tokens.
    from tokenspout.engine.upstream_relay import _Part

    part = _Part(tokens_before=0)
    assert part.prompt_tokens == 0
    part.prompt_said = 31
    assert part.prompt_tokens == 31
    part.usage = (33, 4)
    assert part.prompt_tokens == 33
    # A continuation's prompt holds the answer's tokens before it, which come off.
    assert _Part(tokens_before=5, prompt_said=36).prompt_tokens == 31


@pytest.mark.parametrize(
    "usage",
    [{}, {"prompt_tokens": 1}, {"prompt_tokens": 5, "completion_tokens": None}, "n/a"],
)
def test_a_usage_without_its_counts_is_no_usage(usage: object) -> None:
    """``usage: {}``, a null count: nothing the relay can count with, not a failure."""
    data = json.dumps({"choices": [], "usage": usage})
    assert parse_chunk(data) == UpstreamChunk("", (), None, None, output=False)
    finish = {"index": 0, "delta": {}, "finish_reason": "stop"}
    chunk = parse_chunk(json.dumps({"choices": [finish], "usage": usage}))
    assert (chunk.finish_reason, chunk.usage, chunk.generated) == ("stop", None, None)


def _calls(*pieces: list[dict]) -> list[tuple[int, str | None, str]]:
    """The (index, id, arguments) of each piece of ``pieces``' chunks, read in turn; an id
    made up for a call the upstream gave none is ``"made"``."""
    slots = ToolCallSlots()
    chunks = [parse_chunk(chat({"tool_calls": p}), slots) for p in pieces]
    deltas = [d for c in chunks for d in c.tool_calls]
    given = {p.get("id") for chunk in pieces for p in chunk}
    made = [d.id for d in deltas if d.id is not None and d.id not in given]
    assert all(i.startswith("call_") for i in made) and len(set(made)) == len(made), made
    return [(d.index, d.id if d.id in given else d.id and "made", d.arguments) for d in deltas]


def call(arguments: str, id: str | None = None, name: str | None = None, **more: object) -> dict:
    function = {"arguments": arguments} | ({"name": name} if name else {})
    return {"function": function} | ({"id": id} if id is not None else {}) | more


@pytest.mark.parametrize(
    ("pieces", "calls"),
    [
        # Gemini's: each call whole, in a chunk of its own or together, no index.
        ([[call("{}", "a_1", "f")], [call("{}", "b_1", "g")]],
         [(0, "a_1", "{}"), (1, "b_1", "{}")]),
        ([[call("{}", "a_1", "f"), call("{}", "b_1", "g")]], [(0, "a_1", "{}"), (1, "b_1", "{}")]),
        # The arguments in pieces without index or id (or an empty id): the last call's.
        (
            [[call("", "a_1", "f")], [call('{"x"')], [call(": 1}", "")], [call("{}", "b_1", "g")]],
            [(0, "a_1", ""), (0, None, '{"x"'), (0, None, ": 1}"), (1, "b_1", "{}")],
        ),
        # A known id goes with its call (said once); a name without id begins one, whose id
        # is made up.
        ([[call("", "a_1", "f")], [call("{}", "a_1")], [call("{}", name="g")]],
         [(0, "a_1", ""), (0, None, "{}"), (1, "made", "{}")]),
        # Without index nor id at all: each name begins a call, with a made-up id.
        ([[call('{"x"', name="f")], [call(": 1}")], [call("{}", name="g")]],
         [(0, "made", '{"x"'), (0, None, ": 1}"), (1, "made", "{}")]),
        # A new id under an index another call has begun: the next call, not the same one.
        ([[call("{}", "a_1", "f", index=0)], [call("{}", "b_1", "g", index=0)]],
         [(0, "a_1", "{}"), (1, "b_1", "{}")]),
        # An index given is kept, and the next call comes after it.
        ([[call("", "a_1", "f", index=2)], [call("{}")], [call("{}", "b_1", "g")]],
         [(2, "a_1", ""), (2, None, "{}"), (3, "b_1", "{}")]),
    ],
)  # fmt: skip
def test_a_tool_calls_index_left_out_is_made_good(
    pieces: list[list[dict]], calls: list[tuple[int, str | None, str]]
) -> None:
    assert _calls(*pieces) == calls
