"""SYNTHETIC engine: a deterministic token producer for tests and load, not a language model.

Its output continues the last user message's (or the prompt's) whitespace-separated words
with their smallest period, one word per token, each followed by one space, until exactly
``max_tokens`` tokens, or until a ``stop`` string (cut before it, as the embedded engine's
``Detokenizer`` cuts, which does it here too). Words that do not repeat are cycled whole
("a b c" → "a b c a b c ..."); words that already repeat go on from where they are
("a b a" → "b a b a ..."). So its continuation is exact: the prompt followed by part of
its answer has the same smallest period, and the rest follows from it (a chat continues
its final assistant message, ``continue_final_message``; a completion prompt that ends in
whitespace may simply be followed by the text so far, as an upstream's failover does).

It queues beyond ``max_num_seqs``, honours cancellation, pause and resume, and reports the
same stats as the real engine, so every server path can be exercised without a model.

It is paced like a batched engine. A request's first token comes ``ttft_ms`` after it starts
(its "prefill"); then it joins the decode steps, which run every ``itl_ms`` for all running
requests at once and give each one token, as a continuous-batching engine's steps do (ours,
vLLM's). It joins at the first step at least ``itl_ms`` after its first token, so the gap
between the first and second token is between ``itl_ms`` and twice that, and every later
gap is ``itl_ms``. One asyncio timer drives the steps and one heap holds the first
tokens' times: no task or timer per request or per token, so a load test measures the
server rather than this engine.
"""

from __future__ import annotations

import asyncio
import functools
import heapq
import itertools
import logging
import math
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from tokenspout.engine.continuation import Continuation, remaining_params
from tokenspout.engine.detokenizer import Detokenizer
from tokenspout.engine.interface import Engine, EngineStats, OutputSink
from tokenspout.engine.request import (
    ChatMessage,
    EngineOutput,
    FinishReason,
    Prompt,
    SamplingParams,
    check_chat_ending,
)
from tokenspout.errors import EngineError, EngineUnavailableError, InvalidRequestError

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    from tokenspout.engine.tool_calls import Tool

SYNTHETIC_MODEL_ID = "synthetic"

#: Builds an EngineOutput from a tuple in C: the named tuple's generated constructor is a
#: Python function, and one output is built per token.
_output = functools.partial(tuple.__new__, EngineOutput)


def _continued(words: list[str]) -> Iterator[str]:
    """The tokens that go on after ``words`` with their smallest period."""
    # border[i]: length of the longest proper prefix of words[: i + 1] that is also its
    # suffix (Knuth-Morris-Pratt); the smallest period is the length less the longest one.
    border = [0] * len(words)
    for i in range(1, len(words)):
        k = border[i - 1]
        while k and words[i] != words[k]:
            k = border[k - 1]
        border[i] = k + (words[i] == words[k])
    period = len(words) - border[-1]
    cycle = itertools.cycle([word + " " for word in words[:period]])
    return itertools.islice(cycle, len(words) % period, None)


@dataclass(eq=False, slots=True)
class _Request:
    id: str
    words: Iterator[str]
    max_tokens: int
    prompt_tokens: int
    sink: OutputSink
    produced: int = 0
    running: bool = False
    paused: bool = False
    #: Loop time from which it takes part in the decode steps (its first token + itl).
    join_at: float = 0.0
    #: With stop strings: the words so far, as the token ids' text, and the detokenizer that
    #: holds back a possible stop string and cuts at one.
    texts: list[str] | None = None
    detokenizer: Detokenizer | None = None


class SyntheticEngine(Engine):
    """See the module docstring. Runs on the event loop: it only sets timers."""

    synthetic = True
    kind = "synthetic"

    def __init__(
        self,
        *,
        ttft_ms: float = 0.0,
        itl_ms: float = 0.0,
        max_num_seqs: int = 100_000,
        max_model_len: int = 1_000_000,
        model_id: str = SYNTHETIC_MODEL_ID,
    ):
        # Written as what is allowed: NaN fails every comparison, so "< 0" let it through
        # (and every request then failed or waited forever); infinity would never step.
        if not (0 <= ttft_ms < math.inf and 0 <= itl_ms < math.inf):
            raise ValueError(
                "--synthetic-ttft-ms and --synthetic-itl-ms must be finite numbers >= 0"
            )
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
        #: Requests waiting for their first token, by due time, behind one timer.
        self._prefills: list[tuple[float, int, _Request]] = []
        self._order = itertools.count()
        self._prefill_timer: asyncio.TimerHandle | None = None
        self._prefill_at = math.inf
        #: Requests past their first token, in step order, those waiting to join the steps
        #: (a whole itl after their first token), and the step timer.
        self._decoding: dict[str, _Request] = {}
        self._joining: list[_Request] = []
        self._step_timer: asyncio.TimerHandle | None = None
        self._step_at = 0.0

    def encode_completion(self, prompt: str) -> Prompt:
        return self._prompt(prompt, prompt, "prompt")

    def encode_chat(
        self,
        messages: Sequence[ChatMessage],
        tools: Sequence[Tool] = (),
        *,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
    ) -> Prompt:
        if tools:
            raise InvalidRequestError("tools are not supported by this engine", param="tools")
        check_chat_ending(messages, add_generation_prompt, continue_final_message)
        asked = messages[:-1] if continue_final_message else messages
        users = [m.content for m in asked if m.role == "user"]
        source = users[-1] if users else asked[-1].content if asked else ""
        if continue_final_message:
            # The answer so far extends the words: the rest follows on from it.
            source = f"{source} {messages[-1].content}"
        # Every message counts towards the prompt size; only the last user message is echoed.
        counted = " ".join(m.content for m in messages)
        return replace(
            self._prompt(source, counted, "messages"),
            messages=tuple(messages),
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
        )

    def continuation(
        self, prompt: Prompt, params: SamplingParams, sofar: Continuation
    ) -> tuple[Prompt, SamplingParams]:
        rest = remaining_params(params, sofar)
        ids = tuple(range(prompt.num_tokens + len(sofar.text.split())))
        return replace(prompt, text=f"{prompt.text} {sofar.text}", token_ids=ids), rest

    @staticmethod
    def _prompt(source: str, counted: str, param: str) -> Prompt:
        if not source.split():
            raise InvalidRequestError(
                "the synthetic engine echoes words: the prompt needs at least one word",
                param=param,
            )
        return Prompt(text=source, token_ids=tuple(range(len(counted.split()))))

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
        if self.failure is not None:
            raise EngineUnavailableError(f"the engine has stopped: {self.failure}")
        if request_id in self._requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        req = _Request(
            request_id,
            _continued(prompt.text.split()),
            params.max_tokens,
            prompt.num_tokens,
            sink,
        )
        if params.stop:
            texts = req.texts = []
            req.detokenizer = Detokenizer(lambda ids: "".join(texts[i] for i in ids), params.stop)
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
        req.sink(EngineOutput("", 0, req.prompt_tokens, req.produced, "cancelled"))
        return True

    def pause(self, request_id: str) -> None:
        req = self._requests.get(request_id)
        if req is not None:
            req.paused = True

    def resume(self, request_id: str) -> None:
        # A paused request is skipped by the steps; it continues at the next one, at the
        # same pace, rather than bursting the tokens "missed".
        req = self._requests.get(request_id)
        if req is not None:
            req.paused = False

    def _start(self, req: _Request) -> None:
        req.running = True
        self._running += 1
        self._prompt_tokens += req.prompt_tokens
        due = asyncio.get_running_loop().time() + self.ttft_s
        heapq.heappush(self._prefills, (due, next(self._order), req))
        if due < self._prefill_at:
            if self._prefill_timer is not None:
                self._prefill_timer.cancel()
            self._prefill_at = due
            self._prefill_timer = asyncio.get_running_loop().call_at(due, self._prefill_tick)

    def _prefill_tick(self) -> None:
        """First tokens for the requests whose prefill is due; they join the decode steps."""
        try:
            self._prefill_due()
        except Exception as exc:
            self._die(exc)

    def _prefill_due(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        self._prefill_timer, self._prefill_at = None, math.inf
        due: list[_Request] = []
        while self._prefills and self._prefills[0][0] <= now:
            due.append(heapq.heappop(self._prefills)[2])
        if self._prefills:
            self._prefill_at = self._prefills[0][0]
            self._prefill_timer = loop.call_at(self._prefill_at, self._prefill_tick)
        for req in due:
            # An aborted request left `running`; its heap entry is simply dropped.
            if req.running and self._emit(req):
                req.join_at = now + self.itl_s
                self._joining.append(req)
        if self._joining and self._step_timer is None:
            self._step_at = now + self.itl_s
            self._step_timer = loop.call_at(self._step_at, self._step)

    def _step(self) -> None:
        """One decode step: a token for every running request that is not paused."""
        try:
            self._decode()
        except Exception as exc:
            self._die(exc)

    def _decode(self) -> None:
        loop = asyncio.get_running_loop()
        if self._joining:
            # Compared with the step's grid time: a timer may fire a hair early.
            joining, self._joining = self._joining, []
            for req in joining:
                if not req.running:
                    continue
                if req.join_at <= self._step_at:
                    self._decoding[req.id] = req
                else:
                    self._joining.append(req)
        for req in list(self._decoding.values()):
            # A sink may abort another request during the step: `running` is checked here.
            if req.running and not req.paused:
                self._emit(req)
        if not self._decoding and not self._joining:
            self._step_timer = None
            return
        # Keep to the step grid, but a loop more than a step late restarts the grid from now
        # instead of catching up in a burst.
        now = loop.time()
        self._step_at += self.itl_s
        if self._step_at < now:
            self._step_at = now + self.itl_s
        self._step_timer = loop.call_at(self._step_at, self._step)

    def _emit(self, req: _Request) -> bool:
        """Give ``req`` its next token; whether it goes on after this one."""
        req.produced += 1
        self._generation_tokens += 1
        reason: FinishReason | None = None if req.produced < req.max_tokens else "length"
        text = next(req.words)
        if req.detokenizer is not None:
            text, reason = self._cut(req, text, reason)
        if reason is not None:
            self._stop(req)
        try:
            req.sink(_output((text, 1, req.prompt_tokens, req.produced, reason, None, None)))
        except Exception:
            # A sink must not raise (the contract); if one does, only its request ends.
            logger.exception("synthetic engine: the sink of %s raised; dropping it", req.id)
            if req.running:
                self._stop(req)
            return False
        return reason is None

    @staticmethod
    def _cut(
        req: _Request, word: str, reason: FinishReason | None
    ) -> tuple[str, FinishReason | None]:
        """The text a request with stop strings may show for its next ``word`` (what its
        detokenizer releases), and its finish reason: ``"stop"`` at a stop string, else
        ``reason`` (``"length"`` releases what was held back)."""
        assert req.texts is not None and req.detokenizer is not None
        req.texts.append(word)
        text = req.detokenizer.add(len(req.texts) - 1)
        if req.detokenizer.finish_reason is not None:
            return text, "stop"
        return (text + req.detokenizer.flush(), reason) if reason else (text, None)

    def _die(self, exc: Exception) -> None:
        """The step machinery itself failed: nothing can be trusted to advance any more.
        Every request ends with an error, and the engine refuses new ones (``failure``)."""
        logger.exception("synthetic engine failed; it serves no more requests")
        self.failure = f"{type(exc).__name__}: {exc}"
        for timer in (self._step_timer, self._prefill_timer):
            if timer is not None:
                timer.cancel()
        requests = list(self._requests.values())
        self._requests.clear()
        self._queue.clear()
        self._decoding.clear()
        self._joining.clear()
        self._prefills.clear()
        self._running = 0
        error = EngineError(f"the engine failed: {self.failure}")
        for req in requests:
            req.running = False
            try:
                req.sink(error)
            except Exception:
                logger.exception("synthetic engine: the sink of %s raised", req.id)

    def _stop(self, req: _Request) -> None:
        """Take a running request out and start the next queued one."""
        req.running = False
        self._running -= 1
        self._decoding.pop(req.id, None)
        del self._requests[req.id]
        if self._queue:
            self._start(self._queue.popleft())
