"""One generation's life, decoupled from the connections that read it.

A ``Stream`` is the engine's sink for one request: each output the engine pushes is
appended to the stream's ``ReplayBuffer``, and readers (an HTTP response, a WebSocket
stream, a resumed connection) follow the buffer from a position and are woken only when
their next event is due. Decoupling is what lets a stream be cancelled by id and resumed
after a dropped connection. When its last reader leaves, a non-resumable stream is aborted
at once; a resumable one keeps generating for ``resume_grace_s`` waiting for a reader to
come back.

Positions are absolute chunk indexes: chunk ``i`` is the i-th engine output with text.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from tokenspout.engine.interface import Engine
from tokenspout.engine.request import EngineOutput, Prompt, SamplingParams
from tokenspout.errors import EngineError, InvalidRequestError, TokenspoutError
from tokenspout.streaming.stream_store import Chunk, ReplayBuffer
from tokenspout.streaming.wake_timers import WakeTimers

logger = logging.getLogger(__name__)

__all__ = ["Chunk", "Stream", "StreamEnd", "Wait"]


@dataclass(frozen=True, slots=True)
class StreamEnd:
    """How a stream ended: a finish reason with counts, or an error."""

    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    error: TokenspoutError | None = None


class Stream:
    """A generation with its buffer. Create through ``StreamRegistry.open``."""

    # Slots: one Stream per open request, and thousands may be open.
    __slots__ = (
        "_buffer",
        "_completion_tokens",
        "_done",
        "_engine",
        "_failure",
        "_grace",
        "_loop",
        "_max_unread_bytes",
        "_notify_at",
        "_on_end",
        "_paused",
        "_readers",
        "_tokens",
        "_unread_bytes",
        "_waits",
        "abort_reason",
        "created",
        "end",
        "first_output_at",
        "id",
        "include_usage",
        "kind",
        "opened_at",
        "owner",
        "prompt_tokens",
        "resumable",
        "resume_grace_s",
        "timers",
    )

    def __init__(
        self,
        stream_id: str,
        engine: Engine,
        prompt: Prompt,
        params: SamplingParams,
        buffer: ReplayBuffer,
        *,
        kind: str,
        include_usage: bool = False,
        resumable: bool = False,
        resume_grace_s: float = 30.0,
        max_unread_bytes: int = 1 << 20,
        on_end: Callable[[Stream], None] | None = None,
        timers: WakeTimers | None = None,
        owner: str | None = None,
    ):
        self.id = stream_id
        #: The API key name that opened it: only that key may resume, follow or cancel it.
        self.owner = owner
        #: Which endpoint made it (chat, completion, seed): a resumed reader uses its format.
        self.kind = kind
        self.include_usage = include_usage
        self.resumable = resumable
        self.resume_grace_s = resume_grace_s
        self.prompt_tokens = len(prompt.token_ids)
        self.created = time.time()
        self.opened_at = time.monotonic()
        self.first_output_at: float | None = None
        self.end: StreamEnd | None = None
        #: Why the stream was aborted from our side (client_disconnect, send_timeout, ...).
        self.abort_reason: str | None = None
        self._engine = engine
        self._buffer = buffer
        self._unread_bytes = 0
        self._max_unread_bytes = max_unread_bytes
        self._readers = 0
        self._grace: asyncio.TimerHandle | None = None
        #: Tokens produced so far, and the readers waiting for a token count (or any change).
        self._tokens = 0
        self._completion_tokens = 0
        self._waits: list[Wait] = []
        #: _notify has work at this token count or before (the nearest wait's target, or
        #: the next token when a wait's flush clock is to start): skipped otherwise.
        self._notify_at: float = math.inf
        #: The engine was asked to hold this request until readers catch up.
        self._paused = False
        self._on_end = on_end
        self._failure: TokenspoutError | None = None
        # Kept: asyncio.get_running_loop() costs a getpid() system call on Python 3.11, and
        # changed() runs for every event.
        self._loop = asyncio.get_running_loop()
        self._done = self._loop.create_future()
        #: Readers' timed wake-ups (shared by the registry's streams).
        self.timers = timers if timers is not None else WakeTimers()
        # The engine pushes outputs to _receive; raises at once if the request cannot start.
        engine.submit(stream_id, prompt, params, self._receive)

    # -- reading -------------------------------------------------------------------------

    @property
    def length(self) -> int:
        """Absolute position after the last chunk produced so far."""
        return self._buffer.end

    @property
    def finished(self) -> bool:
        return self.end is not None

    def chunks_from(self, pos: int) -> list[Chunk]:
        """Chunks at ``pos`` and after; ``StreamGoneError`` if they are no longer held."""
        return self._buffer.read(pos)

    def check_resumable_at(self, pos: int) -> None:
        """Raise unless a reader may start at ``pos``: ``InvalidRequestError`` past the end,
        ``StreamGoneError`` if that text was released or evicted."""
        if pos > self.length:
            raise InvalidRequestError(
                f"stream {self.id} has {self.length} events so far; cannot resume after {pos}"
            )
        if pos < self._buffer.start:
            self._buffer.read(pos)  # raises StreamGoneError with the reason

    def text(self) -> str:
        """All buffered text (the whole output for a stream nobody has consumed)."""
        return "".join(c.text for c in self._buffer.read(self._buffer.start))

    def changed(self, tokens_ahead: int = 1, *, flush_after_s: float | None = None) -> Wait:
        """A wait that is done once ``tokens_ahead`` more tokens exist, or earlier at text
        without tokens, at the end, or at an abort. A coalescing reader asks for the tokens
        that make its next event due, so it is not woken for every token (at 400 streams
        those wake-ups were most of the server's CPU). With ``flush_after_s``, the wait is
        also done that long after the next token arrives, and records when it did
        (``Wait.first_at``): the reader's flush deadline starts there, without a wake-up of
        its own. Take it right after reading the state, with no await in between."""
        wait = Wait(self._tokens + tokens_ahead, self._loop.create_future(), flush_after_s)
        # Waits whose reader timed out are dropped here and at each wake.
        self._waits = [w for w in self._waits if not w.future.done()]
        self._waits.append(wait)
        due = self._tokens + 1 if flush_after_s is not None else wait.tokens
        self._notify_at = min(self._notify_at, due)
        return wait

    def consumed(self, pos: int, nbytes: int) -> None:
        """A reader delivered everything before ``pos`` (``nbytes`` characters of text):
        release it unless the stream is resumable (a resumed reader may need it again)."""
        if self.resumable:
            return
        self._unread_bytes -= nbytes
        if self._paused and self._unread_bytes <= self._max_unread_bytes:
            self._paused = False
            if not self.finished:
                self._engine.resume(self.id)
        self._buffer.release(pos)

    async def wait_end(self) -> StreamEnd:
        """Wait until the stream has ended."""
        await asyncio.shield(self._done)
        assert self.end is not None
        return self.end

    # -- readers and aborts ------------------------------------------------------------

    def attach(self) -> None:
        self._readers += 1
        if self._grace is not None:
            self._grace.cancel()
            self._grace = None

    def detach(self, reason: str | None = None) -> None:
        """A reader left. If it was the last and the stream still runs, abort it with
        ``reason`` now, or after the grace period for a resumable stream."""
        self._readers -= 1
        if self._readers or reason is None or self.finished:
            return
        if self.resumable:
            self._grace = self._loop.call_later(self.resume_grace_s, self.abort, reason)
        else:
            self.abort(reason)

    def abort(self, reason: str) -> None:
        """Stop generating now: the engine frees the request's slot and ends the stream with
        ``finish_reason="cancelled"`` (what readers still attached see)."""
        if self.finished:
            return
        self.abort_reason = reason
        if not self._engine.abort(self.id):
            # The engine's last output is already on its way to us.
            logger.debug("stream %s: abort found the request finished", self.id)

    def fail(self, err: TokenspoutError, reason: str) -> None:
        """Stop generating and end the stream with ``err`` (readers send an error event)."""
        if not self.finished:
            self._failure = err
            self.abort(reason)

    def cancel(self) -> None:
        """Cancel by request (``/v1/streams/{id}/cancel``, WebSocket ``cancel``)."""
        self.abort("cancelled")

    # -- producing ---------------------------------------------------------------------

    def _receive(self, item: EngineOutput | EngineError) -> None:
        """The engine's sink: buffer an output, wake the readers it makes due, and end the
        stream at the last one."""
        if self.end is not None:
            return
        if isinstance(item, EngineError):
            self._failure = item
            self._finish(StreamEnd(None, self.prompt_tokens, self._completion_tokens, item))
            return
        text, num_tokens, prompt_tokens, completion_tokens, finish_reason = item
        if self.first_output_at is None:
            self.first_output_at = time.monotonic()
        self._completion_tokens = completion_tokens
        if text or num_tokens:
            self._buffer.append(text, num_tokens)
            self._tokens += num_tokens
            # Backpressure: a reader that cannot keep up holds the engine, not our memory.
            # Resumable streams are bounded by their store instead: they keep generating
            # while no reader is attached.
            if not self.resumable:
                self._unread_bytes += len(text)
                if self._unread_bytes > self._max_unread_bytes and not self._paused:
                    self._paused = True
                    self._engine.pause(self.id)
        if finish_reason is not None:
            self._finish(StreamEnd(finish_reason, prompt_tokens, completion_tokens, self._failure))
        elif not num_tokens:
            # An output without tokens (rare) wakes every reader, as any other change does.
            self._notify(None)
        elif self._tokens >= self._notify_at:
            self._notify(self._tokens)

    def _finish(self, end: StreamEnd) -> None:
        self.end = end
        if self._grace is not None:
            self._grace.cancel()
        self._notify()
        self._done.set_result(None)
        if self._on_end is not None:
            self._on_end(self)

    def _notify(self, tokens: int | None = None) -> None:
        """Wake the waits for ``tokens`` or fewer (all of them when None); start the flush
        clock of those that asked for it, and note when there is work next."""
        finished = False
        notify_at = math.inf
        for wait in self._waits:
            future = wait.future
            if future.done():
                finished = True
                continue
            if tokens is None or wait.tokens <= tokens:
                future.set_result(None)
                finished = True
                continue
            if wait.flush_after_s is not None:
                wait.first_at = now = self._loop.time()
                # Left in place if the tokens come first: a done future is skipped.
                self.timers.wake_at(now + wait.flush_after_s, future)
                wait.flush_after_s = None
            notify_at = min(notify_at, wait.tokens)
        self._notify_at = notify_at
        if finished:
            self._waits = [w for w in self._waits if not w.future.done()]


class Wait:
    """A reader's wait for a stream to change (``Stream.changed``)."""

    __slots__ = ("first_at", "flush_after_s", "future", "tokens")

    def __init__(self, tokens: int, future: asyncio.Future[None], flush_after_s: float | None):
        self.tokens = tokens
        self.future = future
        self.flush_after_s = flush_after_s
        #: Loop time of the first token after the wait began, if its flush clock was armed.
        self.first_at: float | None = None
