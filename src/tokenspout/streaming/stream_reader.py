"""Follow a ``Stream`` for one connection: coalesce with a ``FlushPolicy``, add heartbeats.

Yields ``Delta`` (text with the absolute position after it, for resumable event ids),
``Heartbeat`` when nothing was sent for ``heartbeat_s``, and finally ``Finished``. Text that
piles up while the connection is busy sending merges into the next ``Delta``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

from tokenspout.streaming.flush_policy import FlushPolicy
from tokenspout.streaming.stream import Stream, StreamEnd


@dataclass(frozen=True, slots=True)
class Delta:
    text: str
    num_tokens: int
    position: int


@dataclass(frozen=True, slots=True)
class Heartbeat:
    pass


@dataclass(frozen=True, slots=True)
class Finished:
    end: StreamEnd


StreamItem = Delta | Heartbeat | Finished


async def read_stream(
    stream: Stream,
    policy: FlushPolicy,
    *,
    heartbeat_s: float,
    start: int = 0,
) -> AsyncIterator[StreamItem]:
    """See the module docstring. The caller attaches/detaches the reader."""
    loop = asyncio.get_running_loop()
    pos = start
    last_sent = loop.time()
    while True:
        now = loop.time()
        chunks = stream.chunks_from(pos)
        for chunk in chunks:
            policy.add(chunk.text, chunk.num_tokens, now)
        pos += len(chunks)
        if stream.end is not None and pos >= stream.length:
            text, tokens = policy.take()
            if text:
                yield Delta(text, tokens, pos)
            stream.consumed(pos, len(text))
            yield Finished(stream.end)
            return
        if policy.due(now):
            text, tokens = policy.take()
            yield Delta(text, tokens, pos)
            stream.consumed(pos, len(text))
            last_sent = loop.time()
            continue
        heartbeat_at = last_sent + heartbeat_s
        if heartbeat_at <= now:
            yield Heartbeat()
            last_sent = loop.time()
            continue
        flush_at = policy.deadline()
        deadline = heartbeat_at if flush_at is None else min(heartbeat_at, flush_at)
        # Not woken for every token: only for the ones that make the next event due. A
        # plain timer wakes it at the deadline (cheaper than an asyncio.timeout scope).
        changed = stream.changed(policy.tokens_until_due())
        timer = loop.call_at(deadline, _wake, changed)
        try:
            await changed
        finally:
            timer.cancel()


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
