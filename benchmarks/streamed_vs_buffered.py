"""End-to-end latency of the same requests streamed and buffered (``stream: false``).

The seed says streaming makes the whole answer "slightly longer overall". One
``tokenspout serve`` answers the same chat requests both ways, rounds alternating
(streamed, buffered, streamed, ...) so that drift on a shared machine hits both alike.
E2E is request sent → last byte received on the client (raw asyncio sockets).

    .venv/bin/python benchmarks/streamed_vs_buffered.py --engine synthetic
    .venv/bin/python benchmarks/streamed_vs_buffered.py --engine embedded --tokens 64 --rounds 4
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics

from harness import ServerProcess, fetch, free_port, machine, percentile, tokenspout_serve

PROMPT = "Write a long story about a dragon and a knight."


async def burst(port: int, streamed: bool, args: argparse.Namespace) -> list[float]:
    body = {
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": args.tokens,
        "ignore_eos": True,
        "temperature": 0,
        "stream": streamed,
    }
    data = json.dumps(body).encode()
    results = await asyncio.gather(
        *(
            fetch(port, "/v1/chat/completions", data, timeout_s=300, keep_times=True)
            for _ in range(args.concurrency)
        )
    )
    bad = [r for r in results if r.error or r.status != 200 or not r.read_times]
    if bad:
        raise RuntimeError(f"{len(bad)} request(s) failed: {bad[0].error or bad[0].status}")
    return [r.read_times[-1] - r.started for r in results]


async def measure(port: int, args: argparse.Namespace) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"streamed": [], "buffered": []}
    await burst(port, True, argparse.Namespace(**{**vars(args), "concurrency": 1}))  # warm up
    for i in range(2 * args.rounds):
        streamed = i % 2 == 0
        out["streamed" if streamed else "buffered"] += await burst(port, streamed, args)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", default="synthetic", choices=["synthetic", "embedded"])
    parser.add_argument("--tokens", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=16, help="requests per round")
    parser.add_argument("--rounds", type=int, default=6, help="rounds per mode")
    args = parser.parse_args()
    port = free_port()
    extra = ["--engine", args.engine]
    if args.engine == "synthetic":
        extra += ["--synthetic-ttft-ms", "50", "--synthetic-itl-ms", "10"]
    print(f"machine: {machine()}")
    with ServerProcess(tokenspout_serve(port, *extra), port):
        e2e = asyncio.run(measure(port, args))
    base = statistics.median(e2e["buffered"])
    print("\n| mode | requests | e2e p50 | e2e mean | e2e p90 | p50 vs buffered |")
    print("|---|---|---|---|---|---|")
    for mode, values in e2e.items():
        ms = [v * 1000 for v in values]
        p50 = statistics.median(values)
        print(
            f"| {mode} | {len(ms)} | {statistics.median(ms):.1f} ms | {statistics.mean(ms):.1f} ms"
            f" | {percentile(ms, 90):.1f} ms | {(p50 / base - 1) * 100:+.1f} % |"
        )


if __name__ == "__main__":
    main()
