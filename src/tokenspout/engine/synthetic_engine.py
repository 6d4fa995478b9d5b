"""SYNTHETIC engine: a deterministic token producer for tests and load, not a language model.

Its output is the last user message's (or the prompt's) whitespace-separated words, each
followed by one space, one word per token, cycled until exactly ``max_tokens`` tokens: it
never stops early. ``ttft_ms`` and ``itl_ms`` set the time to the first token and between
tokens. It queues beyond ``max_num_seqs``, honours cancellation and reports the same stats
as the real engine, so every server path can be exercised without a model.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from tokenspout.engine.interface import Engine, EngineStats
from tokenspout.engine.request import ChatMessage, EngineOutput, Prompt, SamplingParams
from tokenspout.errors import InvalidRequestError

SYNTHETIC_MODEL_ID = "synthetic"


@dataclass
class _Request:
    """Per-request state: ``wake`` is the future a sleeping generator waits on."""

    cancelled: bool = False
    wake: asyncio.Future[None] | None = field(default=None, repr=False)


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class SyntheticEngine(Engine):
    """See the module docstring. Runs on the event loop: it only sleeps."""

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
        self._slots: asyncio.Semaphore | None = None
        self._max_num_seqs = max_num_seqs
        self._requests: dict[str, _Request] = {}
        self._running = 0
        self._waiting = 0
        self._prompt_tokens = 0
        self._generation_tokens = 0

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
            waiting=self._waiting,
            prompt_tokens_total=self._prompt_tokens,
            generation_tokens_total=self._generation_tokens,
        )

    def abort(self, request_id: str) -> bool:
        req = self._requests.get(request_id)
        if req is None or req.cancelled:
            return False
        req.cancelled = True
        if req.wake is not None:
            _wake(req.wake)
        return True

    async def _sleep_until(self, req: _Request, deadline: float) -> None:
        """Sleep until ``deadline`` (loop time) or until the request is aborted."""
        loop = asyncio.get_running_loop()
        if deadline <= loop.time() or req.cancelled:
            return
        req.wake = loop.create_future()
        handle = loop.call_at(deadline, _wake, req.wake)
        try:
            await req.wake
        finally:
            handle.cancel()
            req.wake = None

    async def _acquire_slot(self, req: _Request) -> bool:
        """Wait in the queue for a slot; False if the request was aborted meanwhile."""
        assert self._slots is not None
        if not self._slots.locked():
            await self._slots.acquire()
            return True
        loop = asyncio.get_running_loop()
        self._waiting += 1
        acquire = asyncio.ensure_future(self._slots.acquire())
        req.wake = loop.create_future()
        try:
            await asyncio.wait({acquire, req.wake}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            # Cancelled from outside just as the slot was granted: give it back.
            if acquire.done() and not acquire.cancelled():
                self._slots.release()
            raise
        finally:
            self._waiting -= 1
            req.wake = None
            if not acquire.done():
                acquire.cancel()
        if acquire.cancelled():
            return False
        if req.cancelled:
            self._slots.release()
            return False
        return True

    async def generate(
        self, request_id: str, prompt: Prompt, params: SamplingParams
    ) -> AsyncIterator[EngineOutput]:
        if request_id in self._requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        if self._slots is None:
            self._slots = asyncio.Semaphore(self._max_num_seqs)
        req = _Request()
        self._requests[request_id] = req
        words = itertools.cycle(prompt.text.split())
        n_prompt = len(prompt.token_ids)
        produced = 0
        try:
            if not await self._acquire_slot(req):
                # Aborted while queued: it leaves the queue and is never "prefilled".
                yield EngineOutput("", 0, n_prompt, 0, finish_reason="cancelled")
                return
            try:
                self._running += 1
                self._prompt_tokens += n_prompt
                loop = asyncio.get_running_loop()
                start = loop.time()
                while produced < params.max_tokens:
                    await self._sleep_until(req, start + self.ttft_s + produced * self.itl_s)
                    if req.cancelled:
                        break
                    produced += 1
                    self._generation_tokens += 1
                    done = produced == params.max_tokens
                    yield EngineOutput(
                        text=next(words) + " ",
                        num_tokens=1,
                        prompt_tokens=n_prompt,
                        completion_tokens=produced,
                        finish_reason="length" if done else None,
                    )
                if req.cancelled:
                    yield EngineOutput("", 0, n_prompt, produced, finish_reason="cancelled")
            finally:
                self._running -= 1
                self._slots.release()
        finally:
            del self._requests[request_id]
