"""Prepare: from a validated body (HTTP or WebSocket) to everything a stream needs — the
model check, the prompt (chat template, tokens), sampling parameters within the server's
limits, and how the stream is to be read (wire format, coalescing, resumability). Shared by
every transport so that they validate alike."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from pydantic import BaseModel

from tokenspout.engine.request import MIN_SEED, ChatMessage, Prompt, SamplingParams
from tokenspout.errors import (
    EngineUnavailableError,
    InvalidRequestError,
    ModelNotFoundError,
    PromptTooLongError,
)
from tokenspout.protocols.stream_wire import StreamWire
from tokenspout.server import advanced_params
from tokenspout.server.request_limits import check_stop
from tokenspout.server.responses_chat import as_chat, responses_params, settings
from tokenspout.server.responses_schema import ResponsesRequest
from tokenspout.server.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    SeedStreamRequest,
    StreamOptions,
    TokenizeRequest,
)
from tokenspout.server.server_state import ServerState

T = TypeVar("T")


@dataclass(frozen=True)
class GenerationRequest:
    """A request ready to become a stream."""

    prompt: Prompt
    params: SamplingParams
    wire: StreamWire
    resumable: bool
    #: The validated request it was prepared from (a takeover prepares it again).
    body: BaseModel | None = None
    #: How many choices to generate for the prompt (``n``).
    n: int = 1

    def prompt_to_log(self, log_prompts: bool) -> str | None:
        """The prompt for the request log (``--log-prompts``): its text, or a chat's
        messages as ``role: content`` lines when another server renders them (upstream)."""
        if not log_prompts:
            return None
        prompt = self.prompt
        if prompt.text or not prompt.messages:
            return prompt.text
        return "\n".join(f"{m.role}: {m.content}" for m in prompt.messages)

    def choice_params(self) -> list[SamplingParams]:
        """The sampling parameters of each choice: with a seed, choice ``i`` draws with
        ``seed + i``, so that the choices differ and each is reproducible. The sum wraps as
        a signed 64-bit one does, so that the choices of the largest seeds are seeds too."""
        seed = self.params.seed
        if seed is None:
            return [self.params] * self.n
        return [
            replace(self.params, seed=(seed + i - MIN_SEED) % 2**64 + MIN_SEED)
            for i in range(self.n)
        ]


#: A prompt of this many characters or more is templated and tokenized on a worker thread:
#: 100,000 characters take ~50 ms, which every stream's next event would wait for on the
#: event loop. Shorter ones take under ~2 ms, less than a thread's round trip would add.
OFF_LOOP_CHARS = 4096


async def off_loop(size: int, work: Callable[[], T]) -> T:
    """``work()``, on a worker thread when its input's ``size`` (characters, tokens) is
    ``OFF_LOOP_CHARS`` or more."""
    if size < OFF_LOOP_CHARS:
        return work()
    return await asyncio.to_thread(work)


async def chat_prompt(state: ServerState, body: ChatCompletionRequest | TokenizeRequest) -> Prompt:
    """A chat's prompt: its messages (and tools) through the engine's chat template."""
    messages = advanced_params.chat_messages(body, state.engine.forwards_fields)
    text = "".join(m.content for m in messages)
    check_prompt_chars(state, text, "messages")
    tools = advanced_params.chat_tools(body)
    return await off_loop(
        len(text),
        lambda: state.engine.encode_chat(
            messages,
            tools,
            add_generation_prompt=body.add_generation_prompt,
            continue_final_message=body.continue_final_message,
        ),
    )


async def completion_prompt(state: ServerState, text: str) -> Prompt:
    """A completion's prompt (its ``prompt`` field)."""
    check_prompt_chars(state, text, "prompt")
    return await off_loop(len(text), lambda: state.engine.encode_completion(text))


async def prepare_chat(state: ServerState, body: ChatCompletionRequest) -> GenerationRequest:
    """A chat completion request ready to become a stream."""
    model = check_model(state, body.model)
    prompt = await chat_prompt(state, body)
    if body.max_completion_tokens is not None:  # it takes precedence, as in OpenAI's API
        max_tokens = (body.max_completion_tokens, "max_completion_tokens")
    else:
        max_tokens = (body.max_tokens, "max_tokens")
    return _request(state, StreamWire("chat", model), prompt, body, *max_tokens)


async def prepare_response(state: ServerState, body: ResponsesRequest) -> GenerationRequest:
    """A Responses API request ready to become a stream: the chat completion it asks for
    (``responses_chat.as_chat``), validated as chat's (an error names the Responses
    field; an upstream's later refusal of it too: ``StreamTransport.told``), read in the
    Responses wire. Never resumable: its events' sequence numbers are one reader's count,
    which another reader, coalesced otherwise, would not repeat."""
    with responses_params():
        chat = as_chat(body)
        model = check_model(state, chat.model)
        prompt = await chat_prompt(state, chat)
        wire = StreamWire("responses", model, settings=settings(body))
        max_tokens = chat.max_completion_tokens
        generation = _request(state, wire, prompt, chat, max_tokens, "max_output_tokens")
    return replace(generation, resumable=False)


async def prepare_completion(state: ServerState, body: CompletionRequest) -> GenerationRequest:
    """A completion request ready to become a stream."""
    if "max_completion_tokens" in (body.model_extra or {}):
        # In front of upstreams, where unknown fields go upstream as sent: chat's name for
        # the limit would reach none that honours it on /v1/completions (the limit goes as
        # max_tokens), so the answer would silently run to the default instead.
        raise InvalidRequestError(
            "max_completion_tokens is the chat endpoint's name for the token limit: "
            "/v1/completions takes max_tokens",
            param="max_completion_tokens",
        )
    model = check_model(state, body.model)
    prompt = await completion_prompt(state, body.prompt_text())
    return _request(
        state, StreamWire("completion", model), prompt, body, body.max_tokens, "max_tokens"
    )


async def prepare_seed(state: ServerState, body: SeedStreamRequest) -> GenerationRequest:
    """A seed stream request (POST body or GET query) ready to become a stream."""
    model = check_model(state, body.model)
    if body.chat:
        check_prompt_chars(state, body.prompt, "prompt")
        message = [ChatMessage("user", body.prompt)]
        prompt = await off_loop(len(body.prompt), lambda: state.engine.encode_chat(message))
    else:
        prompt = await completion_prompt(state, body.prompt)
    params = sampling_params(
        state,
        max_tokens=body.max_tokens,
        temperature=body.temperature,
        seed=body.seed,
        prompt=prompt,
    )
    if state.engine.forwards_fields:
        # The seed body's one field that is the upstream's to honour as the client sent it:
        # the engine sets the model, prompt (or messages), max_tokens and seed itself, and
        # chat and stream_options shape tokenspout's own request and stream.
        sent = body.model_dump(mode="json", include={"temperature"}, exclude_unset=True)
        params = replace(params, extra_body=sent)
    for name in ("include_usage", "continuous_usage_stats"):
        if body.stream_options is not None and getattr(body.stream_options, name):
            raise InvalidRequestError(
                'the seed endpoint\'s events ({"token": ...}) carry no usage: '
                f"stream_options.{name} can only be false (use /v1/completions for one)",
                param=f"stream_options.{name}",
            )
    return _generation(state, StreamWire("seed", model), prompt, params, body)


def check_model(state: ServerState, name: str | None) -> str:
    """The served model id for a request's ``model`` field (omitted or an alias means the
    engine's own)."""
    if name is not None and name in state.engine.served_models():
        return name
    if name is None or name in state.config.model_aliases:
        return state.engine.model_id
    failure = state.engine.failure
    if failure is not None and state.engine.forwards_fields:
        # In front of servers none of which answers, the model list is what they last said
        # (nothing, if none ever answered): "not served" would be the wrong thing to act on.
        raise EngineUnavailableError.upstreams_down(failure, state.engine.retry_after_s)
    served = ", ".join(state.served_names())
    raise ModelNotFoundError(f"model {name!r} is not served here; served: {served}", param="model")


def check_prompt_chars(state: ServerState, text: str, param: str) -> None:
    """``param``: the field the prompt came from (chat's is ``messages``)."""
    limit = state.config.max_prompt_chars
    if len(text) > limit:
        raise PromptTooLongError(
            f"prompt is {len(text)} characters; the limit is {limit}", param=param
        )


def sampling_params(
    state: ServerState,
    *,
    max_tokens: int | None,
    temperature: float,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
    stop: tuple[str, ...] = (),
    stop_token_ids: tuple[int, ...] = (),
    ignore_eos: bool = False,
    echo: bool = False,
    prompt: Prompt,
    max_tokens_field: str = "max_tokens",
) -> SamplingParams:
    """The engine's parameters of a request; ``max_tokens_field``: the body's name for
    ``max_tokens`` (chat's ``max_completion_tokens``), which its errors name."""
    cfg = state.config
    if max_tokens is not None and max_tokens > cfg.max_tokens_limit:
        raise InvalidRequestError(
            f"{max_tokens_field} is {max_tokens}; this server allows at most "
            f"{cfg.max_tokens_limit}",
            param=max_tokens_field,
        )
    prompt_tokens = prompt.num_tokens
    room = state.engine.max_model_len - prompt_tokens
    # Scoring a prompt (echo, max_tokens 0) generates nothing: a whole context can be scored,
    # as evaluation harnesses send one truncated to the model's length.
    scoring = echo and max_tokens == 0
    if room < (0 if scoring else 1):
        # At exactly the context's length the prompt fits but its answer does not: say so.
        raise PromptTooLongError(
            f"prompt is {prompt_tokens} tokens; the model's context is "
            f"{state.engine.max_model_len} tokens, "
            + ("which it exceeds" if room < 0 else "which leaves no room for an answer"),
            param=prompt.field,
        )
    given = max_tokens is not None
    if max_tokens is None:
        max_tokens = min(cfg.default_max_tokens, room)
    elif max_tokens > room:
        raise PromptTooLongError(
            f"prompt ({prompt_tokens} tokens) + {max_tokens_field} ({max_tokens}) exceeds the "
            f"model's context of {state.engine.max_model_len} tokens",
            param=max_tokens_field,
        )
    return SamplingParams(
        max_tokens=max_tokens,
        max_tokens_given=given,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=seed,
        stop=stop,
        stop_token_ids=stop_token_ids,
        ignore_eos=ignore_eos,
        echo=echo,
    )


def _request(
    state: ServerState,
    wire: StreamWire,
    prompt: Prompt,
    body: ChatCompletionRequest | CompletionRequest,
    max_tokens: int | None,
    max_tokens_field: str,
) -> GenerationRequest:
    check_stop(state.config, body.stop_list())
    advanced_params.check_best_of(body)
    if not state.engine.forwards_fields:
        advanced_params.check_served(body)
    params = sampling_params(
        state,
        max_tokens=max_tokens,
        max_tokens_field=max_tokens_field,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        seed=body.seed,
        stop=body.stop_list(),
        stop_token_ids=tuple(body.stop_token_ids or ()),
        ignore_eos=body.ignore_eos,
        echo=isinstance(body, CompletionRequest) and body.echo,
        prompt=prompt,
    )
    params = advanced_params.apply(params, body)
    if state.engine.forwards_fields:
        params = replace(params, extra_body=_forwarded(body))
    state.engine.check_params(params)
    generation = _generation(state, wire, prompt, params, body)
    if body.n == 1:
        return generation
    options = body.stream_options
    if options is not None and options.resumable:
        raise InvalidRequestError(
            "a request with n > 1 is not resumable: ask for one choice, or leave "
            "stream_options.resumable out",
            param="n",
        )
    if generation.wire.continuous_usage:
        raise InvalidRequestError(
            "stream_options.continuous_usage_stats is for one choice: ask for n = 1, or "
            "leave it out",
            param="stream_options.continuous_usage_stats",
        )
    return replace(generation, n=body.n, resumable=False)


#: Fields the engine sets itself when it forwards a request (see ``upstream_body``); the
#: token limit goes with the others, for its name: the engine sets its value.
_NOT_FORWARDED = frozenset(
    {"model", "messages", "prompt", "stream",
     "stream_options", "add_generation_prompt", "continue_final_message",
     # Each of n choices is a stream, and a request upstream, of its own (best_of is n).
     "n", "best_of"}
)  # fmt: skip


def _forwarded(body: ChatCompletionRequest | CompletionRequest) -> dict[str, Any]:
    """The client's own fields, as it sent them (unknown ones included), for an engine that
    passes them on to another server."""
    return body.model_dump(mode="json", by_alias=True, exclude_unset=True, exclude=_NOT_FORWARDED)


def _usage_options(wire: StreamWire, options: StreamOptions) -> StreamWire:
    """``wire`` with the usage and padding a chat or completion's ``stream_options`` ask for
    (the seed endpoint's take none: ``prepare_seed``)."""
    if options.include_obfuscation:
        raise InvalidRequestError(
            "no obfuscation padding is added to the stream: "
            "stream_options.include_obfuscation can only be false",
            param="stream_options.include_obfuscation",
        )
    if options.continuous_usage_stats and not options.include_usage:
        # vLLM ignores it then; here a field that would not be honoured is a 400.
        raise InvalidRequestError(
            "stream_options.continuous_usage_stats needs include_usage: true",
            param="stream_options.continuous_usage_stats",
        )
    if options.include_usage:
        continuous = options.continuous_usage_stats
        wire = replace(wire, include_usage=True, continuous_usage=continuous)
    return wire


def _generation(
    state: ServerState,
    wire: StreamWire,
    prompt: Prompt,
    params: SamplingParams,
    body: ChatCompletionRequest | CompletionRequest | SeedStreamRequest,
) -> GenerationRequest:
    cfg = state.config
    options = body.stream_options
    resumable = cfg.resumable
    if isinstance(options, StreamOptions):
        wire = _usage_options(wire, options)
    if options is not None:
        if options.resumable is not None:
            resumable = options.resumable
        wire = replace(wire, flush_tokens=options.flush_tokens, flush_ms=options.flush_ms)
    params = replace(params, model=wire.model)
    wire = replace(wire, logprobs=params.logprobs is not None)
    return GenerationRequest(prompt, params, wire, resumable, body)
