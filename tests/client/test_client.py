"""The Python client (sync and async) and the `tokenspout complete` command."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import RunningServer
from tokenspout.client import AsyncClient, Client, StreamError


def test_sync_client_streams_and_times(synthetic_server: RunningServer) -> None:
    with Client(synthetic_server.url) as client:
        stream = client.stream_chat("alpha beta", max_tokens=9)
        deltas = list(stream)
    assert len(deltas) > 1
    assert "".join(deltas) == stream.result.text == "alpha beta " * 4 + "alpha "
    result = stream.result
    assert result.finish_reason == "length"
    assert result.stream_id
    assert result.ttft_s is not None and result.total_s is not None
    assert 0 < result.ttft_s <= result.total_s


async def test_async_client(synthetic_server: RunningServer) -> None:
    async with AsyncClient(synthetic_server.url) as client:
        result = await client.chat([{"role": "user", "content": "x"}], max_tokens=3)
        deltas = [d async for d in client.stream_completion("p q", max_tokens=4)]
    assert result.text == "x x x "
    assert "".join(deltas) == "p q p q "


def test_client_raises_on_http_errors(synthetic_server: RunningServer) -> None:
    with Client(synthetic_server.url) as client, pytest.raises(StreamError) as info:
        list(client.stream_chat("x", max_tokens=0))
    assert info.value.status_code == 400
    assert "max_tokens" in str(info.value)


def test_complete_command_prints_the_answer(synthetic_server: RunningServer) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "tokenspout.cli", "complete", "live words",
         "--url", synthetic_server.url, "--max-tokens", "4"],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert out.stdout.strip() == "live words live words"
    assert "TTFT" in out.stderr
