"""One generation's life, decoupled from the connections that read it.

A producer task pulls ``EngineOutput`` from the engine into a buffer of ``Chunk``; readers
(one HTTP response, a WebSocket stream, a resumed connection) follow the buffer from a
position. Decoupling is what lets a stream be cancelled by id and resumed after a dropped
connection; a non-resumable stream is aborted as soon as its last reader leaves.

Positions are absolute chunk indexes: chunk ``i`` is the i-th engine output with text.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from tokenspout.engine.interface import Engine
from tokenspout.engine.request import EngineOutput, Prompt, SamplingParams
from tokenspout.errors import EngineError, TokenspoutError

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Chunk:
    """The text of one engine output and the tokens it accounts for."""

    text: str
    num_tokens: int


@dataclass(frozen=True, slots=True)
class StreamEnd:
    """How a stream ended: a finish reason with counts, or an error."""

    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    error: TokenspoutError | None = None


class Stream:
    """A generation with its buffer. Create through ``StreamRegistry.open``."""

    def __init__(
        self,
        stream_id: str,
        engine: Engine,
        prompt: Prompt,
        params: SamplingParams,
        *,
        kind: str,
        resumable: bool = False,
        max_unread_bytes: int = 1 << 20,
        on_end: Callable[[Stream], None] | None = None,
    ):
        self.id = stream_id
        #: Which endpoint made it (chat, completion, seed): a resumed reader uses its format.
        self.kind = kind
        self.resumable = resumable
        self.prompt_tokens = len(prompt.token_ids)
        self.created = time.time()
        self.first_token_at: float | None = None
        self.end: StreamEnd | None = None
        #: Why the stream was aborted from our side (client_disconnect, send_timeout, ...).
        self.abort_reason: str | None = None
        self._engine = engine
        self._chunks: deque[Chunk] = deque()
        self._base = 0  # absolute position of self._chunks[0]
        self._unread_bytes = 0
        self._max_unread_bytes = max_unread_bytes
        self._readers = 0
        self._changed = asyncio.Event()
        self._space = asyncio.Event()
        self._space.set()
        self._on_end = on_end
        self._failure: TokenspoutError | None = None
        self._producer = asyncio.create_task(
            self._produce(prompt, params), name=f"stream-{stream_id}"
        )

    # -- reading -----------------------------------------------------------------------

    @property
    def length(self) -> int:
        """Absolute position after the last chunk produced so far."""
        return self._base + len(self._chunks)

    @property
    def finished(self) -> bool:
        return self.end is not None

    def chunks_from(self, pos: int) -> list[Chunk]:
        """Chunks at ``pos`` and after; raises ``LookupError`` if they were already dropped."""
        if pos < self._base:
            raise LookupError(f"stream {self.id}: position {pos} is no longer buffered")
        start = pos - self._base
        return [self._chunks[i] for i in range(start, len(self._chunks))]

    def text(self) -> str:
        """All buffered text (the whole output for a stream nobody has consumed)."""
        return "".join(c.text for c in self._chunks)

    def changed(self) -> asyncio.Event:
        """An event set at the next change (new chunk or end); take it before checking state."""
        return self._changed

    def consumed(self, pos: int) -> None:
        """A reader has delivered everything before ``pos``: release it from memory unless
        the stream is resumable (a resumed reader may need it again)."""
        if self.resumable:
            return
        while self._base < pos and self._chunks:
            chunk = self._chunks.popleft()
            self._base += 1
            self._unread_bytes -= len(chunk.text)
        if self._unread_bytes <= self._max_unread_bytes:
            self._space.set()

    async def wait_end(self) -> StreamEnd:
        """Wait until the producer has finished."""
        await asyncio.shield(self._producer)
        assert self.end is not None
        return self.end

    # -- readers and aborts ----------------------------------------------------------------

    def attach(self) -> None:
        self._readers += 1

    def detach(self, reason: str | None = None) -> None:
        """A reader left. If it was the last and the stream still runs, abort it with
        ``reason`` (resumable streams are kept by the registry for the grace period)."""
        self._readers -= 1
        if self._readers == 0 and reason is not None and not self.finished and not self.resumable:
            self.abort(reason)

    @property
    def readers(self) -> int:
        return self._readers

    def abort(self, reason: str) -> None:
        """Stop generating now (the engine request is closed, its slot freed)."""
        if self.finished or self._producer.done():
            return
        self.abort_reason = reason
        self._producer.cancel()

    def fail(self, err: TokenspoutError, reason: str) -> None:
        """Stop generating and end the stream with ``err`` (readers send an error event)."""
        if not self.finished:
            self._failure = err
            self.abort(reason)

    def cancel(self) -> bool:
        """Cancel by request (``/v1/streams/{id}/cancel``, WebSocket ``cancel``): the engine
        ends the stream with ``finish_reason="cancelled"`` that readers still see."""
        if self.finished:
            return False
        self.abort_reason = "cancelled"
        return self._engine.abort(self.id)

    # -- producing ---------------------------------------------------------------------------

    def _append(self, out: EngineOutput) -> None:
        if out.text or out.num_tokens:
            if self.first_token_at is None and out.text:
                self.first_token_at = time.monotonic()
            self._chunks.append(Chunk(out.text, out.num_tokens))
            self._unread_bytes += len(out.text)
            if not self.resumable and self._unread_bytes > self._max_unread_bytes:
                self._space.clear()
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def _produce(self, prompt: Prompt, params: SamplingParams) -> None:
        last: EngineOutput | None = None
        generator = self._engine.generate(self.id, prompt, params)
        try:
            async for out in generator:
                last = out
                self._append(out)
                # Backpressure: a reader that cannot keep up holds the engine, not our memory.
                await self._space.wait()
                # Let readers see each output on its own (one event per token when asked).
                await asyncio.sleep(0)
            if last is None or last.finish_reason is None:
                raise EngineError("the engine ended the stream without a finish reason")
            self.end = StreamEnd(last.finish_reason, last.prompt_tokens, last.completion_tokens)
        except asyncio.CancelledError:
            done = last.completion_tokens if last else 0
            self.end = StreamEnd("cancelled", self.prompt_tokens, done, error=self._failure)
        except TokenspoutError as err:
            done = last.completion_tokens if last else 0
            self.end = StreamEnd(None, self.prompt_tokens, done, error=err)
        except Exception:
            logger.exception("stream %s: engine failure", self.id)
            done = last.completion_tokens if last else 0
            err = EngineError("the engine failed while generating; the request was stopped")
            self.end = StreamEnd(None, self.prompt_tokens, done, error=err)
        finally:
            # Closing the generator here (not at garbage collection) frees the engine slot now.
            await generator.aclose()
            self._notify()
            if self._on_end is not None:
                self._on_end(self)
