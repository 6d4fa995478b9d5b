"""One reader's cursor on a ``Stream``: everything about reading it, in one place.

A ``Subscription`` is made by ``Stream.subscribe`` for each connection that reads a stream
(a new request, a resumed one, one stream of a WebSocket). It owns

* its **position**: what it has read from the stream's log, and what it has *delivered*
  (handed to the connection, which is what the log must keep for it until then);
* **coalescing**: a ``FlushPolicy`` turns the tokens it reads into events;
* its **wake-ups**: it is woken only when its next event is due, by the tokens that make it
  due, by the flush deadline (armed by the stream when the batch's first token arrives), or
  by its heartbeat alarm;
* **backpressure**: what it has not delivered is held by the log, and the stream pauses the
  engine rather than drop it; while paused, whatever is pending is sent at once;
* its **observer** (the request's record), told about each event it delivered.

Iterating it yields ``Delta`` (text, with the absolute position after it for resumable event
ids), ``Heartbeat`` when nothing was sent for ``heartbeat_s``, and finally ``Finished``. An
event counts as delivered when the consumer asks for the next one: a connection that failed
while sending never advances the cursor. ``close(reason)`` detaches it.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from tokenspout.streaming.flush_policy import FlushPolicy
from tokenspout.streaming.wake_timers import Alarm

if TYPE_CHECKING:
    from tokenspout.streaming.stream import Stream, StreamEnd


@dataclass(frozen=True, slots=True)
class Delta:
    text: str
    num_tokens: int
    position: int
    #: The chunks' extras (``EngineOutput.extras``), in order; empty for plain text.
    extras: list = field(default_factory=list)
    #: Which choice of the request it belongs to (``n > 1``: see ``StreamGroup``).
    index: int = 0


@dataclass(frozen=True, slots=True)
class Heartbeat:
    pass


@dataclass(frozen=True, slots=True)
class Finished:
    end: StreamEnd


StreamEvent = Delta | Heartbeat | Finished
_HEARTBEAT = Heartbeat()


class ReadObserver(Protocol):
    """Told about each text event a subscription delivered (the request's record)."""

    def text_sent(self, num_tokens: int) -> None: ...


class Subscription:
    """See the module docstring. Create through ``Stream.subscribe``."""

    # Slots: one per open connection, and thousands may be open.
    __slots__ = (
        "_alarm",
        "_first_at",
        "closed",
        "delivered",
        "flush_after_s",
        "future",
        "heartbeat_s",
        "interrupt",
        "observer",
        "policy",
        "position",
        "queued",
        "stream",
        "target",
    )

    def __init__(
        self,
        stream: Stream,
        policy: FlushPolicy,
        *,
        heartbeat_s: float,
        start: int,
        observer: ReadObserver | None,
    ):
        self.stream = stream
        self.policy = policy
        self.heartbeat_s = heartbeat_s
        self.observer = observer
        #: Next position to read, and the position after the last delivered event.
        self.position = start
        self.delivered = start
        self.closed = False
        #: The wait in progress: done when the stream reaches ``target`` tokens, at an end or
        #: a pause, at the flush deadline, or at the heartbeat. Managed with the stream.
        self.future: asyncio.Future[None] | None = None
        self.target = 0
        #: In the stream's list of waiting cursors.
        self.queued = False
        #: Asks the stream to arm the flush deadline when the next token arrives.
        self.flush_after_s: float | None = None
        #: Loop time of that token, if the stream armed the deadline.
        self._first_at: float | None = None
        self._alarm = Alarm()
        #: Cuts the reader's connection without an end (an HTTP transport sets it), so that
        #: its client resumes from its last event wherever the stream goes on.
        self.interrupt: Callable[[str], None] | None = None

    def __aiter__(self) -> AsyncIterator[StreamEvent]:
        return self._events()

    def close(self, reason: str | None) -> None:
        """Detach from the stream. ``reason`` (client_disconnect, send_timeout, ...) aborts
        a stream left without readers; None leaves it running (it ended, or was handed on)."""
        if self.closed:
            return
        self.closed = True
        self._alarm.closed = True
        self._alarm.future = None
        self.stream._unsubscribe(self, reason)

    def armed(self, now: float) -> float:
        """Called by the stream when the first token of a batch arrives: the flush clock
        starts now. Returns the deadline."""
        self._first_at = now
        assert self.flush_after_s is not None
        deadline = now + self.flush_after_s
        self.flush_after_s = None
        return deadline

    async def _events(self) -> AsyncIterator[StreamEvent]:
        stream = self.stream
        policy = self.policy
        loop = stream.loop
        timers = stream.timers
        alarm = self._alarm
        heartbeat_s = self.heartbeat_s
        last_sent = loop.time()
        while True:
            now = loop.time()
            chunks = stream.read(self.position)
            at = now if self._first_at is None else self._first_at
            self._first_at = None
            for chunk in chunks:
                policy.add(chunk.text, chunk.num_tokens, at, chunk.extras)
            self.position += len(chunks)
            end = stream.end
            if end is not None and self.position >= stream.length:
                text, tokens = policy.take()
                extras = policy.take_extras()
                if text or extras:
                    yield Delta(text, tokens, self.position, extras)
                    self._delivered(tokens)
                yield Finished(end)
                return
            # A paused stream waits for its readers: what is pending goes now.
            if policy.due(now) or (stream.paused and policy.has_output):
                text, tokens = policy.take()
                yield Delta(text, tokens, self.position, policy.take_extras())
                self._delivered(tokens)
                last_sent = loop.time()
                continue
            if last_sent + heartbeat_s <= now:
                yield _HEARTBEAT
                last_sent = loop.time()
                continue
            future = loop.create_future()
            starts = policy.clock_starts_on_next_token()
            self.flush_after_s = policy.flush_ms / 1000.0 if starts else None
            stream._wait(self, future, policy.tokens_until_due())
            flush_at = policy.deadline()
            if flush_at is not None:
                timers.wake_at(flush_at, future)
            alarm.future = future
            if heartbeat_s < math.inf:
                timers.set_alarm(alarm, last_sent + heartbeat_s)
            await future

    def _delivered(self, num_tokens: int) -> None:
        """The consumer took the last event: the log need not keep it for this reader."""
        self.delivered = self.position
        self.stream._advanced()
        if self.observer is not None:
            self.observer.text_sent(num_tokens)
