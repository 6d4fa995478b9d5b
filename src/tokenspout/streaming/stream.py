"""One generation's life: a log, an end, and the cursors that read it.

A ``Stream`` is the engine's sink for one request: each output the engine pushes is appended
to the stream's ``ReplayBuffer`` (its log). Readers are ``Subscription`` cursors
(``subscribe``), each with its own position; the log keeps what the slowest of them has not
delivered, and when that passes the store's bounds the stream pauses the engine rather than
drop text. Decoupling producer and readers is what lets a stream be cancelled by id and
resumed after a dropped connection. When its last reader leaves, a non-resumable stream is
aborted at once; a resumable one keeps generating for ``resume_grace_s`` waiting for a
reader to come back.

Whatever goes wrong while taking in one output ends this stream only, with an error: the
sink never raises into the engine, whose loop serves every other request.

Positions are absolute chunk indexes: chunk ``i`` is the i-th engine output with text.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from tokenspout.engine.request import EngineOutput
from tokenspout.errors import (
    EngineError,
    InternalError,
    InvalidRequestError,
    StreamMovedError,
    StreamNotResumableError,
    TokenspoutError,
)
from tokenspout.streaming.flush_policy import FlushPolicy
from tokenspout.streaming.stream_store import Chunk, ReplayBuffer
from tokenspout.streaming.subscription import ReadObserver, Subscription
from tokenspout.streaming.wake_timers import WakeTimers

logger = logging.getLogger(__name__)

__all__ = ["Chunk", "Stream", "StreamEnd"]


@dataclass(frozen=True, slots=True)
class StreamEnd:
    """How a stream ended: a finish reason with counts, or an error."""

    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    error: TokenspoutError | None = None


class Stream:
    """A generation with its log and readers. Create through ``StreamRegistry.open``."""

    # Slots: one Stream per open request, and thousands may be open.
    __slots__ = (
        "_abort",
        "_begun",
        "_buffer",
        "_completion_tokens",
        "_cursors",
        "_done",
        "_failure",
        "_grace",
        "_grace_check",
        "_notify_at",
        "_on_end",
        "_on_reader_left",
        "_pause",
        "_read_elsewhere",
        "_resume",
        "_subscribed",
        "_tokens",
        "_waiting",
        "abort_reason",
        "begun",
        "created",
        "end",
        "first_output_at",
        "id",
        "loop",
        "meta",
        "opened_at",
        "owner",
        "paused",
        "positions_ahead",
        "prompt_tokens",
        "resumable",
        "resume_grace_s",
        "timers",
    )

    def __init__(
        self,
        stream_id: str,
        buffer: ReplayBuffer,
        *,
        prompt_tokens: int,
        abort: Callable[[str], bool],
        pause: Callable[[str], None],
        resume: Callable[[str], None],
        resumable: bool = False,
        resume_grace_s: float = 30.0,
        on_end: Callable[[Stream], None] | None = None,
        on_reader_left: Callable[[Stream], None] | None = None,
        timers: WakeTimers | None = None,
        owner: str | None = None,
        meta: Any = None,
        read_elsewhere: Callable[[str], Awaitable[bool]] | None = None,
    ):
        self.id = stream_id
        #: The API key name that opened it: only that key may resume, follow or cancel it.
        self.owner = owner
        #: Whatever its opener needs to read it again (the server keeps the wire format and
        #: the request's options here); the streaming layer never looks inside.
        self.meta = meta
        self.resumable = resumable
        self.resume_grace_s = resume_grace_s
        self.prompt_tokens = prompt_tokens
        self.created = time.time()
        self.opened_at = time.monotonic()
        self.first_output_at: float | None = None
        #: The engine has sent an output (one with no tokens too: an upstream's acceptance).
        self.begun = False
        #: What ``wait_begun`` waits on; made only when it is called.
        self._begun: asyncio.Future[None] | None = None
        self.end: StreamEnd | None = None
        #: Why the stream was aborted from our side (client_disconnect, send_timeout, ...).
        self.abort_reason: str | None = None
        #: The engine holds this request until the readers catch up.
        self.paused = False
        #: A copy of a stream begun on another replica (``cluster``): a reader may resume
        #: after a position not here yet, which the replica that died had sent before its
        #: last write to Redis and which the stream's continuation produces again.
        self.positions_ahead = False
        self._abort = abort
        self._pause = pause
        self._resume = resume
        self._buffer = buffer
        self._cursors: list[Subscription] = []
        self._subscribed = False
        self._grace: asyncio.TimerHandle | None = None
        #: Whether readers on other replicas follow this stream (``cluster``): asked when
        #: the grace period ends, which then starts again rather than cut them off.
        self._read_elsewhere = read_elsewhere
        #: That question while it is asked (held: the loop keeps only weak references).
        self._grace_check: asyncio.Task[None] | None = None
        #: Tokens produced so far, and the cursors waiting for a token count (or a change).
        self._tokens = 0
        self._completion_tokens = 0
        self._waiting: list[Subscription] = []
        #: _notify has work at this token count or before (the nearest wait's target, or
        #: the next token when a wait's flush clock is to start): skipped otherwise.
        self._notify_at: float = math.inf
        self._on_end = on_end
        self._on_reader_left = on_reader_left
        self._failure: TokenspoutError | None = None
        # Kept: asyncio.get_running_loop() costs a getpid() system call on Python 3.11, and
        # a cursor asks for the loop at every event.
        self.loop = asyncio.get_running_loop()
        self._done = self.loop.create_future()
        #: Readers' timed wake-ups (shared by the registry's streams).
        self.timers = timers if timers is not None else WakeTimers()

    # -- the log -------------------------------------------------------------------------

    @property
    def length(self) -> int:
        """Absolute position after the last chunk produced so far."""
        return self._buffer.end

    @property
    def finished(self) -> bool:
        return self.end is not None

    def load(self, start: int, chunks: list[tuple[str, int, Any, int | None]]) -> None:
        """Before any output: the log begins at ``start`` with ``chunks`` (text, tokens,
        extras, token id) produced elsewhere (a stream continued from another replica's)."""
        buffer = self._buffer
        buffer.begin_at(start)
        for text, num_tokens, extras, token_id in chunks:
            buffer.append(text, num_tokens, extras, token_id)
            self._tokens += num_tokens

    def read(self, pos: int) -> list[Chunk]:
        """Chunks at ``pos`` and after; ``StreamGoneError`` if they are no longer held."""
        return self._buffer.read(pos)

    def read_before(self, pos: int) -> list[Chunk]:
        """The chunks still held before ``pos``: all of them on a resumable stream, unless
        memory bounds evicted some or the stream was continued from a copy that held no
        earlier ones."""
        buffer = self._buffer
        return buffer.read(buffer.start)[: max(0, pos - buffer.start)]

    def refused(self) -> TokenspoutError | None:
        """The error the stream ended with before producing anything, if it did."""
        end = self.end
        return end.error if end is not None and not self.length else None

    async def wait_begun(self, timeout_s: float) -> None:
        """Wait, at most ``timeout_s``, for the engine's first output or the stream's end."""
        if self.begun:
            return
        if self._begun is None:
            self._begun = self.loop.create_future()
        await asyncio.wait((self._begun,), timeout=timeout_s)

    async def wait_end(self) -> StreamEnd:
        """Wait until the stream has ended."""
        await asyncio.shield(self._done)
        assert self.end is not None
        return self.end

    # -- cursors -------------------------------------------------------------------------

    def subscribe(
        self,
        policy: FlushPolicy,
        *,
        heartbeat_s: float = math.inf,
        start: int = 0,
        observer: ReadObserver | None = None,
    ) -> Subscription:
        """A new reader from ``start``. Only a resumable stream takes more than one reader:
        ``StreamNotResumableError`` otherwise; ``InvalidRequestError`` past the end;
        ``StreamGoneError`` if that text was released or evicted."""
        if self._subscribed and not self.resumable:
            raise StreamNotResumableError(
                f"stream {self.id} is not resumable, and it has a reader already: open it "
                'with "stream_options": {"resumable": true} (or start the server with '
                "--resumable)"
            )
        # A copy of another replica's stream may lag behind what its client was sent, but
        # once it has ended its length is the stream's own; unless it was cut short
        # (cancelled, failed) after the owner that sent that client more had died: the
        # client then gets the end.
        if start > self.length and self.positions_ahead and self._ended_short():
            start = self.length
        if start > self.length and (self.finished or not self.positions_ahead):
            raise InvalidRequestError(
                f"stream {self.id} is at position {self.length} (tokens so far); cannot resume "
                f"after position {start}"
            )
        self._buffer.read(min(start, self.length))  # raises StreamGoneError with the reason
        cursor = Subscription(self, policy, heartbeat_s=heartbeat_s, start=start, observer=observer)
        self._subscribed = True
        self._cursors.append(cursor)
        if self._grace is not None:
            self._grace.cancel()
            self._grace = None
        self._advanced()
        return cursor

    def _ended_short(self) -> bool:
        end = self.end
        return end is not None and (end.finish_reason == "cancelled" or end.error is not None)

    @property
    def readers(self) -> int:
        return len(self._cursors)

    def _unsubscribe(self, cursor: Subscription, reason: str | None) -> None:
        """A reader left. If it was the last and the stream still runs, abort it with
        ``reason`` now, or after the grace period for a resumable stream."""
        self._cursors.remove(cursor)
        self._advanced()
        if self._on_reader_left is not None:
            self._on_reader_left(self)
        if self._cursors or reason is None or self.finished:
            return
        if self.resumable:
            self.wait_for_reader(reason)
        else:
            self.abort(reason)

    def wait_for_reader(self, reason: str) -> None:
        """A resumable stream without a reader: abort it with ``reason`` after the grace
        period, unless a reader comes (here, or on another replica) meanwhile."""
        if self._cursors or self.finished:
            return
        if self._grace is not None:
            self._grace.cancel()
        self._grace = self.loop.call_later(self.resume_grace_s, self._grace_over, reason)

    def _grace_over(self, reason: str) -> None:
        self._grace = None
        if self._read_elsewhere is None:
            self.abort(reason)
        else:
            self._grace_check = self.loop.create_task(self._check_elsewhere(reason))

    async def _check_elsewhere(self, reason: str) -> None:
        assert self._read_elsewhere is not None
        try:
            elsewhere = await self._read_elsewhere(self.id)
        except Exception:
            logger.warning("stream %s: could not ask for readers elsewhere", self.id, exc_info=True)
            elsewhere = False
        if self._cursors or self.finished or self._grace is not None:
            return  # a reader came here meanwhile, or the stream ended
        if elsewhere:
            self.wait_for_reader(reason)
        else:
            self.abort(reason)

    def _advanced(self) -> None:
        """A cursor moved, came or went: the log keeps from the slowest one, and a paused
        engine goes on once the readers have caught up."""
        cursors = self._cursors
        if not cursors:
            floor = None
        elif len(cursors) == 1:
            floor = cursors[0].delivered
        else:
            floor = min(c.delivered for c in cursors)
        buffer = self._buffer
        buffer.hold_from(floor)
        if self.paused and not buffer.must_pause:
            self.paused = False
            if not self.finished:
                self._resume(self.id)

    def _wait(self, cursor: Subscription, future: asyncio.Future[None], tokens_ahead: int) -> None:
        """``cursor`` waits on ``future`` until ``tokens_ahead`` more tokens exist, or an end,
        a pause or text without tokens; with ``cursor.flush_after_s`` set, the flush clock
        starts at the next token. Called right after reading, with no await in between."""
        cursor.future = future
        cursor.target = self._tokens + tokens_ahead
        if not cursor.queued:
            cursor.queued = True
            self._waiting.append(cursor)
        due = self._tokens + 1 if cursor.flush_after_s is not None else cursor.target
        if due < self._notify_at:
            self._notify_at = due

    # -- aborts ---------------------------------------------------------------------------

    def abort(self, reason: str) -> bool:
        """Stop generating now: the engine frees the request's slot and ends the stream with
        ``finish_reason="cancelled"`` (what readers still attached see). False when it was
        too late: the stream ends (or ended) as it would have, with all its text."""
        if self.finished:
            return False
        self.abort_reason = reason
        if not self._abort(self.id):
            # The engine's last output is already on its way to us.
            logger.debug("stream %s: abort found the request finished", self.id)
            return False
        return True

    def fail(self, err: TokenspoutError, reason: str) -> None:
        """Stop generating and end the stream with ``err`` (readers send an error event)."""
        if self.finished:
            return
        self._failure = err
        self.abort(reason)

    def cancel(self) -> bool:
        """Cancel by request (``/v1/streams/{id}/cancel``, WebSocket ``cancel``); as
        ``abort``, False when it came too late to change how the stream ends."""
        return self.abort("cancelled")

    def cut_readers(self, reason: str) -> None:
        """Cut the connections of the readers that can resume (HTTP) without an end."""
        for cursor in self._cursors:
            if cursor.interrupt is not None:
                cursor.interrupt(reason)

    def moved_away(self, why: str = "this one lost its lease") -> None:
        """Another replica generates this stream now (``why`` this one does not): stop
        generating it here. Readers that can resume (HTTP) have their connection cut without
        an end, so that their clients resume from their last event where the stream goes on
        (two texts of one stream would part after the takeover); any other reader gets
        ``StreamMovedError``."""
        if self.finished:
            return
        self.cut_readers("moved")
        self.fail(
            StreamMovedError(
                f"stream {self.id} is generated by another replica now ({why}); resume it "
                "there with its last event id"
            ),
            "moved",
        )

    # -- producing ---------------------------------------------------------------------

    def receive(self, item: EngineOutput | EngineError) -> None:
        """The engine's sink: buffer an output, wake the readers it makes due, and end the
        stream at the last one. Never raises: a failure here ends this stream only."""
        if self.end is not None:
            return
        try:
            self._take(item)
        except Exception as exc:
            logger.exception("stream %s: could not take an engine output", self.id)
            self._break(InternalError(f"the server could not deliver this answer: {exc}"))

    def _take(self, item: EngineOutput | EngineError) -> None:
        if not self.begun:
            self._begin()
        if isinstance(item, EngineError):
            self._failure = item
            self._finish(StreamEnd(None, self.prompt_tokens, self._completion_tokens, item))
            return
        text, num_tokens, prompt_tokens, completion_tokens, finish_reason, extras, token_id = item
        if self.first_output_at is None and (text or num_tokens or finish_reason is not None):
            self.first_output_at = time.monotonic()
        if prompt_tokens > self.prompt_tokens:
            # An engine that does not tokenize (upstream) learns the count from its server's
            # usage: the request log, the key's metrics and usage sent along use it from now.
            self.prompt_tokens = prompt_tokens
        self._completion_tokens = completion_tokens
        if text or num_tokens:
            buffer = self._buffer
            buffer.append(text, num_tokens, extras, token_id)
            self._tokens += num_tokens
            # Backpressure: text a reader has not delivered is never dropped; past the
            # store's bounds the engine holds the request instead.
            if not self.paused and buffer.must_pause and finish_reason is None:
                self.paused = True
                self._pause(self.id)
                # Readers waiting for a full batch send what they have now.
                self._notify()
                return
        if finish_reason is not None:
            self._finish(StreamEnd(finish_reason, prompt_tokens, completion_tokens, self._failure))
        elif not num_tokens:
            # An output without tokens (rare) wakes every reader, as any other change does.
            self._notify()
        elif self._tokens >= self._notify_at:
            self._notify(self._tokens)

    def _break(self, err: TokenspoutError) -> None:
        """End the stream with ``err`` now, and free the engine's slot if it still runs."""
        self.fail(err, "error")
        if self.end is None:
            # The failing output was the request's last, so no "cancelled" one will come.
            self._finish(StreamEnd(None, self.prompt_tokens, self._completion_tokens, err))

    def _begin(self) -> None:
        self.begun = True
        if self._begun is not None and not self._begun.done():
            self._begun.set_result(None)

    def _finish(self, end: StreamEnd) -> None:
        self.end = end
        if self._grace is not None:
            self._grace.cancel()
        self._notify()
        self._done.set_result(None)
        if self._on_end is not None:
            self._on_end(self)

    def _notify(self, tokens: int | None = None) -> None:
        """Wake the cursors waiting for ``tokens`` or fewer (all of them when None); start
        the flush clock of those that asked for it, and note when there is work next."""
        notify_at = math.inf
        still: list[Subscription] = []
        timers = self.timers
        for cursor in self._waiting:
            future = cursor.future
            if future is None or future.done():
                cursor.queued = False
                continue
            if tokens is None or cursor.target <= tokens:
                future.set_result(None)
                cursor.queued = False
                continue
            if cursor.flush_after_s is not None:
                # Left in the heap if the tokens come first: a done future is skipped.
                timers.wake_at(cursor.armed(self.loop.time()), future)
            if cursor.target < notify_at:
                notify_at = cursor.target
            still.append(cursor)
        self._waiting = still
        self._notify_at = notify_at
