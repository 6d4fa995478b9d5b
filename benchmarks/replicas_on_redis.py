"""Replicas on Redis: what sharing streams costs and how fast a stream moves.

* ``cpu``: server CPU per delivered token, ``--streams`` resumable streams (``--resumable``)
  of ``--tokens`` tokens at ``--itl-ms`` on one ``tokenspout serve --engine synthetic``, in
  memory and with ``--redis-url``, alternating within one run; the Redis server's own CPU
  beside it; then Redis memory per finished stream (``INFO memory`` before/after, and
  ``MEMORY USAGE`` of one stream's two keys) and the writer's lag histogram.
* ``takeover``: two replicas; ``--kills`` times: a stream on one, a client reading it, the
  owner SIGKILLed, the client reconnecting at once to the other with ``Last-Event-ID``; the
  time from the kill to the next token at the client (the lease lapse dominates it). With
  ``--signal term`` the owner is stopped with SIGTERM instead (``--drain-timeout-s 0``: the
  drain hands the stream over at once): the time from the signal to the next token. With
  ``--at-once N``, N streams and clients each time (the other replica takes all N over).
* ``resume``: a stream cut on one replica and resumed with ``Last-Event-ID`` on the same
  replica or on another: the time from the request to the first replayed event.
* ``open``: what writing a stream's record before its response starts costs, and what it
  buys: the time from the request to a resumable stream's first event on a replica with
  Redis and on one without (alternating), and, right after that first event, a cancel sent
  to the other replica: how many of them found the stream.

    .venv/bin/python benchmarks/replicas_on_redis.py cpu --streams 400 --tokens 300 --reps 3
    .venv/bin/python benchmarks/replicas_on_redis.py takeover --kills 20 [--signal term] \
        [--at-once 300]
    .venv/bin/python benchmarks/replicas_on_redis.py resume --samples 50
    .venv/bin/python benchmarks/replicas_on_redis.py open --samples 200

Needs ``redis-server`` (``make dev`` installs it); Redis runs on a free port in a temporary
directory.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from harness import (
    CLOCK_TICKS,
    ServerProcess,
    fetch,
    free_port,
    machine,
    percentile,
    raise_nofile,
    tokenspout_serve,
)

TOKEN = b"tok "
DONE = b"data: [DONE]\n\n"


class Redis:
    def __init__(self, directory: str):
        self.port = free_port()
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--save", "", "--appendonly", "no",
             "--dir", directory],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        for _ in range(200):
            if self.cli("PING") == "PONG":
                return
            time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def cli(self, *args: str) -> str:
        out = subprocess.run(["redis-cli", "-p", str(self.port), *args], capture_output=True)
        return out.stdout.decode().strip()

    def used_memory(self) -> int:
        for line in self.cli("INFO", "memory").splitlines():
            if line.startswith("used_memory:"):
                return int(line.split(":")[1])
        raise RuntimeError("no used_memory")

    def cpu_seconds(self) -> float:
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


# -- cpu ---------------------------------------------------------------------------------


async def load(port: int, streams: int, tokens: int) -> list:  # type: ignore[type-arg]
    body = json.dumps({"prompt": "tok", "max_tokens": tokens}).encode()
    return await asyncio.gather(
        *(fetch(port, "/v1/completions/stream", body, timeout_s=120) for _ in range(streams))
    )


def metric_lines(port: int, prefix: str) -> list[str]:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    return [line for line in text.splitlines() if line.startswith(prefix)]


def cpu_run(redis: Redis | None, args: argparse.Namespace) -> dict[str, float]:
    port = free_port()
    extra = ["--resumable"] + (["--redis-url", redis.url] if redis else [])
    cmd = tokenspout_serve(
        port, "--engine", "synthetic", "--synthetic-itl-ms", str(args.itl_ms), *extra
    )
    with ServerProcess(cmd, port) as server:
        time.sleep(0.5)  # start-up work settles before the CPU clock is read
        redis_cpu0 = redis.cpu_seconds() if redis else 0.0
        mem0 = redis.used_memory() if redis else 0
        cpu0 = server.cpu_seconds()
        responses = asyncio.run(load(port, args.streams, args.tokens))
        cpu = server.cpu_seconds() - cpu0
        out = {"cpu_s": cpu, "redis_cpu_s": (redis.cpu_seconds() - redis_cpu0) if redis else 0}
        tokens = sum(r.body.count(TOKEN) for r in responses)
        out["tokens"] = tokens
        out["completed"] = sum(r.status == 200 and r.body.endswith(DONE) for r in responses)
        if redis:
            # Every stream ended and was written (the writer keeps up within milliseconds).
            time.sleep(1.0)
            out["redis_bytes_per_stream"] = (redis.used_memory() - mem0) / args.streams
            lag = metric_lines(port, "tokenspout_redis_write_lag_seconds_bucket")
            out["lag"] = lag  # type: ignore[assignment]
            out["lag_count"] = float(
                metric_lines(port, "tokenspout_redis_write_lag_seconds_count")[0].split()[-1]
            )
            keys = redis.cli("--scan", "--pattern", "tokenspout:s:*").split()
            one = keys[0].split(":")[-1]
            out["stream_key_bytes"] = float(redis.cli("MEMORY", "USAGE", f"tokenspout:s:{one}"))
            out["meta_key_bytes"] = float(redis.cli("MEMORY", "USAGE", f"tokenspout:m:{one}"))
            redis.cli("FLUSHALL")
    return out


def lag_quantiles(buckets: list[str], count: float) -> str:
    """p50 and p99 upper bounds read from the cumulative histogram buckets."""
    found = {}
    for q in (0.5, 0.99, 1.0):
        for line in buckets:
            le = line.split('le="')[1].split('"')[0]
            if float(line.split()[-1]) >= q * count:
                found[q] = le
                break
    return f"p50 ≤ {found[0.5]} s, p99 ≤ {found[0.99]} s, max ≤ {found[1.0]} s"


def cpu(args: argparse.Namespace) -> None:
    raise_nofile(args.streams + 1024)
    print(machine())
    with tempfile.TemporaryDirectory() as tmp:
        redis = Redis(tmp)
        try:
            memory, shared = [], []
            for _ in range(args.reps):
                memory.append(cpu_run(None, args))
                shared.append(cpu_run(redis, args))
        finally:
            redis.stop()
    per_token = {
        name: [r["cpu_s"] / max(r["tokens"], 1) * 1e6 for r in runs]
        for name, runs in (("memory", memory), ("redis", shared))
    }
    print(f"\n{args.streams} resumable streams x {args.tokens} tokens at {args.itl_ms:g} ms/token")
    print("| store | µs server CPU / token (median) | per rep | Redis CPU s | completed |")
    print("|---|---|---|---|---|")
    for name, runs in (("memory", memory), ("redis", shared)):
        reps = per_token[name]
        redis_cpu = statistics.median(r["redis_cpu_s"] for r in runs)
        done = min(r["completed"] for r in runs)
        cells = [name, f"{statistics.median(reps):.1f}", [round(x, 1) for x in reps],
                 f"{redis_cpu:.2f}", f"{int(done)}/{args.streams}"]  # fmt: skip
        print("| " + " | ".join(str(c) for c in cells) + " |")
    ratio = statistics.median(per_token["redis"]) / statistics.median(per_token["memory"])
    print(f"\nredis / memory server CPU per token: {ratio:.2f} (goal <= 1.5)")
    last = shared[-1]
    print(
        f"Redis memory per finished stream of {args.tokens} tokens: "
        f"{last['redis_bytes_per_stream']:.0f} B (INFO used_memory); one stream's keys: "
        f"{last['stream_key_bytes']:.0f} B (stream) + {last['meta_key_bytes']:.0f} B (record)"
    )
    print(
        f"write lag ({int(last['lag_count'])} flushes): "
        + lag_quantiles(last["lag"], last["lag_count"])  # type: ignore[arg-type]
    )


# -- takeover and resume -----------------------------------------------------------------


def start_replica(redis: Redis, itl_ms: float) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    cmd = tokenspout_serve(
        port, "--engine", "synthetic", "--synthetic-itl-ms", str(itl_ms), "--redis-url",
        redis.url, "--resumable", "--flush-tokens", "1", "--drain-timeout-s", "0",
    )  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(1200):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                return proc, port
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError("replica did not start")


def sse(response: httpx.Response):  # type: ignore[no-untyped-def]
    event_id = None
    for line in response.iter_lines():
        if line.startswith("id: "):
            event_id = line[4:]
        elif line.startswith("data: "):
            yield event_id, line[6:]


async def asse(response: httpx.Response):  # type: ignore[no-untyped-def]
    event_id = None
    async for line in response.aiter_lines():
        if line.startswith("id: "):
            event_id = line[4:]
        elif line.startswith("data: "):
            yield event_id, line[6:]


async def stop_under_streams(
    victim: subprocess.Popen[bytes], vport: int, other: int, stop: signal.Signals, at_once: int
) -> list[float]:
    """``at_once`` streams on the victim, each read 20 events in, then the victim stopped;
    each client reads on until its connection is cut, then resumes on ``other`` with its
    last event id. Per stream: the time from the stop to its next new event."""
    body = {"prompt": "a b c d e f g h", "max_tokens": 3000}
    all_in, stopped = asyncio.Event(), asyncio.Event()
    waiting = [at_once]
    stopped_at = [0.0]
    limits = httpx.Limits(max_connections=2 * at_once + 10)

    async def one(client: httpx.AsyncClient) -> float:
        last = None
        url = f"http://127.0.0.1:{vport}/v1/completions/stream"
        async with client.stream("POST", url, json=body) as r:
            events = asse(r)
            for _ in range(20):
                last, _data = await anext(events)
            waiting[0] -= 1
            if not waiting[0]:
                all_in.set()
            await stopped.wait()
            try:
                async for event_id, _data in events:
                    last = event_id or last
            except httpx.HTTPError:
                pass
        url = f"http://127.0.0.1:{other}/v1/completions/stream"
        async with client.stream("GET", url, headers={"Last-Event-ID": last or ""}) as r:
            async for event_id, _data in asse(r):
                if event_id and event_id != last:
                    return time.perf_counter() - stopped_at[0]
        raise RuntimeError("the resumed stream ended without a new event")

    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        tasks = [asyncio.ensure_future(one(client)) for _ in range(at_once)]
        await all_in.wait()
        os.kill(victim.pid, stop)
        stopped_at[0] = time.perf_counter()
        stopped.set()
        return list(await asyncio.gather(*tasks))


def takeover(args: argparse.Namespace) -> None:
    print(machine())
    stop = signal.SIGTERM if args.signal == "term" else signal.SIGKILL
    times: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        redis = Redis(tmp)
        replicas = [start_replica(redis, args.itl_ms) for _ in range(2)]
        try:
            for kill in range(args.kills):
                (victim, vport), (_, other) = replicas
                these = asyncio.run(stop_under_streams(victim, vport, other, stop, args.at_once))
                times += these
                if victim.wait(60) != (0 if stop == signal.SIGTERM else -signal.SIGKILL):
                    raise RuntimeError(f"the stopped replica exited with {victim.returncode}")
                print(f"kill {kill + 1}: next token after p50 {statistics.median(these):.3f} s, "
                      f"max {max(these):.3f} s ({len(these)} streams)", flush=True)  # fmt: skip
                replicas = [replicas[1], start_replica(redis, args.itl_ms)]
        finally:
            for proc, _ in replicas:
                proc.terminate()
            redis.stop()
    print(f"\ntakeover over {args.kills} kills of {args.at_once} stream(s) each "
          f"({stop.name} → next token at the client):")  # fmt: skip
    print(f"p50 {statistics.median(times):.3f} s, max {max(times):.3f} s, min {min(times):.3f} s")


def print_latencies(title: str, results: dict[str, list[float]]) -> None:
    samples = min(len(values) for values in results.values())
    print(f"\n{title}, {samples} samples each:")
    for name, values in results.items():
        p50, p99 = percentile(values, 50) * 1e3, percentile(values, 99) * 1e3
        print(f"{name}: p50 {p50:.2f} ms, p99 {p99:.2f} ms")


def resume(args: argparse.Namespace) -> None:
    print(machine())
    results: dict[str, list[float]] = {"same replica": [], "other replica": []}
    with tempfile.TemporaryDirectory() as tmp:
        redis = Redis(tmp)
        replicas = [start_replica(redis, args.itl_ms) for _ in range(2)]
        try:
            ports = [port for _, port in replicas]
            with httpx.Client(timeout=30) as client:
                for i in range(args.samples):
                    body = {"prompt": "a b c d e f g h", "max_tokens": 200}
                    url = f"http://127.0.0.1:{ports[0]}/v1/completions/stream"
                    with client.stream("POST", url, json=body) as r:
                        events = sse(r)
                        for _ in range(10):
                            last, _data = next(events)
                    for name, port in (("same replica", ports[0]), ("other replica", ports[1])):
                        url = f"http://127.0.0.1:{port}/v1/completions/stream"
                        started = time.perf_counter()
                        with client.stream("GET", url, headers={"Last-Event-ID": last}) as r:
                            next(sse(r))
                            results[name].append(time.perf_counter() - started)
                    if i % 10 == 9:
                        print(f"{i + 1} samples", flush=True)
        finally:
            for proc, _ in replicas:
                proc.terminate()
            redis.stop()
    print_latencies("resume (request → first replayed event)", results)


def open_cost(args: argparse.Namespace) -> None:
    print(machine())
    first: dict[str, list[float]] = {"memory": [], "redis": []}
    cancels: dict[int, int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        redis = Redis(tmp)
        replicas = [start_replica(redis, args.itl_ms) for _ in range(2)]
        alone = free_port()
        cmd = tokenspout_serve(
            alone, "--engine", "synthetic", "--synthetic-itl-ms", str(args.itl_ms),
            "--resumable", "--flush-tokens", "1",
        )  # fmt: skip
        try:
            with ServerProcess(cmd, alone), httpx.Client(timeout=30) as client:
                (_, owner), (_, other) = replicas
                body = {"prompt": "a b c d e f g h", "max_tokens": 50}
                for i in range(args.samples):
                    for name, port in (("memory", alone), ("redis", owner)):
                        url = f"http://127.0.0.1:{port}/v1/completions/stream"
                        started = time.perf_counter()
                        with client.stream("POST", url, json=body) as r:
                            next(sse(r))
                            first[name].append(time.perf_counter() - started)
                            if name == "redis":
                                stream_id = r.headers["x-stream-id"]
                                cancel = f"http://127.0.0.1:{other}/v1/streams/{stream_id}/cancel"
                                status = client.post(cancel, json={}).status_code
                                cancels[status] = cancels.get(status, 0) + 1
                    if i % 50 == 49:
                        print(f"{i + 1} samples", flush=True)
        finally:
            for proc, _ in replicas:
                proc.terminate()
            redis.stop()
    print_latencies("request → first event of a resumable stream", first)
    ratio = statistics.median(first["redis"]) / statistics.median(first["memory"])
    print(f"redis / memory p50: {ratio:.2f}")
    answers = ", ".join(f"{n} x {status}" for status, n in sorted(cancels.items()))
    print(f"cancel on the other replica right after the first event: {answers}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["cpu", "takeover", "resume", "open"])
    parser.add_argument("--streams", type=int, default=400)
    parser.add_argument("--tokens", type=int, default=300)
    parser.add_argument("--itl-ms", type=float, default=10.0)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--signal", choices=["kill", "term"], default="kill")
    parser.add_argument("--at-once", type=int, default=1, help="takeover: streams per stop")
    parser.add_argument("--samples", type=int, default=50)
    args = parser.parse_args()
    modes = {"cpu": cpu, "takeover": takeover, "resume": resume, "open": open_cost}
    modes[args.what](args)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
