"""The ``n`` choices of one request: ``n`` streams, read as one.

A request with ``n > 1`` is fanned out into ``n`` streams of the same prompt, one engine
request each (vLLM does the same); the engine's prefix cache computes the shared prompt
once. A ``StreamGroup`` holds them under an id of its own, and its one reader
(``GroupCursor``) merges their events, each ``Delta`` carrying its choice's ``index``:

* each choice's end is a ``ChoiceFinished``; after the last one, a ``Finished`` with the
  group's end: the prompt counted once, the completion tokens of all choices summed;
* a choice that fails ends the group with its error, and the others are aborted;
* cancelling the group (by its id) cancels every choice; its reader leaving aborts them all.

A group is not resumable: a position in it would be one position per choice, and an event
id names one. A second reader is refused (``StreamNotResumableError``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from tokenspout.errors import StreamNotResumableError, TokenspoutError
from tokenspout.streaming.flush_policy import FlushPolicy
from tokenspout.streaming.stream import Stream, StreamEnd
from tokenspout.streaming.subscription import (
    Delta,
    Finished,
    Heartbeat,
    ReadObserver,
    Subscription,
)


@dataclass(frozen=True, slots=True)
class ChoiceFinished:
    """Choice ``index`` ended (the group goes on until every choice has)."""

    index: int
    end: StreamEnd


GroupEvent = Delta | Heartbeat | ChoiceFinished | Finished


class StreamGroup:
    """``streams[i]`` generates choice ``i``; see the module docstring. Create through
    ``StreamRegistry.open_group``."""

    resumable = False

    def __init__(
        self,
        group_id: str,
        streams: Sequence[Stream],
        *,
        on_closed: Callable[[StreamGroup], None] | None = None,
    ):
        if len(streams) < 2:
            raise ValueError("a group has at least two streams")
        self.id = group_id
        self.streams = list(streams)
        first = streams[0]
        self.owner = first.owner
        self.meta: Any = first.meta
        self.created = first.created
        self.opened_at = first.opened_at
        self.prompt_tokens = first.prompt_tokens
        self.abort_reason: str | None = None
        self._failure: StreamEnd | None = None
        self._cursor: GroupCursor | None = None
        self._on_closed = on_closed

    @property
    def n(self) -> int:
        return len(self.streams)

    @property
    def first_output_at(self) -> float | None:
        times = [s.first_output_at for s in self.streams if s.first_output_at is not None]
        return min(times) if times else None

    @property
    def length(self) -> int:
        """Events produced so far, over all choices."""
        return sum(s.length for s in self.streams)

    @property
    def end(self) -> StreamEnd | None:
        """Once every choice has ended (or one failed): the prompt once, the completion
        tokens of every choice, the first error."""
        if self._failure is not None:
            return self._failure
        ends = [s.end for s in self.streams]
        if any(e is None for e in ends):
            return None
        return self._sum(ends)  # type: ignore[arg-type]  # none is None here

    @property
    def finished(self) -> bool:
        return self.end is not None

    async def wait_begun(self, timeout_s: float) -> None:
        """``Stream.wait_begun`` for every choice, within one ``timeout_s``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        for s in self.streams:
            await s.wait_begun(max(0.0, deadline - loop.time()))

    def refused(self) -> TokenspoutError | None:
        """The error of a choice that failed before any choice produced anything."""
        if self.length:
            return None
        return next((s.end.error for s in self.streams if s.end and s.end.error), None)

    @property
    def readers(self) -> int:
        return 0 if self._cursor is None or self._cursor.closed else 1

    def subscribe(
        self,
        policy: FlushPolicy,
        *,
        heartbeat_s: float,
        start: int = 0,
        observer: ReadObserver | None = None,
    ) -> GroupCursor:
        """The group's one reader: one cursor per choice, each coalescing as ``policy``."""
        if self._cursor is not None or start != 0:
            raise StreamNotResumableError(
                f"stream {self.id} has {self.n} choices (n > 1), and such a stream is not "
                "resumable: it takes one reader, from its start"
            )
        cursors = [
            s.subscribe(
                FlushPolicy(policy.flush_tokens, policy.flush_ms),
                heartbeat_s=heartbeat_s,
                observer=observer,
            )
            for s in self.streams
        ]
        self._cursor = GroupCursor(self, cursors)
        return self._cursor

    def abort(self, reason: str) -> None:
        """Abort every choice still running; a group never read is forgotten too."""
        self.abort_reason = self.abort_reason or reason
        for s in self.streams:
            s.abort(reason)
        if self._cursor is None:
            self._closed()

    def cancel(self) -> None:
        """Cancel every choice (``/v1/streams/{id}/cancel``)."""
        self.abort("cancelled")

    def _fail(self, end: StreamEnd) -> StreamEnd:
        """A choice failed: the group ends with its error, the other choices are aborted."""
        ends = [s.end for s in self.streams if s.end is not None]
        completion = sum(e.completion_tokens for e in ends)
        self._failure = StreamEnd(None, self._prompt_of(ends), completion, end.error)
        self.abort("error")
        return self._failure

    def _closed(self) -> None:
        if self._on_closed is not None:
            self._on_closed(self)

    def _sum(self, ends: Sequence[StreamEnd]) -> StreamEnd:
        reasons = {e.finish_reason for e in ends}
        reason = "cancelled" if "cancelled" in reasons else ends[0].finish_reason
        completion = sum(e.completion_tokens for e in ends)
        return StreamEnd(reason, self._prompt_of(ends), completion)

    def _prompt_of(self, ends: Sequence[StreamEnd]) -> int:
        """The prompt's tokens, once: as the choices' engine reported them at their end.
        An engine that never tokenizes (upstream) knows them only from its upstream's
        usage, so the count the group opened with is 0 there, as is that of a choice
        cancelled or failed before its upstream said."""
        return max([self.prompt_tokens, *(e.prompt_tokens for e in ends)])


class GroupCursor:
    """The merged events of a group's cursors, each ``Delta`` with its choice's index.

    A choice's next event is asked for only once its previous one was handed on (the
    consumer asked for the next event), so each choice's cursor keeps its own delivery and
    backpressure exactly as a single stream's does.
    """

    def __init__(self, group: StreamGroup, cursors: list[Subscription]):
        self.group = group
        self.cursors = cursors
        self.closed = False

    @property
    def position(self) -> int:
        return sum(c.position for c in self.cursors)

    def close(self, reason: str | None) -> None:
        """Detach every choice's cursor; ``reason`` aborts the choices still running."""
        if self.closed:
            return
        self.closed = True
        for cursor in self.cursors:
            cursor.close(reason)
        self.group._closed()

    def __aiter__(self) -> AsyncIterator[GroupEvent]:
        return self._events()

    async def _events(self) -> AsyncIterator[GroupEvent]:
        iters = [aiter(c) for c in self.cursors]
        pending: dict[asyncio.Future[Any], int] = {}

        def ask(i: int) -> None:
            pending[asyncio.ensure_future(anext(iters[i]))] = i

        for i in range(len(iters)):
            ask(i)
        try:
            while pending:
                done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for future in sorted(done, key=pending.__getitem__):
                    i = pending.pop(future)
                    event = future.result()
                    if isinstance(event, Finished):
                        if event.end.error is not None:
                            yield Finished(self.group._fail(event.end))
                            return
                        yield ChoiceFinished(i, event.end)
                        continue
                    yield replace(event, index=i) if isinstance(event, Delta) else event
                    ask(i)
            end = self.group.end
            assert end is not None
            yield Finished(end)
        finally:
            for future in pending:
                future.cancel()
