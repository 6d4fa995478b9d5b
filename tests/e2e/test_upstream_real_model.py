"""The upstream engine in front of two embedded tokenspouts (the real model): one killed
mid-stream, the client still gets exactly the uncut greedy answer, then ``[DONE]``."""

from __future__ import annotations

import json
from collections.abc import Callable

import httpx
import pytest

from tests.conftest import RunningServer
from tests.upstream_processes import front, processes, tokenspout

# Two processes with the real model on two shared cores: `make test-slow`.
pytestmark = pytest.mark.slow

MODEL = "SmolLM2-135M-Instruct"


@pytest.mark.timeout(1800)  # two model loads and a greedy answer on a shared machine
def test_upstream_killed_mid_stream_gives_the_exact_greedy_answer(
    start_server: Callable[..., RunningServer],
) -> None:
    cut_after = 5
    embedded = ("--engine", "embedded", "--max-num-seqs", "2")
    with processes(lambda: tokenspout(*embedded), lambda: tokenspout(*embedded)) as (a, b):
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": "Explain why the sky is blue."}],
            "temperature": 0,
            "max_tokens": 48,
        }
        uncut = httpx.post(f"{b.base}/chat/completions", json=body, timeout=300).json()
        expected = uncut["choices"][0]["message"]["content"]
        server = front(start_server, a, b, backoff_s=0.001)
        texts: list[str] = []
        data: list[str] = []
        streamed = {**body, "stream": True, "stream_options": {"flush_tokens": 1, "flush_ms": 0}}
        with httpx.stream(
            "POST", f"{server.url}/v1/chat/completions", json=streamed, timeout=300
        ) as r:
            lines = r.iter_lines()
            for line in lines:
                if line.startswith("data: "):
                    data.append(line)
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                delta = json.loads(line[6:])["choices"][0]["delta"]
                if delta.get("content"):
                    texts.append(delta["content"])
                    if len(texts) == cut_after:
                        a.kill()  # the first request of a fresh front goes to `a`
            assert data[-1] == "data: [DONE]"
    assert "".join(texts) == expected
    assert (
        server.metric("tokenspout_upstream_failovers_total", f'reason="cut",upstream="{a.base}"')
        == 1
    )
