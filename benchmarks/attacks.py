"""Abuse against a running server on 127.0.0.1, bounded in count and time: each attack
returns what it saw (statuses, 5xx, whether a normal stream still completed) while a
prober measures ``/health`` latency. Shared by ``attack_suite.py`` (the table in
RESULTS.md) and ``tests/attack/test_floods.py`` (the same attacks, smaller, asserting on
statuses and completion, never on latency).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field

from harness import fetch

#: The keys file every attack run uses: a limited key that floods, and the normal user's.
KEYS = """
[[keys]]
name = "flooder"
key = "sk-flood"
max_concurrent_streams = 2
requests_per_minute = 60

[[keys]]
name = "normal"
key = "sk-normal"
"""
KEY = "sk-normal"

_CHUNK = b"10000\r\n" + b" " * 0x10000 + b"\r\n"


@dataclass
class AttackResult:
    name: str
    inputs: str = ""
    statuses: Counter[int] = field(default_factory=Counter)
    #: A normal stream run during the attack, read to its end: its text events and ending.
    stream_events: int = 0
    stream_done: bool = False
    health: list[float] = field(default_factory=list)
    health_statuses: Counter[int] = field(default_factory=Counter)

    @property
    def server_errors(self) -> int:
        return sum(n for status, n in self.statuses.items() if status >= 500)


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One response on a kept-alive connection (Content-Length bodies only)."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return status, await reader.readexactly(length)


async def probe_health(port: int, result: AttackResult, stop: asyncio.Event) -> None:
    """``GET /health`` every 20 ms on a fresh connection each time (as a new client would
    connect), recording latency and status."""
    while not stop.is_set():
        started = time.perf_counter()
        try:
            async with asyncio.timeout(10):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(
                    b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
                )
                status, _ = await _read_response(reader)
                writer.close()
            result.health.append(time.perf_counter() - started)
            result.health_statuses[status] += 1
        except (TimeoutError, OSError, asyncio.IncompleteReadError):
            result.health_statuses[0] += 1
        try:
            await asyncio.wait_for(stop.wait(), 0.02)
        except TimeoutError:
            pass


async def normal_stream(
    port: int, result: AttackResult, headers: dict[str, str], max_tokens: int
) -> None:
    """One SSE completion read to its end while the attack runs."""
    body = json.dumps({"prompt": "a b c d", "max_tokens": max_tokens, "stream": True}).encode()
    res = await fetch(port, "/v1/completions", body, headers=headers, timeout_s=120)
    text = res.body.decode(errors="replace")
    result.stream_events = text.count('data: {"id"')
    result.stream_done = res.status == 200 and "data: [DONE]" in text


async def key_flood(
    port: int, key: str, *, total: int, connections: int = 20, rate_per_s: float = 1000.0
) -> AttackResult:
    """``total`` requests from one key at up to ``rate_per_s``, on kept-alive connections."""
    result = AttackResult("key flood", f"{total} requests from one key at <= {rate_per_s:g}/s")
    body = json.dumps({"prompt": "x", "max_tokens": 1}).encode()
    request = (
        f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    started = time.perf_counter()
    sent = 0

    async def worker() -> None:
        nonlocal sent
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while sent < total:
                n = sent
                sent += 1
                # Pace: request n goes no earlier than n / rate after the start.
                delay = started + n / rate_per_s - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                writer.write(request)
                status, _ = await _read_response(reader)
                result.statuses[status] += 1
        finally:
            writer.close()

    await asyncio.gather(*(worker() for _ in range(connections)))
    elapsed = time.perf_counter() - started
    result.inputs += f" (sent in {elapsed:.1f} s: {total / elapsed:.0f}/s)"
    return result


async def slowloris(
    port: int, *, connections: int, hold: asyncio.Event, max_s: float = 60.0
) -> AttackResult:
    """``connections`` sockets that each send part of a request head and then one header
    byte a second, until ``hold`` is set (or ``max_s``). ``statuses`` counts how each
    ended: 0 still open at the end, 408/431 or -1 (closed without an answer) by the server."""
    result = AttackResult("slowloris", f"{connections} half-open connections")

    async def one() -> None:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            result.statuses[-2] += 1  # could not connect
            return
        held = asyncio.ensure_future(hold.wait())
        try:
            writer.write(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
            deadline = time.monotonic() + max_s
            while not hold.is_set() and time.monotonic() < deadline:
                read = asyncio.ensure_future(reader.read(1024))
                done, _ = await asyncio.wait(
                    [read, held],
                    timeout=1.0,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if read in done:
                    data = read.result()
                    ended = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/") else -1
                    result.statuses[ended] += 1
                    return
                read.cancel()
                writer.write(b"a")  # one more byte of a header that never ends
            result.statuses[0] += 1
        except OSError:
            result.statuses[-1] += 1
        finally:
            held.cancel()
            writer.close()

    await asyncio.gather(*(one() for _ in range(connections)))
    return result


async def idle_websockets(
    port: int, *, sockets: int, hold: asyncio.Event, key: str | None = None
) -> AttackResult:
    """``sockets`` WebSocket handshakes that then send nothing until ``hold`` is set."""
    result = AttackResult("idle WebSockets", f"{sockets} WebSockets that send nothing")
    query = "" if key is None else f"?api_key={key}"
    handshake = (
        f"GET /v1/ws{query} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n"
    ).encode()

    async def one() -> None:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            result.statuses[0] += 1
            return
        try:
            writer.write(handshake)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
            result.statuses[int(head.split(b" ", 2)[1])] += 1
            await hold.wait()
        except (OSError, TimeoutError, asyncio.IncompleteReadError):
            result.statuses[0] += 1
        finally:
            writer.close()

    await asyncio.gather(*(one() for _ in range(sockets)))
    return result


async def _send_until_answered(port: int, head: bytes, filler: bytes, count: int) -> int:
    """Send ``head``, then ``filler`` up to ``count`` times until the server answers; the
    answer's status (0: closed without one)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    read = asyncio.ensure_future(reader.read(1024))
    try:
        writer.write(head)
        for _ in range(count):
            if read.done():
                break
            writer.write(filler)
            await writer.drain()
    except OSError:
        pass  # the server closed while we were sending: its answer may be in the buffer
    try:
        data = await asyncio.wait_for(read, 30)
    except (OSError, TimeoutError):
        data = b""
    finally:
        writer.close()
    return int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/") else 0


async def body_flood(
    port: int, *, requests: int, body_mb: int, key: str | None = None
) -> AttackResult:
    """Chunked bodies of ``body_mb`` MB each, all at once."""
    result = AttackResult("oversized chunked bodies", f"{requests} x {body_mb} MB chunked")
    auth = "" if key is None else f"Authorization: Bearer {key}\r\n"
    head = (
        "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"{auth}Transfer-Encoding: chunked\r\n\r\n"
    ).encode()
    statuses = await asyncio.gather(
        *(_send_until_answered(port, head, _CHUNK, body_mb * 16) for _ in range(requests))
    )
    result.statuses.update(statuses)
    return result


async def header_flood(port: int, *, requests: int, header_mb: int) -> AttackResult:
    """Requests whose one header never ends (``header_mb`` MB at most), all at once."""
    result = AttackResult("never-ending headers", f"{requests} x {header_mb} MB header")
    head = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: "
    statuses = await asyncio.gather(
        *(_send_until_answered(port, head, b"a" * 65536, header_mb * 16) for _ in range(requests))
    )
    result.statuses.update(statuses)
    return result


async def deep_json(port: int, *, requests: int, key: str | None = None) -> AttackResult:
    """Bodies of 100,000 nested ``[``, on the generation endpoints."""
    result = AttackResult("deeply nested JSON", f"{requests} bodies of 100,000 '['")
    body = b"[" * 100_000
    for i in range(requests):
        path = ("/v1/chat/completions", "/v1/completions", "/v1/completions/stream")[i % 3]
        headers = {} if key is None else {"Authorization": f"Bearer {key}"}
        res = await fetch(port, path, body, headers=headers)
        result.statuses[res.status] += 1
    return result


@dataclass
class Observed:
    result: AttackResult
    baseline_rss: int
    peak_rss: int


async def observe(
    port: int,
    rss: Callable[[], int],
    attack: Callable[[asyncio.Event], Coroutine[None, None, AttackResult]],
    *,
    stream_headers: dict[str, str],
    stream_tokens: int = 200,
) -> Observed:
    """Run ``attack`` while a normal stream is read to its end, ``/health`` is probed and
    the server's RSS sampled. The attack gets an event set once the normal stream ended
    (attacks that hold connections hold them until then)."""
    baseline = peak = rss()
    stop = asyncio.Event()
    watched = AttackResult("")

    async def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, rss())
            try:
                await asyncio.wait_for(stop.wait(), 0.05)
            except TimeoutError:
                pass

    stream_over = asyncio.Event()
    attacking = asyncio.create_task(attack(stream_over))
    observers = [
        asyncio.create_task(probe_health(port, watched, stop)),
        asyncio.create_task(sample()),
    ]
    await normal_stream(port, watched, stream_headers, stream_tokens)
    stream_over.set()
    result = await attacking
    stop.set()
    await asyncio.gather(*observers)
    result.health, result.health_statuses = watched.health, watched.health_statuses
    result.stream_events, result.stream_done = watched.stream_events, watched.stream_done
    return Observed(result, baseline, max(peak, rss()))
