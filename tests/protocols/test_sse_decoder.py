"""Reading SSE ``data`` from bytes as they arrive (WHATWG HTML 9.2.6): every way of cutting
a stream into reads gives the same events; line ends, comments, fields, multi-line data."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tokenspout.protocols.sse import encode_comment, encode_event
from tokenspout.protocols.sse_decoder import EventTooLargeError, SSEDataDecoder


def decode(*reads: bytes) -> list[bytes]:
    decoder = SSEDataDecoder()
    return [data for read in reads for data in decoder.feed(read)]


@pytest.mark.parametrize(
    ("stream", "events"),
    [
        (b"data: a\n\n", [b"a"]),
        (b"data: a\n\ndata: b\n\n", [b"a", b"b"]),
        (b"id: s:1\ndata: {}\n\n", [b"{}"]),
        (b"event: x\nid: 1\nretry: 5\ndata: a\n\n", [b"a"]),
        (b"data: a\r\n\r\ndata: b\r\n\r\n", [b"a", b"b"]),
        (b"data: a\r\rdata: b\r\r", [b"a", b"b"]),
        (b"data: a\ndata: b\n\n", [b"a\nb"]),
        (b"data: a\r\ndata:\r\ndata: c\r\n\r\n", [b"a\n\nc"]),
        (b": ping\n\ndata: a\n\n", [b"a"]),
        (b": ping\ndata: a\n: more\n\n", [b"a"]),
        (b"data:a\n\n", [b"a"]),
        (b"data:  two spaces\n\n", [b" two spaces"]),
        (b"data\n\n", [b""]),
        (b"data:\n\n", [b""]),
        (b"id: 7\n\n", []),
        (b"event: ping\n\ndata: a\n\n", [b"a"]),
        (b"datum: a\n\n", []),
        (b"\n\n\ndata: a\n\n\n\n", [b"a"]),
        (b"data: a: b\n\n", [b"a: b"]),
        (b"data: a\n\ndata: never ended\n", [b"a"]),
        (b"\xef\xbb\xbfdata: a\n\n", [b"a"]),
        (b"data: \xef\xbb\xbf\n\n", [b"\xef\xbb\xbf"]),
        ("data: é ☃\n\n".encode(), ["é ☃".encode()]),
    ],
)
def test_events(stream: bytes, events: list[bytes]) -> None:
    assert decode(stream) == events


@pytest.mark.parametrize(
    "reads",
    [
        [b"data: a\r", b"\n\r\n"],
        [b"data: a\r\n\r", b"\n"],
        [b"data: a\r", b"\r"],
        [b"data: a\n", b"\n"],
        [b"da", b"ta: a", b"\n", b"\n"],
        [b"\xef", b"\xbb", b"\xbfdata: a\n\n"],
    ],
)
def test_event_split_across_reads(reads: list[bytes]) -> None:
    assert decode(*reads) == [b"a"]


def test_a_cr_ending_one_read_is_not_an_lf_starting_the_next_twice() -> None:
    # "a\r" + "\n" is one line end: the event is not over until a second one.
    decoder = SSEDataDecoder()
    assert decoder.feed(b"data: a\r") == []
    assert decoder.feed(b"\n") == []
    assert decoder.feed(b"data: b\n\n") == [b"a\nb"]


def test_the_bom_is_skipped_only_at_the_start() -> None:
    assert decode(b"data: a\n\n", b"\xef\xbb\xbfdata: b\n\n") == [b"a"]  # not a field "data"


def test_a_malformed_chunk_comes_out_as_it_came() -> None:
    # Whether the data is JSON is the relay's business (a malformed chunk fails over).
    assert decode(b"data: {not json\n\ndata: [DONE]\n\n") == [b"{not json", b"[DONE]"]


payloads = st.lists(
    st.text(st.characters(blacklist_categories=["Cs"]), max_size=30), min_size=1, max_size=8
)


@given(payloads, st.sampled_from([b"\n", b"\r\n", b"\r"]), st.data())
def test_any_cut_of_an_encoded_stream_gives_its_events(
    texts: list[str], eol: bytes, data: st.DataObject
) -> None:
    """What tokenspout's own encoder writes (multi-line data, ids, comments between events),
    with any line ending and cut into reads anywhere, decodes to the same payloads."""
    stream = b"".join(
        encode_comment() + encode_event(json.dumps(t, ensure_ascii=False), id=f"s:{i}")
        for i, t in enumerate(texts)
    )
    stream = stream.replace(b"\n", eol)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    reads = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    assert [json.loads(d) for d in decode(*reads)] == texts


@given(st.lists(st.text(max_size=20).map(lambda s: s.replace("\r", "")), min_size=1, max_size=5))
def test_multi_line_data_is_joined_with_lf(lines: list[str]) -> None:
    text = "\n".join(lines)
    assert decode(encode_event(text)) == [text.encode()]


def test_an_event_that_never_ends_is_refused_past_the_limit_not_kept() -> None:
    """An upstream's ``data:`` line that never ends was kept without bound (50-63 MB per
    try, each read joined to all of it); past the limit it is an error, the relay's
    malformed upstream. An event of the limit's length is still taken, in any reads."""
    decoder = SSEDataDecoder(max_event_bytes=64)
    assert decoder.feed(b"data: " + b"x" * 50) == []
    assert decoder.feed(b"x" * 6 + b"\n\n") == [b"x" * 56]
    decoder.feed(b"data: " + b"y" * 50)
    with pytest.raises(EventTooLargeError, match="longer than 64 bytes"):
        decoder.feed(b"y" * 9)
    # Several events in one read are no event too long: only what is not yet ended counts.
    assert SSEDataDecoder(max_event_bytes=16).feed(b"data: 123456\n\n" * 5) == [b"123456"] * 5
