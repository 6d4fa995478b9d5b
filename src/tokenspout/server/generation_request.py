"""From a validated body (HTTP or WebSocket) to what a stream needs: prompt, sampling
parameters, and the stream options. Shared by every transport so that they validate alike."""

from __future__ import annotations

from dataclasses import dataclass

from tokenspout.engine.request import ChatMessage, Prompt, SamplingParams
from tokenspout.server.api_keys import ApiKey
from tokenspout.server.key_admission import admit_key
from tokenspout.server.request_limits import check_stop
from tokenspout.server.request_parsing import (
    admit,
    check_model,
    check_prompt_chars,
    sampling_params,
)
from tokenspout.server.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    SeedStreamRequest,
    StreamOptions,
)
from tokenspout.server.server_state import ServerState
from tokenspout.streaming.stream import Stream


@dataclass(frozen=True)
class GenerationRequest:
    """A request ready to become a stream. ``kind`` is chat, completion or seed."""

    kind: str
    prompt: Prompt
    params: SamplingParams
    options: StreamOptions


def prepare_chat(state: ServerState, body: ChatCompletionRequest) -> GenerationRequest:
    check_model(state, body.model)
    messages = [ChatMessage(m.role, m.text()) for m in body.messages]
    check_prompt_chars(state, "".join(m.content for m in messages))
    prompt = state.engine.encode_chat(messages)
    return _request(state, "chat", prompt, body, body.max_completion_tokens or body.max_tokens)


def prepare_completion(state: ServerState, body: CompletionRequest) -> GenerationRequest:
    check_model(state, body.model)
    text = body.prompt_text()
    check_prompt_chars(state, text)
    prompt = state.engine.encode_completion(text)
    return _request(state, "completion", prompt, body, body.max_tokens)


def prepare_seed(state: ServerState, body: SeedStreamRequest) -> GenerationRequest:
    check_model(state, body.model)
    check_prompt_chars(state, body.prompt)
    prompt = state.engine.encode_completion(body.prompt)
    params = sampling_params(
        state,
        max_tokens=body.max_tokens,
        temperature=body.temperature,
        seed=body.seed,
        prompt_tokens=len(prompt.token_ids),
    )
    return GenerationRequest("seed", prompt, params, body.stream_options or StreamOptions())


def _request(
    state: ServerState,
    kind: str,
    prompt: Prompt,
    body: ChatCompletionRequest | CompletionRequest,
    max_tokens: int | None,
) -> GenerationRequest:
    check_stop(state.config, body.stop_list())
    params = sampling_params(
        state,
        max_tokens=max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        seed=body.seed,
        stop=body.stop_list(),
        stop_token_ids=tuple(body.stop_token_ids or ()),
        ignore_eos=body.ignore_eos,
        prompt_tokens=len(prompt.token_ids),
    )
    return GenerationRequest(kind, prompt, params, body.stream_options or StreamOptions())


def open_stream(
    state: ServerState, request: GenerationRequest, key: ApiKey | None = None
) -> Stream:
    """Admit the request (and the key's limits) and start generating; the stream is owned
    by ``key``."""
    admit(state)
    if key is not None:
        admit_key(state, key, len(request.prompt.token_ids))
    options = request.options
    resumable = state.config.resumable if options.resumable is None else options.resumable
    return state.streams.open(
        request.prompt,
        request.params,
        kind=request.kind,
        include_usage=options.include_usage,
        resumable=resumable,
        owner=None if key is None else key.name,
    )
