"""Structured output, tool calls and logprobs on the real model, through real clients (the
openai SDK, LangChain, httpx). With a 135M model these assert structure, not cleverness:
valid JSON, schema-conformant, well-formed calls, sorted logprobs."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema
import pytest
from httpx_sse import EventSource, connect_sse
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openai import BadRequestError, OpenAI
from openai.types.chat import ChatCompletionTokenLogprob
from pydantic import BaseModel

from tests.conftest import RunningServer, _start
from tokenspout.engine.llm_engine import LLMEngine
from tokenspout.server.config import ServerConfig

MODEL = "SmolLM2-135M-Instruct"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 20},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The local time in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 20}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}


class Person(BaseModel):
    name: str
    age: int


@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    running, stop = _start(LLMEngine(None, max_num_seqs=4), ServerConfig())
    yield running
    stop()


@pytest.fixture
def client(server: RunningServer) -> OpenAI:
    return OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=300)


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def test_sdk_parse_returns_a_pydantic_object(client: OpenAI) -> None:
    person = Person.model_json_schema()
    person["additionalProperties"] = False
    out = client.chat.completions.parse(
        model=MODEL,
        messages=user("Invent a person. Reply with their name and age."),
        response_format=Person,
        max_tokens=40,
        temperature=0,
    )
    assert out.choices[0].finish_reason == "stop"
    parsed = out.choices[0].message.parsed
    assert isinstance(parsed, Person)
    assert json.loads(out.choices[0].message.content or "") == parsed.model_dump()


def test_streamed_json_schema_answer_validates(client: OpenAI) -> None:
    schema = {
        "type": "object",
        "properties": {
            "colors": {
                "type": "array",
                "items": {"type": "string", "maxLength": 12},
                "minItems": 2,
                "maxItems": 3,
            },
            "happy": {"type": "boolean"},
        },
        "required": ["colors", "happy"],
        "additionalProperties": False,
    }
    stream = client.chat.completions.create(
        model=MODEL,
        messages=user("Name two colours you like."),
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "colours", "schema": schema, "strict": True},
        },
        max_tokens=60,
        seed=3,
        stream=True,
        stream_options={"flush_tokens": 1, "flush_ms": 0},
    )
    chunks = list(stream)
    pieces = [
        c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content
    ]
    assert len(pieces) > 3, "the JSON arrives in pieces"
    assert chunks[-1].choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads("".join(pieces)), schema)


def test_json_object_mode_gives_a_json_object(client: OpenAI) -> None:
    out = client.chat.completions.create(
        model=MODEL,
        messages=user("Give me a JSON object with one key, ok, set to true."),
        response_format={"type": "json_object"},
        max_tokens=60,
        temperature=0,
    )
    assert out.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(out.choices[0].message.content or ""), dict)


@pytest.mark.parametrize(
    ("field", "value", "check"),
    [
        ("guided_choice", ["yes", "no"], lambda text: text in ("yes", "no")),
        ("guided_regex", r"[0-9]{3}-[a-z]{2}", lambda text: len(text) == 6 and text[3] == "-"),
        ("structured_outputs", {"choice": ["yes", "no"]}, lambda text: text in ("yes", "no")),
        ("structured_outputs", {"regex": "[0-9]{4}"}, lambda text: len(text) == 4),
        (
            "structured_outputs",
            {
                "json": {
                    "type": "object",
                    "properties": {"ok": {"type": "boolean"}},
                    "required": ["ok"],
                    "additionalProperties": False,
                }
            },
            lambda text: isinstance(json.loads(text)["ok"], bool),
        ),
        ("structured_outputs", {"json_object": True}, lambda text: text.startswith("{")),
        ("structured_outputs", {"grammar": 'start: "a" | "b"'}, lambda text: text in ("a", "b")),
    ],
)
def test_vllm_guided_extensions(server: RunningServer, field: str, value: object, check) -> None:  # type: ignore[no-untyped-def]
    body = {"messages": user("Answer."), "max_tokens": 10, field: value}
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    assert check(r.json()["choices"][0]["message"]["content"])


def test_required_tool_call_streams_name_first_then_arguments(client: OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL,
        messages=user("What is the weather in Paris?"),
        tools=[WEATHER, TIME],  # type: ignore[list-item]
        tool_choice="required",
        max_tokens=60,
        temperature=0,
        stream=True,
        stream_options={"flush_tokens": 1, "flush_ms": 0},
    )
    calls = [call for c in stream if c.choices for call in (c.choices[0].delta.tool_calls or [])]
    finish = None
    assert calls, "the call arrives as delta.tool_calls"
    first, rest = calls[0], calls[1:]
    assert first.index == 0 and first.id and first.type == "function"
    assert first.function is not None and first.function.name in ("get_weather", "get_time")
    assert len(rest) > 2, "the arguments arrive in pieces"
    assert all(c.index == 0 and c.id is None and c.function.name is None for c in rest)  # type: ignore[union-attr]
    arguments = json.loads("".join(c.function.arguments or "" for c in calls))  # type: ignore[union-attr]
    tool = WEATHER if first.function.name == "get_weather" else TIME
    jsonschema.validate(arguments, tool["function"]["parameters"])  # type: ignore[index]
    del finish


def test_named_tool_choice_and_the_tool_result_continues(client: OpenAI) -> None:
    messages: list[dict] = user("What time is it in Tokyo?")
    out = client.chat.completions.create(
        model=MODEL,
        messages=messages,  # type: ignore[arg-type]
        tools=[WEATHER, TIME],  # type: ignore[list-item]
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        max_tokens=40,
        temperature=0,
    )
    choice = out.choices[0]
    # A call it was told to make: "stop", as in OpenAI's and vLLM's answers.
    assert choice.finish_reason == "stop"
    assert choice.message.content is None
    (call,) = choice.message.tool_calls or []
    assert call.function.name == "get_time"  # type: ignore[union-attr]
    jsonschema.validate(json.loads(call.function.arguments), TIME["function"]["parameters"])  # type: ignore[union-attr,index]
    messages.append(choice.message.model_dump(exclude_none=True))
    messages.append({"role": "tool", "tool_call_id": call.id, "content": "09:30"})
    follow = client.chat.completions.create(
        model=MODEL,
        messages=messages,  # type: ignore[arg-type]
        tools=[WEATHER, TIME],  # type: ignore[list-item]
        tool_choice="none",
        max_tokens=12,
        temperature=0,
    )
    assert follow.choices[0].finish_reason in ("stop", "length")
    assert follow.choices[0].message.content
    assert not follow.choices[0].message.tool_calls


def said_then_called(city: str, i: int) -> list[dict]:
    """A turn that says something, then calls ``get_weather`` for ``city``, and its result."""
    call = {"name": "get_weather", "arguments": json.dumps({"city": city, "unit": "celsius"})}
    return [
        *user(f"What is the weather in {city}?"),
        {
            "role": "assistant",
            "content": f"Let me check the weather in {city}.",
            "tool_calls": [{"id": f"call_{i}", "type": "function", "function": call}],
        },
        {"role": "tool", "tool_call_id": f"call_{i}", "content": "sunny"},
        {"role": "assistant", "content": f"It is sunny in {city}."},
    ]


def test_text_then_a_call_is_content_and_the_call_streamed_or_not(client: OpenAI) -> None:
    # Greedy, after two turns that did so, the model writes a sentence and then a call. Its
    # markup came back as content then (only an answer that started with the call was read
    # as one), and the call was lost.
    messages = [*said_then_called("Oslo", 0), *said_then_called("Rome", 1)]
    body: dict[str, Any] = {
        "model": MODEL,
        "messages": [*messages, *user("What is the weather in Paris?")],
        "tools": [WEATHER],
        "max_tokens": 80,
        "temperature": 0,
    }
    choice = client.chat.completions.create(**body).choices[0]
    content, calls = choice.message.content, choice.message.tool_calls or []
    assert content and "<" not in content and content == content.rstrip(), content
    assert choice.finish_reason == "tool_calls"
    (call,) = calls
    assert call.function.name == "get_weather"  # type: ignore[union-attr]
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])  # type: ignore[union-attr,index]
    stream = client.chat.completions.create(
        **body, stream=True, stream_options={"flush_tokens": 1, "flush_ms": 0}
    )
    deltas = [c.choices[0] for c in stream if c.choices]
    texts = [d.delta.content for d in deltas if d.delta.content]
    pieces = [call for d in deltas for call in d.delta.tool_calls or []]
    assert "".join(texts) == content and len(texts) > 1, "the content streams first"
    first_call = next(i for i, d in enumerate(deltas) if d.delta.tool_calls)
    assert not any(d.delta.content for d in deltas[first_call:])
    assert pieces[0].function.name == "get_weather" and pieces[0].id  # type: ignore[union-attr]
    assert "".join(p.function.arguments or "" for p in pieces) == call.function.arguments  # type: ignore[union-attr]
    assert deltas[-1].finish_reason == "tool_calls"


def weather_call() -> dict[str, Any]:
    """A greedy chat that must call ``get_weather``."""
    return {
        "messages": user("What is the weather in Paris?"),
        "tools": [WEATHER],
        "tool_choice": "required",
        "temperature": 0,
    }


@pytest.mark.slow
def test_a_call_cut_by_max_tokens_shows_no_markup(server: RunningServer) -> None:
    body = weather_call()
    url = f"{server.url}/v1/chat/completions"
    # 3 and 10 tokens cut the call before its name ends, 20 inside its arguments.
    for max_tokens in (3, 10, 20):
        r = httpx.post(url, json={**body, "max_tokens": max_tokens}, timeout=120)
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] == "length"
        assert not choice["message"]["content"], max_tokens
        for call in choice["message"].get("tool_calls", []):
            assert call["function"]["name"] == "get_weather"
            assert "<" not in call["function"]["arguments"]
    streamed = {**body, "max_tokens": 10, "stream": True}
    with httpx.stream("POST", url, json=streamed, timeout=120) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert not any(e["choices"][0]["delta"].get("content") for e in events)
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    # With "auto" the model answers in text here, which still comes through.
    auto = {**body, "tool_choice": "auto", "max_tokens": 5}
    answer = httpx.post(url, json=auto, timeout=120).json()["choices"][0]["message"]
    assert answer["content"] and "tool_calls" not in answer


@pytest.mark.slow
def test_a_call_cut_in_its_closing_markup_or_by_a_stop_string(server: RunningServer) -> None:
    body = weather_call()
    url = f"{server.url}/v1/chat/completions"
    whole = httpx.post(url, json={**body, "max_tokens": 100}, timeout=120).json()
    assert whole["choices"][0]["finish_reason"] == "tool_calls"
    arguments = whole["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"]
    n = whole["usage"]["completion_tokens"]
    # The last tokens are the markup after the arguments ("}\n</tool_call>"): a cut there
    # leaves the arguments whole, and none of the markup in them.
    for max_tokens in range(n - 4, n):
        choice = httpx.post(url, json={**body, "max_tokens": max_tokens}, timeout=120).json()
        choice = choice["choices"][0]
        assert choice["finish_reason"] == "length", max_tokens
        cut = choice["message"]["tool_calls"][0]["function"]["arguments"]
        assert arguments.startswith(cut), (max_tokens, cut)
    # A stop string that cuts the call: "stop", not "tool_calls", streamed or not.
    stopped = {**body, "max_tokens": 100, "stop": ["}"]}
    choice = httpx.post(url, json=stopped, timeout=120).json()["choices"][0]
    assert choice["finish_reason"] == "stop"
    with httpx.stream("POST", url, json={**stopped, "stream": True}, timeout=120) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert events[-1]["choices"][0]["finish_reason"] == "stop"


def test_text_a_stop_string_ends_is_the_same_with_tools(server: RunningServer) -> None:
    # Greedy, this answer begins "3 < 5": the stop " 5" ends it at "3 <". With tools the "<"
    # was dropped as the start of a call's tag ("3"), though what followed was the stop.
    body = {
        "messages": user("Is 3 < 5? Explain with a comparison like a < b."),
        "temperature": 0,
        "max_tokens": 50,
        "stop": [" 5"],
    }
    url = f"{server.url}/v1/chat/completions"
    for tools in ({}, {"tools": [WEATHER]}):
        choice = httpx.post(url, json={**body, **tools}, timeout=120).json()["choices"][0]
        assert (choice["message"]["content"], choice["finish_reason"]) == ("3 <", "stop"), tools
        with httpx.stream("POST", url, json={**body, **tools, "stream": True}, timeout=120) as r:
            events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
        text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events)
        assert (text, events[-1]["choices"][0]["finish_reason"]) == ("3 <", "stop"), tools


@pytest.mark.parametrize(
    "constraint",
    [{"guided_regex": r"[^\s\S]"}, {"structured_outputs": {"regex": r"a[^\s\S]"}}],
    ids=["nothing", "nothing after a"],
)
def test_a_grammar_that_matches_no_text_is_an_error_not_an_empty_stop(
    server: RunningServer, constraint: dict
) -> None:
    # llguidance leaves only the end token for it: that was "" with finish_reason "stop",
    # an answer that does not match the grammar.
    body = {"prompt": "Answer:", "max_tokens": 5, **constraint}
    r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=120)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "grammar_failed"


@pytest.mark.slow
def test_a_grammar_that_fails_while_generating_ends_in_an_error(server: RunningServer) -> None:
    # llguidance builds this pattern's lexer lazily and gives up on it after the first
    # token: the answer so far does not match, so it is an error, not a "stop".
    schema = {"type": "string", "pattern": "^a{1000000}$"}
    body = {
        "messages": user("Say a"),
        "max_tokens": 30,
        "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}},
    }
    url = f"{server.url}/v1/chat/completions"
    r = httpx.post(url, json=body, timeout=120)
    # The request's grammar, not the server, is at fault: a 400 that says so.
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "grammar_failed", error
    message = error["message"]
    assert "the grammar failed" in message and "\n" not in message, message
    with httpx.stream("POST", url, json={**body, "stream": True}, timeout=120) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert "the grammar failed" in json.loads(lines[-2][6:])["error"]["message"]
    assert lines[-1] == "data: [DONE]"


@pytest.mark.slow
def test_an_empty_answer_has_empty_logprobs(server: RunningServer) -> None:
    # The end-of-turn token first (logit_bias): no token, and logprobs [] rather than null.
    eos = {"2": 100}
    chat = {"messages": user("Hi"), "max_tokens": 5, "logprobs": True, "logit_bias": eos}
    r = httpx.post(f"{server.url}/v1/chat/completions", json=chat, timeout=120).json()
    assert r["choices"][0]["message"]["content"] == ""
    assert r["choices"][0]["logprobs"] == {"content": []}
    legacy = {"prompt": "Hi", "max_tokens": 5, "logprobs": 2, "logit_bias": eos}
    r = httpx.post(f"{server.url}/v1/completions", json=legacy, timeout=120).json()
    assert r["choices"][0]["text"] == "" and r["choices"][0]["logprobs"]["tokens"] == []


def assert_tokens_make_the_answer(tokens: list[ChatCompletionTokenLogprob], answer: str) -> None:
    """A token may hold part of a character (its text then shows U+FFFD): the tokens' bytes
    make the answer, but for a last character that max_tokens cut in two (left out of it)."""
    raw, whole = b"".join(bytes(t.bytes or []) for t in tokens), answer.encode()
    tail = raw[len(whole) :]
    assert raw.startswith(whole) and len(tail) < 4 and not tail.decode(errors="ignore")


def test_chat_logprobs_are_sorted_and_not_positive(client: OpenAI) -> None:
    out = client.chat.completions.create(
        model=MODEL,
        messages=user("Say hello."),
        max_tokens=6,
        logprobs=True,
        top_logprobs=5,
        seed=1,
    )
    content = out.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == out.usage.completion_tokens  # type: ignore[union-attr]
    assert_tokens_make_the_answer(content, out.choices[0].message.content or "")
    for token in content:
        assert token.logprob <= 0
        values = [t.logprob for t in token.top_logprobs]
        assert len(values) == 5 and values == sorted(values, reverse=True)
        assert all(v <= 0 for v in values)
        assert token.logprob >= values[-1] or token.token not in [
            t.token for t in token.top_logprobs
        ]


def test_streamed_logprobs_arrive_with_their_tokens(client: OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL,
        messages=user("Say hello."),
        max_tokens=8,
        logprobs=True,
        top_logprobs=2,
        temperature=0,
        stream=True,
    )
    text, tokens = "", []
    for chunk in stream:
        if chunk.choices and chunk.choices[0].logprobs:
            tokens += chunk.choices[0].logprobs.content or []
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
    assert len(tokens) == 8 or tokens  # EOS may end it early
    assert_tokens_make_the_answer(tokens, text)
    # Greedy: the sampled token is the most likely one.
    assert all(t.top_logprobs[0].logprob == pytest.approx(t.logprob) for t in tokens)


def test_completions_logprobs_legacy_shape(client: OpenAI) -> None:
    out = client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=4, logprobs=3, temperature=0
    )
    lp = out.choices[0].logprobs
    assert lp is not None and lp.tokens and lp.token_logprobs and lp.top_logprobs
    assert "".join(lp.tokens) == out.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    for value, top in zip(lp.token_logprobs, lp.top_logprobs, strict=True):
        assert value <= 0 and len(top) <= 3
        assert value == pytest.approx(max(top.values()))


def test_a_resumed_completions_stream_counts_text_offset_from_the_answers_start(
    server: RunningServer,
) -> None:
    # A resume replays what the reader missed: text_offset goes on from the text before it,
    # as in the whole answer, not from 0 again.
    body = {"model": MODEL, "prompt": "The history of Rome", "max_tokens": 10, "temperature": 0}
    body["logprobs"] = 1
    url = f"{server.url}/v1/completions"
    whole = httpx.post(url, json=body).json()["choices"][0]["logprobs"]["text_offset"]
    body |= {"stream": True, "stream_options": {"resumable": True, "flush_tokens": 1}}
    offsets: list[int] = []

    def read(es: EventSource, stop_after: int) -> str | None:
        last = None
        for sse in es.iter_sse():
            if sse.data == "[DONE]":
                break
            logprobs = json.loads(sse.data)["choices"][0]["logprobs"]
            offsets.extend(logprobs["text_offset"] if logprobs else [])
            last = sse.id
            if len(offsets) == stop_after:
                break
        return last

    with httpx.Client(timeout=300) as http:
        with connect_sse(http, "POST", url, json=body) as es:
            stream_id = es.response.headers["x-stream-id"]
            last = read(es, 4)
        resume = {"Last-Event-ID": str(last)}
        with connect_sse(http, "GET", f"{server.url}/v1/streams/{stream_id}", headers=resume) as es:
            read(es, -1)
    assert len(whole) == 10 and whole[4] > 0
    assert offsets == whole


@pytest.mark.slow
@pytest.mark.parametrize("logprobs", [0, 1])
def test_completions_top_logprobs_hold_each_token_itself(
    server: RunningServer, logprobs: int
) -> None:
    # OpenAI's legacy API "will always return the logprob of the sampled token, so there
    # may be up to logprobs+1 elements": for sampled tokens and echoed prompt tokens alike.
    body = {
        "prompt": "The capital of France is",
        "max_tokens": 8,
        "logprobs": logprobs,
        "echo": True,
        "temperature": 1,
        "seed": 3,
    }
    r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=120)
    lp = r.json()["choices"][0]["logprobs"]
    entries = list(zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"], strict=True))
    assert entries[0][2] is None
    for token, value, top in entries[1:]:
        assert top[token] == pytest.approx(value) and len(top) <= logprobs + 1
    # " capital" after "The" is not the model's first guess: both come back.
    assert len(entries[1][2]) == logprobs + 1


LOOKAHEAD = {"name": "x", "schema": {"type": "string", "pattern": "(?=a)b"}}
WEIRD_FORMAT = {"type": "object", "properties": {"a": {"type": "string", "format": "weird"}}}
NAMED_NOPE = {"type": "function", "function": {"name": "nope"}}


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"n": 9}, "n"),
        ({"foo": 1}, "foo"),
        (
            {"structured_outputs": {"whitespace_pattern": " "}},
            "structured_outputs.whitespace_pattern",
        ),
        ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
        ({"structured_outputs": {"regex": "(?=a)b"}}, "structured_outputs.regex"),
        ({"structured_outputs": {"grammar": "start: nope"}}, "structured_outputs.grammar"),
        ({"structured_outputs": {"json": "{"}}, "structured_outputs.json"),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "string", "pattern": "(?=a)b"}},
                }
            },
            "response_format",
        ),
        ({"response_format": {"type": "json_object"}, "guided_regex": "a+"}, "response_format"),
        ({"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias"),
        ({"logit_bias": {"99999999": 1}}, "logit_bias"),
        ({"stop_token_ids": [99999999]}, "stop_token_ids"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
        ),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"response_format": {"type": "json_object"}, "ignore_eos": True}, "ignore_eos"),
    ],
)
def test_fields_that_cannot_be_honoured_are_a_400_naming_them(
    server: RunningServer, body: dict, param: str
) -> None:
    r = httpx.post(
        f"{server.url}/v1/chat/completions",
        json={"messages": user("Hi"), "max_tokens": 4, **body},
        timeout=60,
    )
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and param in error["message"], error


def test_sdk_raises_on_unsupported_schema(client: OpenAI) -> None:
    with pytest.raises(BadRequestError, match="response_format"):
        client.chat.completions.create(
            model=MODEL,
            messages=user("Hi"),
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": WEIRD_FORMAT},
            },
        )


# --- property test: random schemas from a fixed supported subset ------------------------

_leaf = st.sampled_from(
    [
        {"type": "boolean"},
        {"type": "integer", "minimum": 0, "maximum": 99},
        {"type": "string", "maxLength": 6},
        {"type": "string", "enum": ["red", "green", "blue"]},
        {"type": "null"},
    ]
)
_names = st.sampled_from(["a", "name", "size", "ok", "tags"])


def _object(children: st.SearchStrategy) -> st.SearchStrategy:
    return st.dictionaries(_names, children, min_size=1, max_size=3).map(
        lambda props: {
            "type": "object",
            "properties": props,
            "required": sorted(props),
            "additionalProperties": False,
        }
    )


_schemas = st.recursive(
    _leaf,
    lambda children: st.one_of(
        _object(children),
        children.map(lambda item: {"type": "array", "items": item, "maxItems": 2}),
    ),
    max_leaves=4,
).filter(lambda s: s["type"] in ("object", "array"))


@settings(
    max_examples=6,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(schema=_schemas, seed=st.integers(0, 1000))
def test_every_output_of_a_random_schema_validates(
    server: RunningServer, schema: dict, seed: int
) -> None:
    body = {
        "messages": user("Reply with JSON."),
        "max_tokens": 80,
        "seed": seed,
        "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}},
    }
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "stop", choice
    jsonschema.validate(json.loads(choice["message"]["content"]), schema)


# --- n > 1 and echo on the real model ----------------------------------------------------


def test_n3_seeded_choices_differ_and_share_the_prompt(
    server: RunningServer, client: OpenAI
) -> None:
    hits = server.metric("tokenspout_prefix_cache_hits_total")
    computed = server.metric("tokenspout_prompt_tokens_total")
    kwargs = {
        "model": MODEL,
        "messages": user("Write one short sentence about the sea."),
        "max_tokens": 12,
        "temperature": 1.0,
        "seed": 11,
        "n": 3,
        "logprobs": True,
    }
    out = client.chat.completions.create(**kwargs)  # type: ignore[call-overload]
    texts = [c.message.content for c in out.choices]
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert len(set(texts)) == 3, texts  # choice i draws with seed + i
    # Usage: every choice's tokens (a stop token has no logprob but is counted).
    assert out.usage is not None
    counted = [len(c.logprobs.content) + (c.finish_reason == "stop") for c in out.choices]
    assert out.usage.completion_tokens == sum(counted)
    # The prompt was computed once: the two other choices copied it from the first and
    # computed only their last prompt token.
    assert server.metric("tokenspout_prefix_cache_hits_total") - hits >= 2
    prompt = out.usage.prompt_tokens
    assert server.metric("tokenspout_prompt_tokens_total") - computed <= prompt + 2


def test_n2_streamed_with_logprobs_on_each_choice(client: OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL,
        messages=user("Say hello."),
        max_tokens=5,
        n=2,
        logprobs=True,
        top_logprobs=2,
        stream=True,
        stream_options={"include_usage": True},
    )
    tokens: dict[int, int] = {0: 0, 1: 0}
    finish: dict[int, str | None] = {}
    usage = None
    for chunk in stream:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            if choice.logprobs and choice.logprobs.content:
                tokens[choice.index] += len(choice.logprobs.content)
            if choice.finish_reason:
                finish[choice.index] = choice.finish_reason
    assert all(tokens.values()), tokens
    # A choice that ended on the end-of-turn token generated it (usage counts it), but its
    # text and logprob are not part of the output. The choices are sampled: either ending
    # happens (this test failed once for assuming both always ran to max_tokens).
    ended = sum(1 for reason in finish.values() if reason == "stop")
    assert set(finish) == {0, 1} and set(finish.values()) <= {"stop", "length"}, finish
    assert usage is not None and usage.completion_tokens == sum(tokens.values()) + ended


def test_echo_with_logprobs_scores_the_prompt(client: OpenAI) -> None:
    prompt = "The capital of France is Paris"
    out = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=2, logprobs=2, echo=True, temperature=0
    )
    choice = out.choices[0]
    assert choice.text.startswith(prompt) and len(choice.text) > len(prompt)
    lp = choice.logprobs
    assert lp is not None and lp.tokens and lp.token_logprobs and lp.top_logprobs
    assert out.usage is not None
    n_prompt = out.usage.prompt_tokens
    assert len(lp.tokens) == n_prompt + out.usage.completion_tokens
    assert "".join(lp.tokens) == choice.text
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(v is not None and v <= 0 for v in lp.token_logprobs[1:])
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    # "Paris" after "The capital of France is" is likelier than the first words were.
    assert lp.token_logprobs[n_prompt - 1] > min(lp.token_logprobs[1 : n_prompt - 1])


def test_a_whole_context_is_scored_but_not_answered() -> None:
    # Evaluation harnesses score prompts truncated to the model's length (echo, max_tokens
    # 0): a prompt of exactly the context's 32 tokens was a 400 though nothing is generated.
    running, stop = _start(LLMEngine(None, max_num_seqs=1, max_model_len=32), ServerConfig())
    url = f"{running.url}/v1/completions"
    prompt = "The" + " cat" * 31  # 32 tokens
    try:
        body = {"prompt": prompt, "max_tokens": 0, "logprobs": 1, "echo": True}
        scored = httpx.post(url, json=body, timeout=120)
        assert scored.status_code == 200, scored.text
        answer = scored.json()
        assert answer["usage"] == {"prompt_tokens": 32, "completion_tokens": 0, "total_tokens": 32}
        values = answer["choices"][0]["logprobs"]["token_logprobs"]
        assert len(values) == 32 and values[0] is None and all(v <= 0 for v in values[1:])
        # The whole context fits but leaves no room for an answer ("prompt is 32 tokens;
        # the model's context is 32 tokens" alone read as if it should fit).
        for refused, why in (
            ({**body, "max_tokens": 1}, "no room for an answer"),
            ({"prompt": prompt}, "no room for an answer"),
            ({"prompt": prompt + " cat"}, "which it exceeds"),
        ):
            answer = httpx.post(url, json=refused, timeout=120)
            assert answer.status_code == 400, refused
            error = answer.json()["error"]
            assert error["code"] == "context_length_exceeded" and why in error["message"], error
    finally:
        stop()


def test_echo_with_max_tokens_0_is_the_prompt_alone_scored(server: RunningServer) -> None:
    prompt = "The capital of France is Paris"
    body = {"prompt": prompt, "max_tokens": 0, "logprobs": 1, "echo": True}
    first = httpx.post(f"{server.url}/v1/completions", json=body, timeout=120).json()
    choice = first["choices"][0]
    assert choice["text"] == prompt and choice["finish_reason"] == "length"
    assert first["usage"]["completion_tokens"] == 0
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == first["usage"]["prompt_tokens"]
    # The same prompt again (its KV now in the prefix cache) scores the same: computed whole.
    again = httpx.post(f"{server.url}/v1/completions", json=body, timeout=120).json()
    values = again["choices"][0]["logprobs"]["token_logprobs"]
    assert values[0] is None and values[1:] == pytest.approx(lp["token_logprobs"][1:], abs=1e-5)
    refused = httpx.post(
        f"{server.url}/v1/completions", json={"prompt": prompt, "max_tokens": 0}, timeout=60
    )
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "max_tokens"
