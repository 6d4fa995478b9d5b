"""The attack suite at full size, for the table in RESULTS.md: each attack against a
synthetic-engine server process with a keys file, while a normal stream is read to its end
and ``/health`` is probed every 20 ms on a new connection.

    .venv/bin/python benchmarks/attack_suite.py

Columns: inputs tried, 5xx seen, whether the server was still up, its peak RSS (and at the
start of the attack), ``/health`` latency during the attack, the normal stream's outcome.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from collections.abc import Callable, Coroutine
from pathlib import Path

from attacks import (
    KEY,
    KEYS,
    AttackResult,
    Observed,
    body_flood,
    deep_json,
    header_flood,
    idle_websockets,
    key_flood,
    observe,
    slowloris,
)
from harness import ServerProcess, free_port, machine, percentile, raise_nofile, tokenspout_serve

MiB = 1 << 20


async def nothing() -> AttackResult:
    """The baseline: the normal stream and the /health probes with no attack."""
    return AttackResult("none (baseline)", "-")


Attack = Callable[[asyncio.Event], Coroutine[None, None, AttackResult]]


def attacks(port: int, scale: float) -> list[Attack]:
    n = lambda count: max(1, int(count * scale))  # noqa: E731
    return [
        lambda _: nothing(),
        lambda _: key_flood(port, "sk-flood", total=n(10_000), connections=50),
        lambda over: slowloris(port, connections=n(2000), hold=over),
        lambda over: idle_websockets(port, sockets=n(1000), hold=over, key=KEY),
        lambda _: body_flood(port, requests=n(16), body_mb=300, key=KEY),
        lambda _: header_flood(port, requests=n(8), header_mb=50),
        lambda _: deep_json(port, requests=n(300), key=KEY),
    ]


def row(seen: Observed, up: bool) -> str:
    r = seen.result
    statuses = ", ".join(f"{s}: {c}" for s, c in sorted(r.statuses.items()))
    health = r.health or [float("nan")]
    p50, p99 = percentile(health, 50) * 1000, percentile(health, 99) * 1000
    bad_health = sum(c for s, c in r.health_statuses.items() if s != 200)
    stream = f"done, {r.stream_events} events" if r.stream_done else "NOT completed"
    return (
        f"| {r.name} | {r.inputs} | {statuses} | {r.server_errors} | {'no' if up else 'YES'} "
        f"| {seen.peak_rss / MiB:.0f} (from {seen.baseline_rss / MiB:.0f}) "
        f"| {p50:.1f} / {p99:.1f} / {max(health) * 1000:.1f} ({len(health)} probes, "
        f"{bad_health} not 200) | {stream} |"
    )


async def main(scale: float, itl_ms: float, tokens: int) -> None:
    raise_nofile(20_000)
    with tempfile.TemporaryDirectory() as tmp:
        keys = Path(tmp) / "keys.toml"
        keys.write_text(KEYS)
        port = free_port()
        cmd = tokenspout_serve(
            port, "--engine", "synthetic", "--synthetic-itl-ms", str(itl_ms),
            "--api-keys-file", str(keys),
        )  # fmt: skip
        print(f"Machine: {machine()}\n")
        print(
            "| attack | inputs tried | answers (status: count) | 5xx | crashed | peak RSS MiB "
            "| /health p50 / p99 / max ms | normal stream |\n|---|---|---|---|---|---|---|---|"
        )
        for attack in attacks(port, scale):
            with ServerProcess(cmd, port) as server:
                seen = await observe(
                    port,
                    server.rss_bytes,
                    attack,
                    stream_headers={"Authorization": f"Bearer {KEY}"},
                    stream_tokens=tokens,
                )
                assert server.proc is not None
                print(row(seen, server.proc.poll() is None), flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--scale", type=float, default=1.0, help="Multiply every count.")
    parser.add_argument("--itl-ms", type=float, default=5.0, help="Synthetic decode step.")
    parser.add_argument("--stream-tokens", type=int, default=400)
    args = parser.parse_args()
    asyncio.run(main(args.scale, args.itl_ms, args.stream_tokens))
