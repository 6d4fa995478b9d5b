"""The UPSTREAM engine: tokenspout in front of OpenAI-compatible servers (vLLM, llama.cpp's
``llama-server``, TGI, Ollama's ``/v1``, another tokenspout, a hosted API).

It never tokenizes: a prompt is the client's messages (or completion text) as they are, and
the upstream applies its own chat template. Every request goes upstream streamed, so that
tokenspout makes the client's stream (coalescing, heartbeats, resume, cancel) exactly as for
its own engines. How one request is relayed, retried and continued after a failure is
``upstream_relay``; which upstream takes it is ``upstream_pool``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from tokenspout.engine.continuation import Continuation, remaining_params
from tokenspout.engine.interface import Engine, EngineStats, OutputSink
from tokenspout.engine.request import (
    ChatMessage,
    EngineOutput,
    Prompt,
    SamplingParams,
    check_chat_ending,
)
from tokenspout.engine.upstream_metrics import UpstreamMetrics
from tokenspout.engine.upstream_options import UpstreamOptions
from tokenspout.engine.upstream_pool import UpstreamPool
from tokenspout.engine.upstream_relay import UpstreamRelay
from tokenspout.errors import EngineError, InvalidRequestError

if TYPE_CHECKING:
    from prometheus_client.registry import Collector

    from tokenspout.engine.tool_calls import Tool

#: The bound tokenspout's own length checks use: the upstream enforces its own context.
#: ``GET /v1/models`` shows the upstream's (``context_length``), never this.
UNBOUNDED_CONTEXT = 1 << 31


class UpstreamEngine(Engine):
    """See the module docstring."""

    kind = "upstream"
    forwards_fields = True
    tokenizes = False
    refuses_late = True
    max_model_len = UNBOUNDED_CONTEXT

    def __init__(self, options: UpstreamOptions):
        self.options = options
        self.pool = UpstreamPool(options)
        self.metrics = UpstreamMetrics(lambda: self.pool.servers)
        self._relays: dict[str, UpstreamRelay] = {}
        self._prompt_tokens = 0
        self._generation_tokens = 0

    @property
    def model_id(self) -> str:  # type: ignore[override]
        """The first model the upstreams serve (what a request without ``model`` gets)."""
        models = self.pool.models()
        return models[0] if models else "upstream"

    @property
    def failure(self) -> str | None:  # type: ignore[override]
        return self.pool.failure

    @property
    def retry_after_s(self) -> int:  # type: ignore[override]
        return self.pool.retry_after_s

    @property
    def synthetic(self) -> bool:  # type: ignore[override]
        """In front of a tokenspout serving its synthetic engine: labelled as that is."""
        return self.pool.synthetic

    def served_models(self) -> tuple[str, ...]:
        return self.pool.models()

    def context_length(self, model: str) -> int | None:
        """What the upstreams report for ``model``, if they do: tokenspout never guesses
        it (``max_model_len`` above only keeps its own checks out of the upstream's way)."""
        return self.pool.context_length(model)

    def collectors(self) -> tuple[Collector, ...]:
        return self.metrics.collectors()

    async def start(self) -> None:
        await self.pool.start()

    async def shutdown(self) -> None:
        for request_id in list(self._relays):
            self.abort(request_id)
        await self.pool.close()

    def encode_completion(self, prompt: str) -> Prompt:
        if not prompt:
            raise InvalidRequestError("prompt must not be empty", param="prompt")
        return Prompt(prompt)

    def encode_chat(
        self,
        messages: Sequence[ChatMessage],
        tools: Sequence[Tool] = (),
        *,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
    ) -> Prompt:
        if not messages:
            raise InvalidRequestError("messages must not be empty", param="messages")
        check_chat_ending(messages, add_generation_prompt, continue_final_message)
        return Prompt(
            "",
            messages=tuple(messages),
            tools=tuple(tools),
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
        )

    def continuation(
        self, prompt: Prompt, params: SamplingParams, sofar: Continuation
    ) -> tuple[Prompt, SamplingParams]:
        """A completion: the prompt followed by the text so far. A chat: the messages and
        an assistant message holding the text so far, continued (vLLM's
        ``continue_final_message``); one that already continued its final message
        continues it further."""
        rest = remaining_params(params, sofar)
        if rest.echo:
            # The client has had the echo already: the rest of the answer is only the rest.
            fields = {k: v for k, v in rest.extra_body.items() if k != "echo"}
            rest = replace(rest, echo=False, extra_body=fields)
        if not prompt.is_chat:
            return replace(prompt, text=prompt.text + sofar.text), rest
        if prompt.continue_final_message:
            *before, final = prompt.messages
            messages = (*before, final.continued(sofar.text))
        else:
            messages = (*prompt.messages, ChatMessage("assistant", sofar.text))
        continued = replace(
            prompt, messages=messages, add_generation_prompt=False, continue_final_message=True
        )
        return continued, rest

    def check_params(self, params: SamplingParams) -> None:
        """Everything is the upstream's to honour or refuse (with its own 400)."""

    def submit(
        self, request_id: str, prompt: Prompt, params: SamplingParams, sink: OutputSink
    ) -> None:
        if request_id in self._relays:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")

        def finished_sink(item: EngineOutput | EngineError) -> None:
            # The relay is forgotten, and its tokens counted, at its last output.
            if isinstance(item, EngineError) or item.finish_reason is not None:
                relay = self._relays.pop(request_id, None)
                if isinstance(item, EngineOutput):
                    self._prompt_tokens += item.prompt_tokens
                    self._generation_tokens += item.completion_tokens
                elif relay is not None:
                    # A failed answer's tokens were generated (and sent) all the same.
                    self._prompt_tokens += relay.prompt_tokens
                    self._generation_tokens += relay.tokens
            sink(item)

        relay = UpstreamRelay(
            request_id,
            prompt,
            params,
            finished_sink,
            self.pool,
            self.options,
            self.metrics,
            self.continuation,
        )
        self._relays[request_id] = relay
        relay.start()

    def abort(self, request_id: str) -> bool:
        relay = self._relays.get(request_id)
        return relay is not None and relay.cancel()

    def pause(self, request_id: str) -> None:
        relay = self._relays.get(request_id)
        if relay is not None:
            relay.flowing.clear()

    def resume(self, request_id: str) -> None:
        relay = self._relays.get(request_id)
        if relay is not None:
            relay.flowing.set()

    def stats(self) -> EngineStats:
        running = sum(s.outstanding for s in self.pool.servers)
        return EngineStats(
            running=running,
            waiting=self.pool.waiting,
            prompt_tokens_total=self._prompt_tokens,
            generation_tokens_total=self._generation_tokens,
        )
