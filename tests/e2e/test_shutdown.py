"""SIGTERM drains: the server stops accepting, running streams may finish within the drain
timeout, and the rest end with an error event and [DONE] (a real `tokenspout serve`)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx

from tests.conftest import free_port


def start_cli_server(*args: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tokenspout.client.cli", "serve", "--engine", "synthetic",
         "--port", str(port), "--log-level", "warning", *args],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("server did not start")


def collect(url: str, max_tokens: int, out: list[str]) -> None:
    body = {"prompt": "drain", "max_tokens": max_tokens}
    with httpx.stream("POST", f"{url}/v1/completions/stream", json=body, timeout=30) as r:
        out.extend(line[6:] for line in r.iter_lines() if line.startswith("data: "))


def test_sigterm_drains_then_ends_streams_with_an_error() -> None:
    proc, url = start_cli_server("--synthetic-itl-ms", "20", "--drain-timeout-s", "1")
    try:
        short: list[str] = []
        long: list[str] = []
        threads = [
            threading.Thread(target=collect, args=(url, 20, short)),  # ~0.4 s: finishes
            threading.Thread(target=collect, args=(url, 2000, long)),  # ~40 s: cut at 1 s
        ]
        for t in threads:
            t.start()
        time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(timeout=15)
        # uvicorn re-raises the signal after its clean shutdown, as process managers expect.
        assert proc.wait(timeout=15) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
    assert short[-1] == "[DONE]"
    assert "".join(json.loads(d)["token"] for d in short[:-1]) == "drain " * 20
    assert long[-1] == "[DONE]"
    error = json.loads(long[-2])["error"]
    assert error["code"] == "shutting_down"
    assert 10 < len(long) < 200
