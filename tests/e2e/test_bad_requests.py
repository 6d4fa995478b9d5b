"""A battery of malformed requests: each gets a 4xx OpenAI-style JSON error that says what to
fix, and the server keeps serving."""

from __future__ import annotations

import gzip
import json
import random
from collections.abc import Callable

import httpx
import pytest

from tests.conftest import RunningServer
from tokenspout.engine.synthetic_engine import SyntheticEngine

MSG = [{"role": "user", "content": "hi"}]

CASES: list[tuple[str, str, object, int, str]] = [
    # name, path, body (bytes = raw), status, text the message must contain
    ("malformed json", "/v1/chat/completions", b'{"messages": [', 400, "not valid JSON"),
    (
        "NaN",
        "/v1/completions",
        b'{"prompt": "x", "temperature": NaN}',
        400,
        "NaN is not a JSON value",
    ),
    ("body not an object", "/v1/chat/completions", b"[1, 2]", 400, "JSON object"),
    (
        "an integer too long to read (Python's 4300 digits): was a 500, then quoted Python",
        "/v1/completions",
        b'{"prompt": "x", "seed": ' + b"9" * 5000 + b"}",
        400,
        "request body holds an integer literal too long to read (over 4300 digits)",
    ),
    ("not utf-8", "/v1/chat/completions", b"\xff\xfe{}", 400, "not valid JSON"),
    ("messages missing", "/v1/chat/completions", {}, 400, "messages"),
    ("messages empty", "/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("messages wrong type", "/v1/chat/completions", {"messages": "hi"}, 400, "messages"),
    (
        "unknown role",
        "/v1/chat/completions",
        {"messages": [{"role": "wizard", "content": "x"}]},
        400,
        "role",
    ),
    ("content missing", "/v1/chat/completions", {"messages": [{"role": "user"}]}, 400, "content"),
    (
        "max_tokens zero",
        "/v1/chat/completions",
        {"messages": MSG, "max_tokens": 0},
        400,
        "max_tokens",
    ),
    (
        "max_tokens negative",
        "/v1/chat/completions",
        {"messages": MSG, "max_tokens": -3},
        400,
        "max_tokens",
    ),
    (
        "max_tokens string",
        "/v1/chat/completions",
        {"messages": MSG, "max_tokens": "5"},
        400,
        "max_tokens",
    ),
    (
        "max_tokens float",
        "/v1/chat/completions",
        {"messages": MSG, "max_tokens": 2.5},
        400,
        "max_tokens",
    ),
    (
        "max_tokens over limit",
        "/v1/chat/completions",
        {"messages": MSG, "max_tokens": 10**6},
        400,
        "at most",
    ),
    (
        "temperature too high",
        "/v1/chat/completions",
        {"messages": MSG, "temperature": 7},
        400,
        "temperature",
    ),
    (
        "temperature string",
        "/v1/chat/completions",
        {"messages": MSG, "temperature": "hot"},
        400,
        "temperature",
    ),
    ("top_p zero", "/v1/chat/completions", {"messages": MSG, "top_p": 0}, 400, "top_p"),
    ("n nine", "/v1/chat/completions", {"messages": MSG, "n": 9}, 400, "n:"),
    ("n zero", "/v1/completions", {"prompt": "hi", "n": 0}, 400, "n:"),
    (
        "n resumable",
        "/v1/chat/completions",
        {"messages": MSG, "n": 2, "stream": True, "stream_options": {"resumable": True}},
        400,
        "n > 1 is not resumable",
    ),
    ("stream not bool", "/v1/chat/completions", {"messages": MSG, "stream": "yes"}, 400, "stream"),
    ("stop empty", "/v1/chat/completions", {"messages": MSG, "stop": [""]}, 400, "stop"),
    (
        "flush_tokens zero",
        "/v1/chat/completions",
        {"messages": MSG, "stream_options": {"flush_tokens": 0}},
        400,
        "flush_tokens",
    ),
    ("logprobs", "/v1/chat/completions", {"messages": MSG, "logprobs": True}, 400, "logprobs"),
    ("prompt too long", "/v1/completions", {"prompt": "word " * 30_000}, 400, "limit"),
    ("prompt missing", "/v1/completions", {"max_tokens": 3}, 400, "prompt"),
    ("prompt list of two", "/v1/completions", {"prompt": ["a", "b"]}, 400, "one prompt"),
    ("prompt number", "/v1/completions", {"prompt": 12}, 400, "prompt"),
    ("empty prompt", "/v1/completions/stream", {"prompt": "   "}, 400, "word"),
    ("unknown model", "/v1/chat/completions", {"messages": MSG, "model": "nope"}, 404, "served"),
    ("unknown route", "/v1/nothing", {}, 404, "Not Found"),
    ("unknown stream", "/v1/streams/nope/cancel", {}, 404, "nope"),
]


@pytest.mark.parametrize(
    ("path", "body", "status", "text"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_request(
    synthetic_server: RunningServer, path: str, body: object, status: int, text: str
) -> None:
    url = synthetic_server.url + path
    if isinstance(body, bytes):
        r = httpx.post(url, content=body, headers={"content-type": "application/json"})
    else:
        r = httpx.post(url, json=body)
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    error = r.json()["error"]
    assert set(error) >= {"message", "type", "code"}
    assert text in error["message"]
    ok = httpx.post(
        f"{synthetic_server.url}/v1/completions", json={"prompt": "alive", "max_tokens": 1}
    )
    assert ok.json()["choices"][0]["text"] == "alive "


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", "0.5"),
        ("temperature", True),
        ("top_p", "0.5"),
        ("presence_penalty", "1"),
        ("frequency_penalty", True),
        ("min_p", "0.1"),
        ("repetition_penalty", "1.1"),
        ("logit_bias.5", {"5": "1"}),
        ("stream_options.flush_ms", {"flush_ms": "5"}),
    ],
)
def test_a_number_field_takes_no_string_or_boolean(
    synthetic_server: RunningServer, field: str, value: object
) -> None:
    """``field``: the param, the whole path to the number (a key's too)."""
    body = {"messages": MSG, "max_tokens": 1, "stream": True, field.split(".")[0]: value}
    r = httpx.post(f"{synthetic_server.url}/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == field and "valid number" in error["message"], error


def test_an_integer_is_a_number(synthetic_server: RunningServer) -> None:
    # As in OpenAI: 1 is as good as 1.0 for a float field.
    body = {"messages": MSG, "max_tokens": 1, "temperature": 1, "top_p": 1, "stream": True}
    r = httpx.post(
        f"{synthetic_server.url}/v1/chat/completions",
        json={**body, "stream_options": {"flush_ms": 5}},
    )
    assert r.status_code == 200, r.text


def test_top_k_takes_minus_one_or_more(synthetic_server: RunningServer) -> None:
    # As vLLM: -1 (or 0) samples from every token; below that is a mistake, not "all".
    url = f"{synthetic_server.url}/v1/chat/completions"
    r = httpx.post(url, json={"messages": MSG, "max_tokens": 1, "top_k": -5})
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_k", r.text
    for k in (-1, 0, 3):
        ok = httpx.post(url, json={"messages": MSG, "max_tokens": 1, "top_k": k})
        assert ok.status_code == 200, (k, ok.text)


@pytest.mark.parametrize(
    ("text", "why"),
    [("x" * 41, "characters"), ("a b c d e f g h", "context")],
    ids=["over the characters", "over the context"],
)
def test_a_prompt_too_long_names_the_field_it_came_in(
    start_server: Callable[..., RunningServer], text: str, why: str
) -> None:
    # Chat has no prompt field: its prompt is the messages.
    server = start_server(SyntheticEngine(max_model_len=8), max_prompt_chars=40)
    for path, body, param in (
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": text}]}, "messages"),
        ("/v1/completions", {"prompt": text}, "prompt"),
        ("/v1/completions/stream", {"prompt": text}, "prompt"),
    ):
        r = httpx.post(server.url + path, json={**body, "max_tokens": 1})
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == param and why in error["message"], (path, error)


@pytest.mark.parametrize("key", ["\u00b2", "\u0661", "-1", "1.0", " 1"])
def test_a_logit_bias_key_is_ascii_digits(synthetic_server: RunningServer, key: str) -> None:
    # "²" and "١" are str.isdigit() but not token ids: the first was a 500 (int() refused
    # it), the second read as token 1.
    body = {"messages": MSG, "max_tokens": 1, "logit_bias": {key: 1}}
    for path, prompt in (("/v1/chat/completions", {}), ("/v1/completions", {"prompt": "a"})):
        fields = {k: v for k, v in body.items() if not prompt or k != "messages"}
        r = httpx.post(synthetic_server.url + path, json={**fields, **prompt})
        assert r.status_code == 400, (path, r.text)
        assert r.json()["error"]["param"] == "logit_bias", (path, r.text)


def test_max_completion_tokens_errors_name_it(
    start_server: Callable[..., RunningServer],
) -> None:
    server = start_server(
        SyntheticEngine(max_model_len=64), max_tokens_limit=64, default_max_tokens=16
    )
    for value, why in ((70, "allows at most"), (64, "context")):
        for field in ("max_completion_tokens", "max_tokens"):
            body = {"messages": MSG, field: value}
            r = httpx.post(server.url + "/v1/chat/completions", json=body)
            assert r.status_code == 400, r.text
            error = r.json()["error"]
            assert error["param"] == field and field in error["message"], error
            assert why in error["message"], error


def test_a_tool_takes_an_object_of_arguments(synthetic_server: RunningServer) -> None:
    # A call's arguments are a JSON object: an assistant message with others is refused, so
    # a tool whose arguments were a string could be called but never answered.
    tool = {"type": "function", "function": {"name": "say", "parameters": {"type": "string"}}}
    body = {"messages": MSG, "max_tokens": 1, "tools": [tool]}
    r = httpx.post(f"{synthetic_server.url}/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"].startswith("tools") and "object" in error["message"], error


CALL = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
CALLED = [*MSG, {"role": "assistant", "tool_calls": [CALL]}]


@pytest.mark.parametrize(
    ("messages", "param"),
    [
        ([*CALLED, {"role": "tool", "content": "r"}], "messages[2].tool_call_id"),
        (
            [*CALLED, {"role": "tool", "content": "r", "tool_call_id": "c2"}],
            "messages[2].tool_call_id",
        ),
        (
            [*MSG, {"role": "tool", "content": "r", "tool_call_id": "c1"}],
            "messages[1].tool_call_id",
        ),
        ([{"role": "user", "content": "hi", "tool_call_id": "c1"}], "messages[0].tool_call_id"),
    ],
    ids=["no tool_call_id", "unknown call", "no call before", "not a tool message"],
)
def test_a_tool_message_answers_an_earlier_call(
    synthetic_server: RunningServer, messages: list[dict], param: str
) -> None:
    r = httpx.post(f"{synthetic_server.url}/v1/chat/completions", json={"messages": messages})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.text
    answered = [*CALLED, {"role": "tool", "content": "r", "tool_call_id": "c1"}]
    ok = {"messages": answered, "max_tokens": 1}
    assert httpx.post(f"{synthetic_server.url}/v1/chat/completions", json=ok).status_code == 200


@pytest.mark.parametrize("seed", [2**63, 2**64, -(2**63) - 1])
def test_a_seed_beyond_64_bits_is_a_400_naming_it(
    synthetic_server: RunningServer, seed: int
) -> None:
    # The real engine's generator took it and failed: a 500.
    url = synthetic_server.url
    requests = [
        httpx.post(f"{url}/v1/chat/completions", json={"messages": MSG, "seed": seed}),
        httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "seed": seed}),
        httpx.post(f"{url}/v1/completions/stream", json={"prompt": "hi", "seed": seed}),
        httpx.get(f"{url}/v1/completions/stream", params={"prompt": "hi", "seed": str(seed)}),
    ]
    for r in requests:
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == "seed", r.text


@pytest.mark.parametrize("seed", [2**63 - 1, -(2**63)])
def test_the_extreme_seeds_are_served_with_several_choices(
    synthetic_server: RunningServer, seed: int
) -> None:
    body = {"prompt": "hi", "max_tokens": 1, "seed": seed, "n": 3}
    r = httpx.post(f"{synthetic_server.url}/v1/completions", json=body)
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == 3


def test_a_body_with_a_content_encoding_is_a_415_naming_it(synthetic_server: RunningServer) -> None:
    """Regression: a gzipped body was read as if plain (a 400 "not valid JSON: 'utf-8' codec
    can't decode byte 0x8b"), and a plain body marked gzip was served."""
    url = f"{synthetic_server.url}/v1/completions"
    body = json.dumps({"prompt": "hi", "max_tokens": 1}).encode()
    for content, encoding in ((gzip.compress(body), "gzip"), (body, "gzip"), (body, "br")):
        headers = {"content-type": "application/json", "content-encoding": encoding}
        r = httpx.post(url, content=content, headers=headers)
        assert r.status_code == 415, r.text
        error = r.json()["error"]
        assert error["param"] == "Content-Encoding"
        assert f"Content-Encoding {encoding} is not supported" in error["message"]
    headers = {"content-type": "application/json", "content-encoding": "identity"}
    assert httpx.post(url, content=body, headers=headers).status_code == 200


def test_wrong_method_and_huge_body(synthetic_server: RunningServer) -> None:
    r = httpx.get(f"{synthetic_server.url}/v1/chat/completions")
    assert r.status_code == 405 and "error" in r.json()
    assert r.headers["allow"] == "POST"
    r = httpx.post(
        f"{synthetic_server.url}/v1/chat/completions",
        content=b"x" * (2 << 20),
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 413 and "larger than" in r.json()["error"]["message"]
    assert synthetic_server.metric("tokenspout_requests_running") == 0


def test_a_405_names_every_method_of_the_path_and_head_is_a_get(
    synthetic_server: RunningServer,
) -> None:
    url = synthetic_server.url
    # The seed's URL takes GET and POST: Starlette's 405 named the first route's alone.
    r = httpx.put(f"{url}/v1/completions/stream")
    assert r.status_code == 405 and r.headers["allow"] == "GET, POST"
    assert httpx.delete(f"{url}/health").headers["allow"] == "GET, HEAD"
    # HEAD answers as GET without a body (uptime checks: curl -I), but never generates.
    for path in ("/health", "/v1/models", "/", "/static/tokenspout.js"):
        head, get = httpx.head(url + path), httpx.get(url + path)
        assert head.status_code == get.status_code == 200, path
        assert head.content == b"" and head.headers["content-type"] == get.headers["content-type"]
    r = httpx.head(f"{url}/v1/completions/stream", params={"prompt": "a"})
    assert r.status_code == 405 and r.headers["allow"] == "GET, POST"
    assert synthetic_server.metric("tokenspout_prompt_tokens_total") == 0  # nothing ran


@pytest.mark.parametrize("extra", ["stop=%20", "n=3", "logprobs=5", "echo=true", "bogus=1"])
def test_stream_url_refuses_a_parameter_it_does_not_take(
    synthetic_server: RunningServer, extra: str
) -> None:
    url = f"{synthetic_server.url}/v1/completions/stream?prompt=hi&max_tokens=2&{extra}"
    r = httpx.get(url)
    name = extra.split("=")[0]
    assert r.status_code == 400 and r.json()["error"]["param"] == name, r.text
    assert httpx.get(url.replace(f"&{extra}", "&api_key=&flush_ms=0")).status_code == 200


@pytest.mark.parametrize("value", ["nan", "NaN", "inf", "-inf", "1e999", "x"])
def test_stream_url_refuses_what_is_not_a_finite_number(
    synthetic_server: RunningServer, value: str
) -> None:
    """``float`` reads "nan" and "inf": a NaN temperature was refused as "less than or equal
    to 2", and ``1e999`` is infinite."""
    url = f"{synthetic_server.url}/v1/completions/stream?prompt=hi&temperature={value}"
    error = httpx.get(url).json()["error"]
    assert error["param"] == "temperature"
    assert error["message"] == f"temperature: {value!r} is not a valid float"


JUNK: list[object] = [
    None,
    True,
    -1,
    0,
    2**63,
    1e308,
    -0.5,
    "",
    "x" * 5000,
    [],
    [None],
    {},
    {"a": 1},
]
VALID = {
    "messages": [{"role": "user", "content": "ok"}],
    "max_tokens": 3,
    "temperature": 0.5,
    "top_p": 0.9,
    "stop": ["zz"],
    "stream": True,
    "stream_options": {"include_usage": True, "flush_tokens": 2},
}


def mutations(count: int, seed: int) -> list[dict]:
    """Valid bodies with one or two fields replaced by junk or removed (fixed seed)."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        body = json.loads(json.dumps(VALID))
        for _ in range(rng.randint(1, 2)):
            key = rng.choice([*body, "messages.0.role", "messages.0.content"])
            if key.startswith("messages.0."):
                target = body["messages"][0] if isinstance(body.get("messages"), list) else {}
                target[key.split(".")[-1]] = rng.choice(JUNK)
            elif rng.random() < 0.2:
                body.pop(key, None)
            else:
                body[key] = rng.choice(JUNK)
        out.append(body)
    return out


def test_random_mutations_never_crash_or_leak(synthetic_server: RunningServer) -> None:
    with httpx.Client(base_url=synthetic_server.url) as client:
        for body in mutations(150, seed=7):
            r = client.post("/v1/chat/completions", json=body)
            assert r.status_code in (200, 400, 404, 413), (body, r.status_code, r.text)
            if r.status_code != 200:
                assert "message" in r.json()["error"]
    synthetic_server.wait_metric("tokenspout_requests_running", 0)
    assert synthetic_server.metric("tokenspout_streams_active") == 0


def test_a_message_error_names_the_message_by_its_index(synthetic_server: RunningServer) -> None:
    body = {"messages": [*MSG, {"role": "assistant", "content": None}], "max_tokens": 1}
    r = httpx.post(f"{synthetic_server.url}/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "messages[1].content"
    assert error["message"] == "messages[1] (an assistant message) needs content"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        # The tagged union's tag was repeated: response_format.json_schema.json_schema.
        (
            {"response_format": {"type": "json_schema"}},
            "response_format.json_schema: Field required",
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "s", "x": 1}}},
            "response_format.json_schema.x: Extra inputs are not permitted",
        ),
        # A union's member types were in the path too: messages[0].content.str.
        (
            {"messages": [{"role": "user", "content": 1}]},
            "messages[0].content: Input should be a valid string; "
            "messages[0].content: Input should be a valid list",
        ),
        (
            {"tool_choice": {"type": "function", "function": {}}},
            "tool_choice: Input should be 'none', 'auto' or 'required'; "
            "tool_choice.function.name: Field required",
        ),
    ],
)
def test_a_validation_error_names_the_fields_of_the_body(
    synthetic_server: RunningServer, fields: dict[str, object], message: str
) -> None:
    body = {"messages": MSG, **fields}
    r = httpx.post(f"{synthetic_server.url}/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["message"] == message


@pytest.mark.parametrize(
    ("path", "body", "param", "message"),
    [
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": [
                {"type": "text", "text": "What is it?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]},
            "messages[0].content[1]",
            'messages[0].content[1]: content parts of type "image_url" are not supported: '
            "the model reads text only",
        ),
        (
            "/v1/chat/completions",
            {"messages": [*MSG, {"role": "user", "content": [
                {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}]}]},
            "messages[1].content[0]",
            'messages[1].content[0]: content parts of type "input_audio" are not supported: '
            "the model reads text only",
        ),
        (
            "/tokenize",
            {"messages": [{"role": "user", "content": [{"type": "file", "file": {}}]}]},
            "messages[0].content[0]",
            'messages[0].content[0]: content parts of type "file" are not supported: '
            "the model reads text only",
        ),
        (
            "/v1/completions",
            {"prompt": [1, 2, 3]},
            "prompt",
            "token-id prompts are not supported: send the prompt as text",
        ),
        (
            "/v1/completions",
            {"prompt": [[1, 2, 3]]},
            "prompt",
            "token-id prompts are not supported: send the prompt as text",
        ),
    ],
    ids=["image_url", "input_audio", "file to /tokenize", "token ids", "a list of token ids"],
)  # fmt: skip
def test_content_the_model_cannot_read_is_refused_in_one_message_naming_it(
    synthetic_server: RunningServer, path: str, body: dict, param: str, message: str
) -> None:
    """It was pydantic's mismatch with each member of the union ("Input should be a valid
    string; ...type: Input should be 'text'; ...text: Field required; ...")."""
    r = httpx.post(f"{synthetic_server.url}{path}", json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert (error["message"], error["param"]) == (message, param)
    assert error["type"] == "invalid_request_error"
