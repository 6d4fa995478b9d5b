"""Properties of the framing: any text round-trips through SSE or NDJSON framing and the
client's parser (httpx-sse, then ``chunk_reader``), whatever it holds: CR, LF, ``data:``,
``[DONE]``, NUL, emoji. Text that is not valid Unicode never reaches framing: it is refused
when the request is parsed."""

from __future__ import annotations

import json

import httpx
import pytest
from httpx_sse import EventSource
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenspout.client.chunk_reader import StreamResult, read_event
from tokenspout.errors import InvalidRequestError
from tokenspout.protocols.json_limits import loads
from tokenspout.protocols.json_text import dumps
from tokenspout.protocols.ndjson import NDJSONFraming
from tokenspout.protocols.sse import SSEFraming, encode_event

# Valid Unicode text (no lone surrogates: category Cs), biased towards framing characters.
PIECES = st.one_of(
    st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=10),
    st.sampled_from(["\r", "\n", "\r\n", "data:", "id:", ": ", "[DONE]", "\0", "😀"]),
)
TEXT = st.lists(PIECES, max_size=12).map("".join)
LONE = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)


def sse_events(body: bytes) -> list[str]:
    response = httpx.Response(200, headers={"content-type": "text/event-stream"}, content=body)
    return [event.data for event in EventSource(response).iter_sse()]


@given(text=TEXT)
@settings(max_examples=150, deadline=None)
def test_any_text_round_trips_through_sse_chunks_and_the_client(text: str) -> None:
    chunk = {"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}
    body = SSEFraming.event(dumps(chunk), id="abc:1") + SSEFraming.done()
    result = StreamResult()
    got = "".join(read_event(result, data) for data in sse_events(body))
    assert got == text


@given(text=TEXT)
@settings(max_examples=150, deadline=None)
def test_raw_sse_data_round_trips_up_to_line_ends(text: str) -> None:
    # Raw data (not JSON): SSE has no escape, so CR LF and CR come back as LF.
    (data,) = sse_events(encode_event(text, event="x"))
    assert data == text.replace("\r\n", "\n").replace("\r", "\n")


@given(texts=st.lists(TEXT, min_size=1, max_size=5))
@settings(max_examples=200, deadline=None)
def test_any_text_round_trips_through_ndjson(texts: list[str]) -> None:
    body = b"".join(NDJSONFraming.event(dumps({"token": t})) for t in texts)
    body += NDJSONFraming.heartbeat()
    lines = [line for line in body.decode("utf-8").split("\n") if line]
    assert [json.loads(line)["token"] for line in lines] == texts


@given(before=TEXT, lone=LONE, after=TEXT)
@settings(max_examples=200, deadline=None)
def test_lone_surrogates_are_refused_at_parse_time(before: str, lone: str, after: str) -> None:
    text = before + lone + after
    body = json.dumps({"messages": [{"role": "user", "content": text}]})
    if "\ud800" <= lone <= "\udbff" and after[:1] and "\udc00" <= after[0] <= "\udfff":
        return  # a high then a low surrogate escape is a valid pair, not a lone one
    with pytest.raises(InvalidRequestError) as info:
        loads(body, "request body")
    assert info.value.param == "messages[0].content"
