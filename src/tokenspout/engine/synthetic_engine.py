"""SYNTHETIC engine: a deterministic token producer for tests and load, not a language model.

Its output is the last user message's (or the prompt's) whitespace-separated words, each
followed by one space, one word per token, cycled until exactly ``max_tokens`` tokens: it
never stops early. ``ttft_ms`` and ``itl_ms`` set the time to the first token and between
tokens. It queues beyond ``max_num_seqs``, honours cancellation, pause and resume, and
reports the same stats as the real engine, so every server path can be exercised without a
model.

Token times live in the engine's own heap of ``(due, seq, request)`` tuples behind one
asyncio timer: no task per request, and no asyncio ``TimerHandle`` per token (asyncio
compares those in Python; with 400 streams that heap was the largest cost of a load
test). So load tests measure the server rather than this engine.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from tokenspout.engine.interface import Engine, EngineStats, OutputSink
from tokenspout.engine.request import ChatMessage, EngineOutput, Prompt, SamplingParams
from tokenspout.errors import InvalidRequestError

SYNTHETIC_MODEL_ID = "synthetic"


@dataclass(eq=False)
class _Request:
    """Per-request state; ``t0`` is when it started running (loop time)."""

    id: str
    words: Iterator[str]
    max_tokens: int
    prompt_tokens: int
    sink: OutputSink
    produced: int = 0
    running: bool = False
    paused: bool = False
    t0: float = 0.0
    #: Identifies the request's live heap entry; older entries are skipped when popped.
    entry: int = -1


class SyntheticEngine(Engine):
    """See the module docstring. Runs on the event loop: it only sets timers."""

    synthetic = True

    def __init__(
        self,
        *,
        ttft_ms: float = 0.0,
        itl_ms: float = 0.0,
        max_num_seqs: int = 100_000,
        max_model_len: int = 1_000_000,
        model_id: str = SYNTHETIC_MODEL_ID,
    ):
        if ttft_ms < 0 or itl_ms < 0:
            raise ValueError("synthetic ttft_ms and itl_ms must be >= 0")
        if max_num_seqs < 1:
            raise ValueError("max_num_seqs must be >= 1")
        self.model_id = model_id
        self.max_model_len = max_model_len
        self.ttft_s = ttft_ms / 1000.0
        self.itl_s = itl_ms / 1000.0
        self._max_num_seqs = max_num_seqs
        self._requests: dict[str, _Request] = {}
        self._queue: deque[_Request] = deque()
        self._running = 0
        self._prompt_tokens = 0
        self._generation_tokens = 0
        self._heap: list[tuple[float, int, _Request]] = []
        self._entries = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf

    def encode_completion(self, prompt: str) -> Prompt:
        return self._prompt(prompt, prompt)

    def encode_chat(self, messages: Sequence[ChatMessage]) -> Prompt:
        users = [m.content for m in messages if m.role == "user"]
        source = users[-1] if users else messages[-1].content
        # Every message counts towards the prompt size; only the last user message is echoed.
        counted = " ".join(m.content for m in messages)
        return self._prompt(source, counted)

    @staticmethod
    def _prompt(source: str, counted: str) -> Prompt:
        if not source.split():
            raise InvalidRequestError(
                "the synthetic engine echoes words: the prompt needs at least one word",
                param="prompt",
            )
        return Prompt(token_ids=tuple(range(len(counted.split()))), text=source)

    def stats(self) -> EngineStats:
        return EngineStats(
            running=self._running,
            waiting=len(self._queue),
            prompt_tokens_total=self._prompt_tokens,
            generation_tokens_total=self._generation_tokens,
        )

    def submit(
        self, request_id: str, prompt: Prompt, params: SamplingParams, sink: OutputSink
    ) -> None:
        if request_id in self._requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        req = _Request(
            request_id,
            itertools.cycle(prompt.text.split()),
            params.max_tokens,
            len(prompt.token_ids),
            sink,
        )
        self._requests[request_id] = req
        if self._running < self._max_num_seqs:
            self._start(req)
        else:
            self._queue.append(req)

    def abort(self, request_id: str) -> bool:
        req = self._requests.get(request_id)
        if req is None:
            return False
        if req.running:
            self._stop(req)
        else:
            # Still queued: it leaves the queue and is never "prefilled".
            self._queue.remove(req)
            del self._requests[request_id]
        req.sink(EngineOutput("", 0, req.prompt_tokens, req.produced, finish_reason="cancelled"))
        return True

    def pause(self, request_id: str) -> None:
        req = self._requests.get(request_id)
        if req is not None:
            req.paused = True

    def resume(self, request_id: str) -> None:
        req = self._requests.get(request_id)
        if req is None or not req.paused:
            return
        req.paused = False
        if req.running:
            # Continue at the same pace from now, rather than bursting the tokens "missed".
            loop = asyncio.get_running_loop()
            due = req.t0 + self.ttft_s + req.produced * self.itl_s
            req.t0 += max(0.0, loop.time() - due)
            self._schedule(req)

    def _start(self, req: _Request) -> None:
        req.running = True
        req.t0 = asyncio.get_running_loop().time()
        self._running += 1
        self._prompt_tokens += req.prompt_tokens
        self._schedule(req)

    def _schedule(self, req: _Request) -> None:
        if req.paused:
            return
        due = req.t0 + self.ttft_s + req.produced * self.itl_s
        req.entry = next(self._entries)
        heapq.heappush(self._heap, (due, req.entry, req))
        if due < self._timer_at:
            self._arm(due)

    def _arm(self, due: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = due
        self._timer = asyncio.get_running_loop().call_at(due, self._tick)

    def _tick(self) -> None:
        """Emit one token for every request that is due. One token per request per tick:
        a request already late gets its next token on the next loop turn, so its readers
        see tokens one by one even from ``itl_ms=0``."""
        # Until the end of the tick, _schedule must not arm the timer: a due time already
        # set means "armed", so the timer is armed once, below.
        self._timer, self._timer_at = None, -math.inf
        now = asyncio.get_running_loop().time()
        due: list[_Request] = []
        while self._heap and self._heap[0][0] <= now:
            _, entry, req = heapq.heappop(self._heap)
            if entry == req.entry and req.running and not req.paused:
                due.append(req)
        for req in due:
            self._emit(req)
        self._timer_at = math.inf
        if self._heap:
            self._arm(self._heap[0][0])

    def _emit(self, req: _Request) -> None:
        req.produced += 1
        self._generation_tokens += 1
        done = req.produced == req.max_tokens
        if done:
            self._stop(req)
        else:
            self._schedule(req)
        reason = "length" if done else None
        req.sink(EngineOutput(next(req.words) + " ", 1, req.prompt_tokens, req.produced, reason))

    def _stop(self, req: _Request) -> None:
        """Take a running request out (its heap entry goes stale) and start the next one."""
        req.running = False
        req.entry = -1
        self._running -= 1
        del self._requests[req.id]
        if self._queue:
            self._start(self._queue.popleft())
