"""Properties of the request parsers: whatever JSON (or not) arrives, the answer is a
validated body or an ``InvalidRequestError`` that says what is wrong; never another
exception (a 500) and never a hang."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from tokenspout.errors import InvalidRequestError
from tokenspout.protocols.json_limits import loads
from tokenspout.protocols.websocket_messages import parse_client_message
from tokenspout.server.request_parsing import validate
from tokenspout.server.schemas import ChatCompletionRequest, CompletionRequest, SeedStreamRequest

SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False),
    st.text(),
)
JSON = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=30,
)
FIELDS = st.sampled_from(
    ["messages", "prompt", "role", "content", "type", "text", "max_tokens", "stop",
     "temperature", "top_p", "stream", "stream_options", "logit_bias", "n", "seed", "id"]
)  # fmt: skip
BODIES = st.one_of(
    JSON,
    st.dictionaries(FIELDS, JSON, max_size=6),
    st.fixed_dictionaries(
        {"messages": st.lists(st.dictionaries(FIELDS, JSON, max_size=3), max_size=3)}
    ),
)


def _parse(raw: str, model: Any) -> None:
    try:
        validate(model, loads(raw, "request body"))
    except InvalidRequestError as err:
        assert err.message and err.status_code == 400


@given(body=BODIES)
@settings(max_examples=200, deadline=None)
def test_any_json_body_validates_or_is_a_400(body: Any) -> None:
    raw = json.dumps(body)
    for model in (ChatCompletionRequest, CompletionRequest, SeedStreamRequest):
        _parse(raw, model)


@given(raw=st.one_of(st.text(), st.binary().map(lambda b: b.decode("latin-1"))))
@settings(max_examples=150, deadline=None)
def test_any_bytes_parse_or_are_a_400(raw: str) -> None:
    _parse(raw, ChatCompletionRequest)


@given(
    body=st.one_of(BODIES, st.dictionaries(FIELDS, JSON).map(lambda d: {**d, "type": "generate"}))
)
@settings(max_examples=150, deadline=None)
def test_any_websocket_message_parses_or_is_an_error(body: Any) -> None:
    try:
        parse_client_message(json.dumps(body))
    except InvalidRequestError as err:
        assert err.message


@given(depth=st.integers(min_value=33, max_value=200_000), opener=st.sampled_from("[{"))
@settings(max_examples=30, deadline=None)
def test_nesting_beyond_the_limit_is_a_400(depth: int, opener: str) -> None:
    raw = ('{"a":' * depth + "1" + "}" * depth) if opener == "{" else "[" * depth + "]" * depth
    try:
        loads(raw, "request body")
    except InvalidRequestError as err:
        assert "nested" in err.message
    else:
        raise AssertionError("accepted")
