"""What goes to Redis comes back the same: chunks (with extras) and stream records."""

from __future__ import annotations

from tokenspout.cluster.chunk_codec import decode_chunks, encode_chunks
from tokenspout.cluster.stream_record import StreamRecord
from tokenspout.engine.request import OutputExtras, TokenLogprob, ToolCallDelta
from tokenspout.protocols.stream_wire import StreamWire
from tokenspout.streaming.stream_store import Chunk


def test_chunks_with_and_without_extras_round_trip() -> None:
    extras = OutputExtras(
        TokenLogprob("é", "é".encode(), -0.25, (("é", b"\xc3\xa9", -0.25), ("e", b"e", -2.0))),
        (ToolCallDelta(0, "call_1", "get", '{"a": '),),
    )
    chunks = [
        Chunk("Ünï 😀\n", 2, 9),
        Chunk("data: x\r", 1, 8, extras),
        Chunk("", 1, 0),
        Chunk(" Paris", 1, 6, None, 7042),  # the embedded engine's token id
        Chunk("é", 1, 2, extras, 0),
        # An upstream's reasoning and refusal pieces: a resume replays them.
        Chunk("", 1, 0, OutputExtras(reasoning="Let me think\n")),
        Chunk("", 1, 0, OutputExtras(refusal="I can't help with that.")),
        Chunk("Hi", 1, 2, extras._replace(reasoning="ok", refusal="no")),
    ]
    decoded = decode_chunks(encode_chunks(chunks))
    assert decoded == [(c.text, c.num_tokens, c.extras, c.token_id) for c in chunks]


def test_stream_record_round_trips_through_hash_fields() -> None:
    record = StreamRecord(
        "abc",
        StreamWire(
            "chat",
            "synthetic",
            include_usage=True,
            continuous_usage=True,
            logprobs=True,
            flush_tokens=1,
            flush_ms=0.0,
        ),
        key="alice",
        replica="r1",
        created=1234.5,
        prompt_tokens=7,
        body='{"messages": []}',
        cancelled=True,
    )
    raw = {k.encode(): v.encode() for k, v in record.fields().items()}
    assert StreamRecord.from_fields("abc", raw) == record
    # A record written before the stream kept its coalescing: the server's.
    del raw[b"flush_tokens"], raw[b"flush_ms"]
    wire = StreamRecord.from_fields("abc", raw).wire
    assert wire.flush_tokens is None and wire.flush_ms is None
