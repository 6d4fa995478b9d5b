"""Coalescing policies side by side: what each costs and how smooth it looks.

One ``tokenspout serve --engine synthetic`` (10 ms per token); for each policy, passed per
request in ``stream_options``, 100 concurrent streams × 200 tokens. Per policy: events and
events/s, bytes, server CPU (``/proc``), client CPU to read and parse every event
(``json.loads``, as a UI would), and smoothness: the gaps between visible updates (reads
that brought text) on each stream, pooled, p50/p99/max. Policies run in the order given,
then again in reverse, and the two runs are averaged, so that drift on a shared machine
does not favour the first ones.

    .venv/bin/python benchmarks/flush_sweep.py
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from dataclasses import dataclass

from harness import (
    RawResponse,
    ServerProcess,
    fetch,
    free_port,
    machine,
    percentile,
    tokenspout_serve,
)

#: (label, flush_tokens, flush_ms). A bound that should never trigger is set to its maximum.
POLICIES = [
    ("per token", 1, 0.0),
    ("2 tokens", 2, 10_000.0),
    ("5 tokens", 5, 10_000.0),
    ("10 tokens", 10, 10_000.0),
    ("50 ms", 100_000, 50.0),
    ("100 ms", 100_000, 100.0),
    ("5 tokens / 50 ms (default)", 5, 50.0),
]


@dataclass
class Sample:
    events: int
    body_bytes: int
    wall_s: float
    server_cpu_s: float
    client_cpu_s: float
    gaps_ms: list[float]
    completed: int


def parse(res: RawResponse) -> tuple[int, bool]:
    """Parse every event as a client would; (text events, complete)."""
    events, done = 0, False
    for line in res.body.split(b"\n"):
        if line == b"data: [DONE]":
            done = True
        elif line.startswith(b"data: "):
            json.loads(line[6:])
            events += 1
    return events, done and res.error is None


async def load(port: int, tokens: int, flush_tokens: int, flush_ms: float, n: int) -> Sample:
    body = json.dumps(
        {
            "prompt": "smooth text appears",
            "max_tokens": tokens,
            "stream_options": {"flush_tokens": flush_tokens, "flush_ms": flush_ms},
        }
    ).encode()
    t0 = time.perf_counter()
    results = await asyncio.gather(
        *(
            fetch(port, "/v1/completions/stream", body, timeout_s=120, keep_times=True)
            for _ in range(n)
        )
    )
    wall = time.perf_counter() - t0
    parsed = [parse(r) for r in results]
    # The first read carries the headers and the first text; gaps start after it.
    gaps = [
        (b - a) * 1000
        for r in results
        for a, b in zip(r.read_times, r.read_times[1:], strict=False)
    ]
    return Sample(
        events=sum(p[0] for p in parsed),
        body_bytes=sum(len(r.body) for r in results),
        wall_s=wall,
        server_cpu_s=0.0,
        client_cpu_s=0.0,
        gaps_ms=gaps,
        completed=sum(p[1] for p in parsed),
    )


def measure(
    server: ServerProcess, policy: tuple[str, int, float], args: argparse.Namespace
) -> Sample:
    _, flush_tokens, flush_ms = policy
    cpu0, client0 = server.cpu_seconds(), time.process_time()
    sample = asyncio.run(load(server.port, args.tokens, flush_tokens, flush_ms, args.streams))
    sample.server_cpu_s = server.cpu_seconds() - cpu0
    sample.client_cpu_s = time.process_time() - client0
    return sample


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=100)
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--itl-ms", type=float, default=10.0)
    args = parser.parse_args()
    print(f"machine: {machine()}")
    port = free_port()
    samples: dict[str, list[Sample]] = {label: [] for label, _, _ in POLICIES}
    cmd = tokenspout_serve(port, "--engine", "synthetic", "--synthetic-itl-ms", str(args.itl_ms))
    with ServerProcess(cmd, port) as server:
        asyncio.run(load(port, 10, 1, 0.0, 4))  # warm up
        for policy in [*POLICIES, *reversed(POLICIES)]:
            samples[policy[0]].append(measure(server, policy, args))
    print(
        f"\n{args.streams} streams × {args.tokens} tokens at {args.itl_ms:g} ms/token, "
        "each policy run twice (forward and reverse order), means of the two"
    )
    print(
        "| policy | events | events/s | bytes | server CPU s | client CPU s "
        "| update gap p50 | p99 | max | completed |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for label, runs in samples.items():
        gaps = [g for s in runs for g in s.gaps_ms]
        mean = statistics.mean
        print(
            f"| {label} | {mean(s.events for s in runs):.0f}"
            f" | {mean(s.events / s.wall_s for s in runs):.0f}"
            f" | {mean(s.body_bytes for s in runs):.0f}"
            f" | {mean(s.server_cpu_s for s in runs):.2f}"
            f" | {mean(s.client_cpu_s for s in runs):.2f}"
            f" | {percentile(gaps, 50):.1f} ms | {percentile(gaps, 99):.1f} ms | {max(gaps):.1f} ms"
            f" | {min(s.completed for s in runs)}/{args.streams} |"
        )


if __name__ == "__main__":
    main()
