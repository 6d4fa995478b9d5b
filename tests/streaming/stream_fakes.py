"""Small fakes for unit tests of the streaming core, run on the fake clock (tests/fake_clock).

``FakeEngine`` is the producer side: it records ``abort``/``pause``/``resume`` with the loop
time they came at and, like the real engines, answers an abort with a final ``cancelled``
output pushed into the sink at once. Tests script outputs at fake times (``script``) and read
with ``collect``, which notes the loop time of each event.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from tokenspout.engine.interface import OutputSink
from tokenspout.engine.request import EngineOutput, Prompt, SamplingParams
from tokenspout.streaming.stream import Stream
from tokenspout.streaming.stream_store import InMemoryStreamStore, ReplayBuffer
from tokenspout.streaming.subscription import StreamEvent, Subscription

PROMPT = Prompt(token_ids=(1, 2, 3), text="a b c")
PARAMS = SamplingParams(max_tokens=100)

#: One scripted output: (loop time, text) or (loop time, text, finish_reason) or
#: (loop time, text, finish_reason, num_tokens).
Step = tuple[Any, ...]


def now() -> float:
    return asyncio.get_running_loop().time()


async def until(when: float) -> None:
    """Let the fake clock run to ``when`` (every task waits meanwhile, so it jumps)."""
    future = asyncio.get_running_loop().create_future()
    asyncio.get_running_loop().call_at(when, future.set_result, None)
    await future


class FakeEngine:
    """Records what the streaming layer asks of an engine; outputs are pushed by the test."""

    def __init__(self, submit_error: BaseException | None = None):
        self.submit_error = submit_error
        self.sinks: dict[str, OutputSink] = {}
        self.prompt_tokens: dict[str, int] = {}
        self.produced: dict[str, int] = {}
        #: (what, request id, loop time) for every abort, pause and resume, in order.
        self.calls: list[tuple[str, str, float]] = []

    # -- the Engine surface the streaming layer uses --------------------------------------

    def submit(
        self, request_id: str, prompt: Prompt, params: SamplingParams, sink: OutputSink
    ) -> None:
        if self.submit_error is not None:
            raise self.submit_error
        self.sinks[request_id] = sink
        self.prompt_tokens[request_id] = len(prompt.token_ids)
        self.produced[request_id] = 0

    def abort(self, request_id: str) -> bool:
        self.calls.append(("abort", request_id, now()))
        sink = self.sinks.pop(request_id, None)
        if sink is None:
            return False
        sink(
            EngineOutput(
                "", 0, self.prompt_tokens[request_id], self.produced[request_id], "cancelled"
            )
        )
        return True

    def pause(self, request_id: str) -> None:
        self.calls.append(("pause", request_id, now()))

    def resume(self, request_id: str) -> None:
        self.calls.append(("resume", request_id, now()))

    # -- driving it -----------------------------------------------------------------------

    def calls_of(self, what: str) -> list[tuple[str, float]]:
        return [(rid, t) for kind, rid, t in self.calls if kind == what]

    def push(
        self, request_id: str, text: str, finish_reason: str | None = None, num_tokens: int = 1
    ) -> None:
        """The next output of a running request (no effect once it finished)."""
        sink = self.sinks.get(request_id)
        if sink is None:
            return
        self.produced[request_id] += num_tokens
        if finish_reason is not None:
            del self.sinks[request_id]
        sink(
            EngineOutput(
                text,
                num_tokens,
                self.prompt_tokens[request_id],
                self.produced[request_id],
                finish_reason,  # type: ignore[arg-type]
            )
        )

    def script(self, request_id: str, steps: Sequence[Step]) -> None:
        """Push each step's output at its loop time."""
        loop = asyncio.get_running_loop()
        for when, text, *rest in steps:
            finish = rest[0] if rest else None
            num_tokens = rest[1] if len(rest) > 1 else 1
            loop.call_at(when, self.push, request_id, text, finish, num_tokens)

    def stream(
        self,
        stream_id: str = "s1",
        *,
        store: InMemoryStreamStore | None = None,
        resumable: bool = False,
        resume_grace_s: float = 30.0,
    ) -> tuple[Stream, ReplayBuffer]:
        """A ``Stream`` fed by this engine (as ``StreamRegistry.open`` builds one), and its
        buffer. Call on a running loop."""
        store = store if store is not None else InMemoryStreamStore()
        buffer = store.create(stream_id, resumable=resumable)
        stream = Stream(
            stream_id,
            buffer,
            prompt_tokens=len(PROMPT.token_ids),
            abort=self.abort,
            pause=self.pause,
            resume=self.resume,
            resumable=resumable,
            resume_grace_s=resume_grace_s,
        )
        self.submit(stream_id, PROMPT, PARAMS, stream.receive)
        return stream, buffer


async def collect(cursor: Subscription, send_s: float = 0.0) -> list[tuple[float, StreamEvent]]:
    """Read ``cursor`` to its end, noting the loop time of each event; each event takes
    ``send_s`` to "send" before the next is asked for. Detaches the cursor at the end."""
    events: list[tuple[float, StreamEvent]] = []
    try:
        async for event in cursor:
            events.append((now(), event))
            if send_s:
                await until(now() + send_s)
    finally:
        cursor.close(None)
    return events
