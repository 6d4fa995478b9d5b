"""How long after a client closes its socket mid-stream is the engine request gone?

Starts ``tokenspout serve`` in a subprocess, then repeatedly: opens a streaming chat request
over a raw socket, reads until text arrives, closes the socket, and polls ``/metrics`` over a
kept-alive connection until ``tokenspout_requests_running`` is 0. Prints p50/p90/max.

    .venv/bin/python benchmarks/disconnect_latency.py --engine synthetic --trials 50
    .venv/bin/python benchmarks/disconnect_latency.py --engine embedded --trials 20
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import time

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def running(client: httpx.Client) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("tokenspout_requests_running "):
            return float(line.split()[1])
    raise RuntimeError("no tokenspout_requests_running in /metrics")


def one_trial(port: int, client: httpx.Client) -> float:
    body = json.dumps(
        {
            "messages": [{"role": "user", "content": "Tell me a long story about a lighthouse."}],
            "max_tokens": 1000,
            "ignore_eos": True,
            "stream": True,
        }
    ).encode()
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    data = b""
    while b'"content":"' not in data.replace(b'"content":""', b""):
        chunk = sock.recv(65536)
        if not chunk:
            raise RuntimeError("server closed the stream early")
        data += chunk
    closed_at = time.perf_counter()
    sock.close()
    while running(client) != 0:
        if time.perf_counter() - closed_at > 10:
            raise RuntimeError("the request was not aborted within 10 s")
    return time.perf_counter() - closed_at


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", default="synthetic", choices=["synthetic", "embedded"])
    parser.add_argument("--trials", type=int, default=30)
    args = parser.parse_args()
    port = free_port()
    cmd = [sys.executable, "-m", "tokenspout.cli", "serve", "--engine", args.engine,
           "--port", str(port), "--log-level", "warning"]  # fmt: skip
    if args.engine == "synthetic":
        cmd += ["--synthetic-itl-ms", "10"]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            deadline = time.monotonic() + 300
            while True:
                try:
                    if client.get("/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError("server did not become healthy")
                time.sleep(0.1)
            delays = sorted(one_trial(port, client) for _ in range(args.trials))
    finally:
        server.terminate()
        server.wait(timeout=30)
    ms = [d * 1000 for d in delays]
    p90 = ms[int(0.9 * (len(ms) - 1))]
    print("| engine | trials | p50 ms | p90 ms | max ms |\n|---|---|---|---|---|")
    print(f"| {args.engine} | {len(ms)} | {statistics.median(ms):.1f} | {p90:.1f} | {ms[-1]:.1f} |")


if __name__ == "__main__":
    main()
