"""tokenspout in front of another server (``--engine upstream``): what the relay costs,
how fast a cancel reaches the upstream, how fast an answer fails over.

The upstream is ``tokenspout serve --engine synthetic --synthetic-itl-ms 10 --flush-tokens 1
--flush-ms 0`` (one chunk per token, as vLLM and llama.cpp stream); the front is ``tokenspout
serve --engine upstream`` (default coalescing). Each in its own subprocess.

* TTFT: ``--ttft-trials`` one-at-a-time completions, alternating direct / through the front;
  p50 of each and the difference.
* Load: ``--streams`` concurrent streams x ``--tokens`` tokens, direct and then through the
  front: output tokens/s (all streams' tokens over the load's wall time), the front's CPU per
  relayed token; and the seed article's endpoint (``seed_baseline_server.py``) under the
  same load, for its CPU per token.
* Cancel: a client reads its first text through the front and closes its socket; the time
  until the upstream's ``tokenspout_requests_running`` is 0 (p50, max).
* Failover: two upstreams; a stream through the front, its upstream killed (SIGKILL) after
  its first text; the time from the kill to the next text at the client (p50, max).

    .venv/bin/python benchmarks/upstream_relay.py

With ``--baseline-src DIR`` (another checkout, e.g. ``git archive main | tar -x -C DIR``),
rounds of the same load through that checkout's front and this one's, in turn, for the
front's CPU per relayed token side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import socket
import statistics
import sys
import time
from contextlib import ExitStack

import httpx

from harness import ServerProcess, fetch, free_port, machine, raise_nofile, tokenspout_serve

WORD = "tok"
TOKEN = b"tok "


def upstream_cmd(port: int, itl_ms: float) -> list[str]:
    return tokenspout_serve(
        port, "--engine", "synthetic", "--synthetic-itl-ms", str(itl_ms),
        "--flush-tokens", "1", "--flush-ms", "0",
    )  # fmt: skip


def front_cmd(port: int, *upstreams: int, src: str | None = None) -> list[str]:
    urls = [a for p in upstreams for a in ("--upstream", f"http://127.0.0.1:{p}/v1")]
    return tokenspout_serve(
        port, "--engine", "upstream", *urls, "--upstream-max-concurrency", "2000",
        "--upstream-retries", "2", src=src,
    )  # fmt: skip


def completion(tokens: int) -> bytes:
    body = {"model": "synthetic", "prompt": WORD, "max_tokens": tokens, "stream": True}
    return json.dumps(body).encode()


async def ttft_once(port: int) -> float:
    r = await fetch(port, "/v1/completions", completion(4), keep_times=True, timeout_s=30)
    assert r.status == 200 and r.read_times, r.error
    return r.read_times[0] - r.started


def load(
    port: int, streams: int, tokens: int, cpu: ServerProcess
) -> tuple[float, float, int, float]:
    """(tokens/s, CPU µs per token of ``cpu``'s process, completed streams, CPU µs per
    token of this client: the load's three processes share the machine's cores)."""

    async def run() -> list:
        body = completion(tokens)
        return await asyncio.gather(
            *(fetch(port, "/v1/completions", body, timeout_s=300) for _ in range(streams))
        )

    cpu0, wall0, own0 = cpu.cpu_seconds(), time.perf_counter(), time.process_time()
    responses = asyncio.run(run())
    used, wall = cpu.cpu_seconds() - cpu0, time.perf_counter() - wall0
    own = time.process_time() - own0
    counts = [r.body.count(TOKEN) for r in responses]
    complete = [
        n == tokens and r.body.endswith(b"data: [DONE]\n\n")
        for r, n in zip(responses, counts, strict=True)
    ]
    for r, ok in zip(responses, complete, strict=True):
        if not ok:  # one example of what went wrong
            print(f"incomplete: status {r.status}, {r.error}, ends {r.body[-300:]!r}", flush=True)
            break
    n = max(sum(counts), 1)
    return sum(counts) / wall, used / n * 1e6, sum(complete), own / n * 1e6


def seed_load(port: int, streams: int, tokens: int, server: ServerProcess) -> float:
    async def run() -> list:
        body = json.dumps({"prompt": WORD, "max_tokens": tokens}).encode()
        return await asyncio.gather(
            *(fetch(port, "/v1/completions/stream", body, timeout_s=300) for _ in range(streams))
        )

    cpu0 = server.cpu_seconds()
    responses = asyncio.run(run())
    return (server.cpu_seconds() - cpu0) / max(sum(r.body.count(TOKEN) for r in responses), 1) * 1e6


def paired_fronts(args: argparse.Namespace, up: int, fr: int, front: ServerProcess) -> None:
    """The front's CPU per relayed token, this checkout's and ``--baseline-src``'s, both in
    front of the same upstream, the load through each in turn: on a shared machine, rounds
    side by side compare where separate runs do not."""
    port = free_port()
    with ServerProcess(front_cmd(port, up, src=args.baseline_src), port) as baseline:
        print(f"\nfront CPU µs per relayed token, {args.paired_rounds} rounds, in turn "
              f"(baseline: {args.baseline_src}):")  # fmt: skip
        print("| round | baseline | this checkout | ratio |")
        print("|---|---|---|---|")
        for i in range(args.paired_rounds):
            _, base_us, base_done, _ = load(port, args.streams, args.tokens, baseline)
            _, this_us, this_done, _ = load(fr, args.streams, args.tokens, front)
            print(f"| {i + 1} | {base_us:.1f} ({base_done}/{args.streams}) | {this_us:.1f} "
                  f"({this_done}/{args.streams}) | {this_us / base_us:.2f} |")  # fmt: skip


def open_stream(port: int, tokens: int) -> socket.socket:
    body = json.dumps(
        {"model": "synthetic", "messages": [{"role": "user", "content": WORD}],
         "max_tokens": tokens, "stream": True}
    ).encode()  # fmt: skip
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    return sock


def read_text(sock: socket.socket) -> None:
    """Read until the next content chunk arrives."""
    data = b""
    while b'"content":"tok' not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise RuntimeError("stream closed early")
        data += chunk


def running(client: httpx.Client) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("tokenspout_requests_running "):
            return float(line.split()[1])
    raise RuntimeError("no tokenspout_requests_running")


def cancel_trials(front: int, upstream: int, trials: int) -> list[float]:
    out = []
    with httpx.Client(base_url=f"http://127.0.0.1:{upstream}") as client:
        for _ in range(trials):
            sock = open_stream(front, 4000)
            read_text(sock)
            closed = time.perf_counter()
            sock.close()
            while running(client) != 0:
                pass
            out.append(time.perf_counter() - closed)
    return out


def failover_trials(itl_ms: float, trials: int) -> list[float]:
    out = []
    keep = free_port()
    with ServerProcess(upstream_cmd(keep, itl_ms), keep):
        for _ in range(trials):
            dying_port, front = free_port(), free_port()
            with ServerProcess(upstream_cmd(dying_port, itl_ms), dying_port) as dying, \
                    ServerProcess(front_cmd(front, dying_port, keep), front):  # fmt: skip
                # A fresh front sends its first request to its first upstream: `dying`.
                sock = open_stream(front, 500)
                read_text(sock)
                killed = time.perf_counter()
                assert dying.proc is not None
                dying.proc.send_signal(signal.SIGKILL)
                read_text(sock)
                out.append(time.perf_counter() - killed)
                sock.close()
    return out


def ms(values: list[float]) -> str:
    return f"p50 {statistics.median(values) * 1000:.1f} ms, max {max(values) * 1000:.1f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=400)
    parser.add_argument("--tokens", type=int, default=300)
    parser.add_argument("--itl-ms", type=float, default=10.0)
    parser.add_argument("--ttft-trials", type=int, default=40)
    parser.add_argument("--cancel-trials", type=int, default=20)
    parser.add_argument("--failover-trials", type=int, default=5)
    parser.add_argument(
        "--baseline-src",
        help="another checkout: its front beside this one, the same load through each in turn",
    )
    parser.add_argument("--paired-rounds", type=int, default=4)
    args = parser.parse_args()
    raise_nofile(args.streams * 2 + 1024)
    print(machine())
    up, fr, seed = free_port(), free_port(), free_port()
    with ExitStack() as stack:
        upstream = stack.enter_context(ServerProcess(upstream_cmd(up, args.itl_ms), up))
        front = stack.enter_context(ServerProcess(front_cmd(fr, up), fr))
        time.sleep(0.5)
        direct_ttft, relay_ttft = [], []
        for _ in range(args.ttft_trials):
            direct_ttft.append(asyncio.run(ttft_once(up)))
            relay_ttft.append(asyncio.run(ttft_once(fr)))
        added = statistics.median(relay_ttft) - statistics.median(direct_ttft)
        print(f"\nTTFT one at a time ({args.ttft_trials} each, alternating): direct "
              f"{ms(direct_ttft)}; through tokenspout {ms(relay_ttft)}; "
              f"added p50 {added * 1000:.2f} ms")  # fmt: skip
        direct_tps, upstream_us, direct_done, direct_client_us = load(
            up, args.streams, args.tokens, upstream
        )
        relay_tps, front_us, relay_done, relay_client_us = load(
            fr, args.streams, args.tokens, front
        )
        print(f"\n{args.streams} streams x {args.tokens} tokens at {args.itl_ms:g} ms/token:")
        print(
            "| path | output tokens/s | completed | server CPU µs / token | client CPU µs / token |"
        )
        print("|---|---|---|---|---|")
        print(f"| direct (upstream alone) | {direct_tps:.0f} | {direct_done}/{args.streams} | "
              f"{upstream_us:.1f} (upstream) | {direct_client_us:.1f} |")  # fmt: skip
        print(f"| through tokenspout | {relay_tps:.0f} | {relay_done}/{args.streams} | "
              f"{front_us:.1f} (front only) | {relay_client_us:.1f} |")  # fmt: skip
        print(f"tokens/s ratio through / direct: {relay_tps / direct_tps:.3f}")
        if args.baseline_src:
            paired_fronts(args, up, fr, front)
        cancels = cancel_trials(fr, up, args.cancel_trials)
        print(f"\ncancel → upstream slot free ({args.cancel_trials} trials): {ms(cancels)}")
    seed_cmd = [sys.executable, "benchmarks/seed_baseline_server.py", "--port", str(seed),
                "--itl-ms", str(args.itl_ms)]  # fmt: skip
    with ServerProcess(seed_cmd, seed) as server:
        time.sleep(0.5)
        seed_us = seed_load(seed, args.streams, args.tokens, server)
    print(f"seed article's endpoint, same load: {seed_us:.1f} µs CPU / token")
    failovers = failover_trials(args.itl_ms, args.failover_trials)
    print(f"\nupstream killed → next text at the client ({args.failover_trials} trials): "
          f"{ms(failovers)}")  # fmt: skip


if __name__ == "__main__":
    main()
