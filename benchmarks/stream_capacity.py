"""How many open streams one server process holds, and the memory each costs.

For each level (1,000 / 5,000 / 10,000 by default) a fresh ``tokenspout serve --engine
synthetic`` with slow tokens (1 s apart, 60 per stream) takes that many seed-format streams
from raw asyncio sockets in one client process. Connections are opened in batches, each
batch once the previous one has received its first events (a closed-loop ramp: a burst of
10,000 SYNs would overflow the listen backlog and measure TCP retries instead). RSS and the
number of streams open at that moment (first event seen, not ended) are sampled every
0.5 s; memory per stream is (RSS − RSS idle) / open streams at the sample with the most
open. Every stream must then run to ``[DONE]``. Both processes raise their open-file limit.

    .venv/bin/python benchmarks/stream_capacity.py --levels 1000,5000,10000
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import time
from dataclasses import dataclass
from pathlib import Path

from harness import ServerProcess, free_port, machine, raise_nofile, tokenspout_serve

PROMPT = "slow tokens for a long while"


@dataclass
class Level:
    streams: int
    completed: int
    max_open: int
    rss_idle_mb: float
    rss_at_max_mb: float
    rss_peak_mb: float
    ramp_s: float
    total_s: float
    errors: dict[str, int]

    @property
    def kb_per_stream(self) -> float:
        return (self.rss_at_max_mb - self.rss_idle_mb) * 1024 / max(self.max_open, 1)


class Streams:
    """The client side: counts streams open now (first event seen, not ended), completed
    ones, and failures by kind."""

    def __init__(self, port: int, tokens: int, timeout_s: float):
        self.port, self.timeout_s = port, timeout_s
        self.started = 0
        self.open_now = 0
        self.completed = 0
        self.errors: collections.Counter[str] = collections.Counter()
        body = json.dumps({"prompt": PROMPT, "max_tokens": tokens}).encode()
        self.request = (
            b"POST /v1/completions/stream HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
            b"Content-Type: application/json\r\nContent-Length: "
            + str(len(body)).encode() + b"\r\n\r\n" + body
        )  # fmt: skip

    async def one(self) -> None:
        writer = None
        seen_first = False
        try:
            async with asyncio.timeout(self.timeout_s):
                reader, writer = await asyncio.open_connection("127.0.0.1", self.port, limit=4096)
                writer.write(self.request)
                tail = b""
                while data := await reader.read(4096):
                    if not seen_first and b"data: {" in data:
                        seen_first = True
                        self.open_now += 1
                    # Only the tail is kept (client memory): a stream that fails ends with an
                    # error event instead of text then [DONE].
                    tail = (tail + data)[-64:]
            if seen_first and b"data: [DONE]" in tail and b"error" not in tail:
                self.completed += 1
            else:
                self.errors["incomplete"] += 1
        except (TimeoutError, OSError) as exc:
            self.errors[type(exc).__name__] += 1
        finally:
            self.open_now -= seen_first
            if writer is not None:
                writer.close()

    async def run(
        self, n: int, batch: int, server: ServerProcess
    ) -> tuple[float, int, float, float]:
        """Open ``n`` streams; returns (ramp seconds, most open at once, RSS MB then, peak
        RSS MB)."""
        best = (0, 0.0)
        peak = 0.0

        async def sample() -> None:
            nonlocal best, peak
            while True:
                rss = server.rss_bytes() / 2**20
                peak = max(peak, rss)
                if self.open_now > best[0]:
                    best = (self.open_now, rss)
                await asyncio.sleep(0.5)

        sampler = asyncio.create_task(sample())
        start = time.perf_counter()
        tasks = []
        for i in range(0, n, batch):
            tasks += [asyncio.create_task(self.one()) for _ in range(min(batch, n - i))]
            ramp_deadline = time.perf_counter() + 30
            failed = sum(self.errors.values())
            while self.open_now + self.completed + failed < len(tasks):
                if time.perf_counter() > ramp_deadline:
                    break
                await asyncio.sleep(0.05)
                failed = sum(self.errors.values())
        ramp = time.perf_counter() - start
        await asyncio.gather(*tasks)
        sampler.cancel()
        return ramp, best[0], best[1], peak


def connection_limit(n: int, src: str | None) -> list[str]:
    """``--max-connections n`` where the server has the flag (checkouts before it do not)."""
    config = Path(src or Path(__file__).parents[1]) / "src/tokenspout/server/config.py"
    return ["--max-connections", str(n)] if "max_connections" in config.read_text() else []


def measure(n: int, args: argparse.Namespace) -> Level:
    port = free_port()
    cmd = tokenspout_serve(
        port, "--engine", "synthetic", "--synthetic-itl-ms", str(args.itl_ms),
        "--max-streams", str(n + 100), "--max-queued", str(n + 100),
        *connection_limit(n + 1000, args.src), src=args.src,
    )  # fmt: skip
    with ServerProcess(cmd, port, nofile=n + 1000) as server:
        asyncio.run(Streams(port, 2, 30).run(10, 10, server))  # warm up
        time.sleep(1.0)
        idle = server.rss_bytes() / 2**20
        streams = Streams(port, args.tokens, args.timeout)
        start = time.perf_counter()
        ramp, max_open, rss_at_max, peak = asyncio.run(streams.run(n, args.batch, server))
        total = time.perf_counter() - start
    return Level(
        n, streams.completed, max_open, idle, rss_at_max, peak, ramp, total, dict(streams.errors)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", default="1000,5000,10000")
    parser.add_argument("--itl-ms", type=float, default=1000.0)
    parser.add_argument("--tokens", type=int, default=60, help="per stream: 60 × 1 s holds")
    parser.add_argument("--batch", type=int, default=250, help="connections opened together")
    parser.add_argument("--timeout", type=float, default=240.0, help="per stream, seconds")
    parser.add_argument("--src", help="run the tokenspout of this checkout (before/after runs)")
    args = parser.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    limit = raise_nofile(max(levels) + 1000)
    if limit < max(levels) + 100:
        raise SystemExit(f"open-file limit {limit} is too low for {max(levels)} streams")
    print(f"machine: {machine()}")
    rows = [measure(n, args) for n in levels]
    print(
        "\n| streams | completed | most open at once | ramp s | RSS idle | RSS at most open "
        "| RSS peak | KB per open stream | failures |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r.streams} | {r.completed} | {r.max_open} | {r.ramp_s:.0f}"
            f" | {r.rss_idle_mb:.0f} MB | {r.rss_at_max_mb:.0f} MB | {r.rss_peak_mb:.0f} MB"
            f" | {r.kb_per_stream:.1f} | {r.errors or 'none'} |"
        )


if __name__ == "__main__":
    main()
