"""Server CPU per delivered token: the seed article's endpoint against tokenspout.

Both servers run in their own subprocess, one after the other within one run (alternating
when ``--reps`` > 1), under the same load: ``--streams`` concurrent POSTs to
``/v1/completions/stream`` (``{"token": ...}`` events, ``[DONE]``) for ``--tokens`` tokens at
``--itl-ms`` per token. Each server's CPU time (utime + stime from ``/proc``) over the load is
divided by the tokens the client received.

* baseline: ``benchmarks/seed_baseline_server.py``, one ``json.dumps`` event per token;
* tokenspout: ``tokenspout serve --engine synthetic --synthetic-itl-ms 10``, default
  coalescing (5 tokens or 50 ms per event).

    .venv/bin/python benchmarks/transport_cost.py --streams 400 --tokens 300 --reps 3

``--before DIR`` adds the tokenspout of another checkout (e.g. ``git worktree add DIR REV``)
to the alternation, for a before/after comparison of a change.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from dataclasses import dataclass

from harness import (
    RawResponse,
    ServerProcess,
    fetch,
    free_port,
    machine,
    raise_nofile,
    tokenspout_serve,
)

#: Both servers echo the prompt's words, one word per token: tokens are counted as words.
WORD = "tok"
TOKEN = b"tok "
DONE = b"data: [DONE]\n\n"


@dataclass
class Run:
    server: str
    cpu_s: float
    wall_s: float
    tokens: int
    events: int
    wire_bytes: int
    completed: int

    @property
    def us_per_token(self) -> float:
        return self.cpu_s / max(self.tokens, 1) * 1e6


def server_cmd(name: str, port: int, itl_ms: float, src: str | None, extra: list[str]) -> list[str]:
    if name == "baseline":
        script = "benchmarks/seed_baseline_server.py"
        return [sys.executable, script, "--port", str(port), "--itl-ms", str(itl_ms)]
    # "tokenspout@before": the checkout given by --before, for a before/after comparison.
    checkout = src if name.endswith("@before") else None
    return tokenspout_serve(
        port, "--engine", "synthetic", "--synthetic-itl-ms", str(itl_ms), *extra, src=checkout
    )


async def load(port: int, streams: int, tokens: int, limit_s: float) -> list[RawResponse]:
    body = json.dumps({"prompt": WORD, "max_tokens": tokens}).encode()
    return await asyncio.gather(
        *(fetch(port, "/v1/completions/stream", body, timeout_s=limit_s) for _ in range(streams))
    )


def measure(name: str, args: argparse.Namespace) -> Run:
    port = free_port()
    cmd = server_cmd(name, port, args.itl_ms, args.before, args.serve_args.split())
    with ServerProcess(cmd, port) as server:
        time.sleep(0.5)  # start-up work settles before the CPU clock is read
        cpu0, wall0 = server.cpu_seconds(), time.perf_counter()
        responses = asyncio.run(load(port, args.streams, args.tokens, args.limit_s))
        cpu, wall = server.cpu_seconds() - cpu0, time.perf_counter() - wall0
    tokens = [r.body.count(TOKEN) for r in responses]
    complete = [
        r.status == 200 and r.error is None and n == args.tokens and r.body.endswith(DONE)
        for r, n in zip(responses, tokens, strict=True)
    ]
    return Run(
        server=name,
        cpu_s=cpu,
        wall_s=wall,
        tokens=sum(tokens),
        events=sum(r.body.count(b"data: ") - r.body.count(DONE) for r in responses),
        wire_bytes=sum(r.wire_bytes for r in responses),
        completed=sum(complete),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=400)
    parser.add_argument("--tokens", type=int, default=300)
    parser.add_argument("--itl-ms", type=float, default=10.0)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--limit-s", type=float, default=120.0, help="time bound of one load")
    parser.add_argument(
        "--before", help="also run the tokenspout of this checkout (before/after), alternating"
    )
    parser.add_argument(
        "--serve-args",
        default="",
        help="more `tokenspout serve` flags, e.g. '--flush-ms 100000': events by count only, "
        "so that a before/after run on a busy machine sends the same events",
    )
    args = parser.parse_args()
    raise_nofile(args.streams + 1024)
    print(machine())
    runs: dict[str, list[Run]] = {"baseline": [], "tokenspout": []}
    if args.before:
        runs["tokenspout@before"] = []
    for _ in range(args.reps):
        for name, reps in runs.items():
            reps.append(measure(name, args))
    print(
        f"\n{args.streams} streams x {args.tokens} tokens at {args.itl_ms:g} ms/token, "
        f"{args.reps} rep(s) per server, alternating; the rep with the median CPU/token\n"
    )
    print(
        "| server | server CPU s | wall s | µs CPU / token | tokens | events | bytes on the "
        "wire | completed streams |"
    )
    print("|---|---|---|---|---|---|---|---|")
    medians = {}
    for name, reps in runs.items():
        run = sorted(reps, key=lambda r: r.us_per_token)[len(reps) // 2]
        medians[name] = statistics.median(r.us_per_token for r in reps)
        done = min(r.completed for r in reps)
        cells = [name, f"{run.cpu_s:.2f}", f"{run.wall_s:.2f}", f"{medians[name]:.1f}",
                 run.tokens, run.events, run.wire_bytes, f"{done}/{args.streams}"]  # fmt: skip
        print("| " + " | ".join(str(c) for c in cells) + " |")
    ratio = medians["tokenspout"] / medians["baseline"]
    print(f"\ntokenspout / baseline CPU per token: {ratio:.2f} (goal <= 0.20)")
    if args.before:
        after = medians["tokenspout"] / medians["tokenspout@before"]
        print(f"tokenspout / tokenspout@before CPU per token: {after:.2f}")
    for name, reps in runs.items():
        print(f"{name} µs/token per rep: {[round(r.us_per_token, 1) for r in reps]}")


if __name__ == "__main__":
    main()
