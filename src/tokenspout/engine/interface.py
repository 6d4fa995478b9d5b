"""The one async interface every token producer implements.

The server only ever talks to an ``Engine``: it builds a ``Prompt`` (which may raise
``InvalidRequestError``) and ``submit``s it with a sink (a ``Stream``). The engine never knows
about HTTP.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tokenspout.engine.continuation import Continuation
from tokenspout.engine.request import ChatMessage, EngineOutput, Prompt, SamplingParams
from tokenspout.errors import EngineError, InvalidRequestError

if TYPE_CHECKING:
    from prometheus_client.registry import Collector

    from tokenspout.engine.tool_calls import Tool


#: ``owned_by`` of a model a synthetic engine serves (``GET /v1/models``): how clients and
#: a tokenspout in front of it tell its figures from a model's.
SYNTHETIC_OWNER = "tokenspout-synthetic"


@dataclass(frozen=True)
class EngineStats:
    """A snapshot read by the metrics layer at scrape time."""

    running: int
    waiting: int
    prompt_tokens_total: int
    generation_tokens_total: int
    prefix_cache_queries_total: int = 0
    prefix_cache_hits_total: int = 0


#: Receives a request's outputs on the event-loop thread, in order; the last one has a
#: ``finish_reason``, or is an ``EngineError``.
OutputSink = Callable[[EngineOutput | EngineError], None]


class Engine(ABC):
    """A token producer.

    Engines push: ``submit`` starts a request and every output goes to its sink on the event
    loop, with no task switch per token (at thousands of streams, waking one task per token
    per stream was most of the server's CPU). ``generate`` is the pull-style view over it.

    * ``submit`` raises ``InvalidRequestError``/``EngineError`` at once for a request that
      cannot start; afterwards outputs arrive until one has ``finish_reason`` set, or an
      ``EngineError`` ends the request;
    * ``abort(request_id)`` makes the request leave the running batch at the next step, or
      the queue without ever being prefilled, frees its slot, and pushes a final output with
      ``finish_reason="cancelled"``;
    * a sink must not raise; should one raise anyway, the engine ends that request only
      (it aborts it) and goes on serving the others;
    * ``pause``/``resume`` are backpressure hints: a consumer that cannot keep up asks the
      engine to hold a request's tokens; engines that cannot hold one request ignore them.
    """

    #: Served model id (``GET /v1/models``).
    model_id: str
    #: Longest prompt + output the engine can hold, in tokens.
    max_model_len: int
    #: True for the synthetic engine, so that every surface can label it.
    synthetic: bool = False
    #: What kind of engine this is (``/health``, ``tokenspout_engine_info``).
    kind: str = "embedded"
    #: The engine sends requests on to other servers, with the client's fields as given
    #: (``SamplingParams.extra_body``): fields tokenspout does not know are theirs to
    #: honour, kept rather than refused; and its ``failure`` passes when they are back.
    forwards_fields: bool = False
    #: The engine reads prompts as token ids (``Prompt.token_ids``); one in front of other
    #: servers sends them text, and has no ids to count (``/tokenize``).
    tokenizes: bool = True
    #: The engine learns whether a request is refused only after ``submit`` (an upstream
    #: server's status): it sends an output with no tokens once the request is accepted,
    #: and a streamed response waits for that (or the first token) before answering 200,
    #: so that a refusal gets its own status rather than a 200 and an error event.
    refuses_late: bool = False
    #: Why the engine can no longer generate (its loop died), or None while it can. The
    #: server then fails ``/health`` and answers new requests with 503.
    failure: str | None = None
    #: While the servers it is in front of are all down (``failure``, ``forwards_fields``):
    #: seconds until it looks for them again, the 503's ``Retry-After``.
    retry_after_s: int = 1

    def served_models(self) -> tuple[str, ...]:
        """Model ids a request may name (an engine in front of other servers has several)."""
        return (self.model_id,)

    def context_length(self, model: str) -> int | None:
        """``model``'s context length for ``GET /v1/models``, or None when it is not known
        (an upstream that does not say)."""
        return self.max_model_len

    def collectors(self) -> tuple[Collector, ...]:
        """Prometheus collectors of the engine's own metrics, beyond ``stats``."""
        return ()

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Load and warm up; called once before serving."""

    async def shutdown(self) -> None:  # noqa: B027 - optional hook
        """Stop background work; called once when the server exits."""

    @abstractmethod
    def encode_completion(self, prompt: str) -> Prompt:
        """Tokenize a raw completion prompt."""

    @abstractmethod
    def encode_chat(
        self,
        messages: Sequence[ChatMessage],
        tools: Sequence[Tool] = (),
        *,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
    ) -> Prompt:
        """A chat prompt: ``messages`` (and ``tools`` the model may call) ending with a
        generation prompt, or with the final (assistant) message left open for the model to
        continue (vLLM's ``continue_final_message``; never both). An engine with a local
        model renders its chat template and tokenizes here; ``InvalidRequestError`` for
        tools the engine cannot offer."""

    def detokenize(self, token_ids: Sequence[int]) -> str:
        """The text of ``token_ids`` (special tokens included), for an engine with a
        tokenizer; ``InvalidRequestError`` for an id outside its vocabulary, and from an
        engine without one (the default)."""
        raise InvalidRequestError(
            "this engine has no tokenizer to read token ids with", param="tokens"
        )

    def token_strs(self, token_ids: Sequence[int]) -> list[str]:
        """Each id's entry in the vocabulary, as its tokenizer spells it (``Ġworld``);
        raises as ``detokenize`` does."""
        raise InvalidRequestError(
            "this engine has no tokenizer to read token ids with", param="return_token_strs"
        )

    @abstractmethod
    def continuation(
        self, prompt: Prompt, params: SamplingParams, sofar: Continuation
    ) -> tuple[Prompt, SamplingParams]:
        """The prompt and params that generate the rest of the answer to ``prompt`` whose
        first part is ``sofar`` (``max_tokens`` less ``sofar.completion_tokens``;
        ``NothingLeftError`` when nothing is left, any other ``InvalidRequestError`` when
        this engine cannot continue such an answer). Under greedy decoding the first part
        followed by the rest is the answer an uncut request would have given, up to
        rounding: an engine that computes the first part again may flip a near-tie."""

    def continuation_refusal(self, params: SamplingParams) -> InvalidRequestError | None:
        """Why ``continuation`` refuses every answer generated with ``params``, or None
        where it continues them (a replica hands over to the others only the streams
        they can go on with)."""
        return None

    def check_params(self, params: SamplingParams) -> None:
        """Raise ``InvalidRequestError`` naming the first field of ``params`` this engine
        cannot honour (never accept and ignore). By default: everything beyond plain
        temperature/top-p/top-k sampling."""
        grammar = params.grammar
        unsupported = {
            (grammar and grammar.param) or "response_format": grammar is not None
            and not params.tool_calls,
            "tools": params.tool_calls,
            "logprobs": params.logprobs is not None,
            "min_p": params.min_p != 0.0,
            "presence_penalty": params.presence_penalty != 0.0,
            "frequency_penalty": params.frequency_penalty != 0.0,
            "repetition_penalty": params.repetition_penalty != 1.0,
            "logit_bias": bool(params.logit_bias),
            "echo": params.echo,
            "stop_token_ids": bool(params.stop_token_ids),
        }
        for name, used in unsupported.items():
            if used:
                raise InvalidRequestError(f"{name} is not supported by this engine", param=name)

    @abstractmethod
    def submit(
        self, request_id: str, prompt: Prompt, params: SamplingParams, sink: OutputSink
    ) -> None:
        """Start generating; see the class docstring for the contract."""

    @abstractmethod
    def abort(self, request_id: str) -> bool:
        """Cancel a request; returns False when the id is unknown or already finished."""

    def pause(self, request_id: str) -> None:  # noqa: B027 - optional hint
        """Hold this request's next tokens until ``resume`` (a hint)."""

    def resume(self, request_id: str) -> None:  # noqa: B027 - optional hint
        """Undo ``pause``."""

    @abstractmethod
    def stats(self) -> EngineStats:
        """Counters and gauges for ``/metrics``."""

    async def generate(
        self, request_id: str, prompt: Prompt, params: SamplingParams
    ) -> AsyncIterator[EngineOutput]:
        """Iterate a request's outputs; closing the iterator early aborts the request."""
        queue: asyncio.Queue[EngineOutput | EngineError] = asyncio.Queue()
        self.submit(request_id, prompt, params, queue.put_nowait)
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, EngineError):
                    finished = True
                    raise item
                finished = item.finish_reason is not None
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self.abort(request_id)
