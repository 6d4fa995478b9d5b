"""A client that stops reading is cut off after the send timeout, and while it is stuck the
engine is held back instead of our memory filling up."""

from __future__ import annotations

import time

from tests.conftest import RunningServer
from tests.e2e.test_disconnect import most_tokens_unread, open_raw_stream
from tokenspout.engine.synthetic_engine import SyntheticEngine

BIG_WORD = "x" * 8192  # the synthetic engine echoes it: at least 8 KiB per token on the wire
STREAM_BUFFER = 1 << 20


def test_stuck_reader_is_cut_off_with_send_timeout(start_server) -> None:  # type: ignore[no-untyped-def]
    server: RunningServer = start_server(
        SyntheticEngine(itl_ms=0), send_timeout_s=1.0, max_stream_buffer_bytes=STREAM_BUFFER
    )
    body = {"prompt": BIG_WORD, "max_tokens": 4000, "stream": True}
    sock = open_raw_stream(server, body, path="/v1/completions", rcvbuf=4096)
    try:
        start = time.monotonic()
        waited = server.wait_metric(
            "tokenspout_requests_aborted_total", 1, timeout=20, labels='reason="send_timeout"'
        )
        assert waited >= 0.9 or time.monotonic() - start >= 0.9
        server.wait_metric("tokenspout_requests_running", 0, timeout=2)
        generated = server.metric("tokenspout_generation_tokens_total")
        # 4000 tokens would be 32 MB: backpressure paused the engine once the stream's
        # buffer was full (about 770 tokens with Linux's default 4 MiB tcp_wmem max).
        assert generated <= most_tokens_unread(STREAM_BUFFER, len(BIG_WORD), 4096), generated
        assert server.metric("tokenspout_streams_active") == 0
    finally:
        sock.close()
