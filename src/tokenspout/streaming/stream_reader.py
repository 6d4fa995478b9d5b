"""Follow a ``Stream`` for one connection: coalesce with a ``FlushPolicy``, add heartbeats.

Yields ``Delta`` (text with the absolute position after it, for resumable event ids),
``Heartbeat`` when nothing was sent for ``heartbeat_s``, and finally ``Finished``. Text that
piles up while the connection is busy sending merges into the next ``Delta``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from tokenspout.streaming.flush_policy import FlushPolicy
from tokenspout.streaming.stream import Stream, StreamEnd
from tokenspout.streaming.wake_timers import Alarm


@dataclass(frozen=True, slots=True)
class Delta:
    text: str
    num_tokens: int
    position: int
    #: The chunks' extras (``EngineOutput.extras``), in order; empty for plain text.
    extras: list = field(default_factory=list)


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
    timers = stream.timers
    heartbeat = Alarm()
    pos = start
    last_sent = loop.time()
    #: When the first token of what is read next arrived, if the stream timed it.
    first_at: float | None = None
    try:
        while True:
            now = loop.time()
            chunks = stream.chunks_from(pos)
            at = now if first_at is None else first_at
            first_at = None
            for chunk in chunks:
                policy.add(chunk.text, chunk.num_tokens, at, chunk.extras)
            pos += len(chunks)
            if stream.end is not None and pos >= stream.length:
                text, tokens = policy.take()
                extras = policy.take_extras()
                if text or extras:
                    yield Delta(text, tokens, pos, extras)
                stream.consumed(pos, len(text))
                yield Finished(stream.end)
                return
            if policy.due(now):
                text, tokens = policy.take()
                yield Delta(text, tokens, pos, policy.take_extras())
                stream.consumed(pos, len(text))
                last_sent = loop.time()
                continue
            if last_sent + heartbeat_s <= now:
                yield Heartbeat()
                last_sent = loop.time()
                continue
            # Woken only when the next event is due: by its tokens, by the flush deadline
            # (which the stream arms when the batch's first token arrives, unless it is
            # known already), or by the heartbeat alarm.
            starts = policy.clock_starts_on_next_token()
            wait = stream.changed(
                policy.tokens_until_due(),
                flush_after_s=policy.flush_ms / 1000.0 if starts else None,
            )
            flush_at = policy.deadline()
            if flush_at is not None:
                timers.wake_at(flush_at, wait.future)
            heartbeat.future = wait.future
            timers.set_alarm(heartbeat, last_sent + heartbeat_s)
            await wait.future
            first_at = wait.first_at
    finally:
        heartbeat.closed = True
        heartbeat.future = None
