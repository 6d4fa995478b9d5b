"""The one async interface every token producer implements.

The server only ever talks to an ``Engine``: it builds a ``Prompt`` (which may raise
``InvalidRequestError``), calls ``generate`` and iterates. The engine never knows about HTTP.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from tokenspout.engine.request import ChatMessage, EngineOutput, Prompt, SamplingParams


@dataclass(frozen=True)
class EngineStats:
    """A snapshot read by the metrics layer at scrape time."""

    running: int
    waiting: int
    prompt_tokens_total: int
    generation_tokens_total: int
    prefix_cache_queries_total: int = 0
    prefix_cache_hits_total: int = 0


class Engine(ABC):
    """A token producer.

    Contract for ``generate``:
    * it yields ``EngineOutput`` items and ends right after the one with ``finish_reason``;
    * closing the iterator early (``aclose()``, or cancelling the task that iterates it)
      aborts the request: it leaves the running batch at the next step, or the queue without
      ever being prefilled, and its slot is freed;
    * ``abort(request_id)`` from anywhere makes the iterator yield a final output with
      ``finish_reason="cancelled"``;
    * a failure inside the engine raises ``EngineError`` from the iterator.
    """

    #: Served model id (``GET /v1/models``).
    model_id: str
    #: Longest prompt + output the engine can hold, in tokens.
    max_model_len: int
    #: True for the synthetic engine, so that every surface can label it.
    synthetic: bool = False

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Load and warm up; called once before serving."""

    async def shutdown(self) -> None:  # noqa: B027 - optional hook
        """Stop background work; called once when the server exits."""

    @abstractmethod
    def encode_completion(self, prompt: str) -> Prompt:
        """Tokenize a raw completion prompt."""

    @abstractmethod
    def encode_chat(self, messages: Sequence[ChatMessage]) -> Prompt:
        """Render the chat template with a generation prompt and tokenize it."""

    @abstractmethod
    def generate(
        self, request_id: str, prompt: Prompt, params: SamplingParams
    ) -> AsyncIterator[EngineOutput]:
        """Start generating; see the class docstring for the contract."""

    @abstractmethod
    def abort(self, request_id: str) -> bool:
        """Cancel a request; returns False when the id is unknown or already finished."""

    @abstractmethod
    def stats(self) -> EngineStats:
        """Counters and gauges for ``/metrics``."""
