"""From an HTTP request to validated engine inputs; every failure is an ``InvalidRequestError``
(or a subclass) with a message that says what to fix."""

from __future__ import annotations

from typing import TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from tokenspout.engine.request import SamplingParams
from tokenspout.errors import (
    InvalidRequestError,
    ModelNotFoundError,
    OverloadedError,
    PromptTooLongError,
    ShuttingDownError,
    TokenspoutError,
)
from tokenspout.protocols import json_limits
from tokenspout.server.request_body import read_body, require_json
from tokenspout.server.schemas import StreamOptions
from tokenspout.server.server_state import ServerState, state_of

Body = TypeVar("Body", bound=BaseModel)


def describe(err: ValidationError) -> str:
    """pydantic's errors as one line a user can act on: ``field: problem; ...``."""
    parts = []
    for e in err.errors(include_url=False):
        where = ".".join(str(p) for p in e["loc"]) or "body"
        parts.append(f"{where}: {e['msg']}")
    return "; ".join(parts)


async def parse_body(request: Request, model: type[Body], limit: int) -> Body:
    """A JSON body (415 otherwise) of at most ``limit`` bytes (413), nested no deeper than
    ``--max-json-depth``, valid Unicode, validated as ``model``."""
    require_json(request)
    raw = await read_body(request, limit)
    max_depth = state_of(request).config.max_json_depth
    return validate(model, json_limits.loads(raw, "request body", max_depth))


def validate(model: type[Body], data: object) -> Body:
    if not isinstance(data, dict):
        raise InvalidRequestError("request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise InvalidRequestError(describe(err)) from None


def check_model(state: ServerState, name: str | None) -> str:
    """The served model id for a request's ``model`` field (omitted means the served one)."""
    if name is None or name in state.served_names():
        return state.engine.model_id
    served = ", ".join(state.served_names())
    raise ModelNotFoundError(f"model {name!r} is not served here; served: {served}", param="model")


def check_prompt_chars(state: ServerState, text: str) -> None:
    limit = state.config.max_prompt_chars
    if len(text) > limit:
        raise PromptTooLongError(
            f"prompt is {len(text)} characters; the limit is {limit}", param="prompt"
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
    prompt_tokens: int,
) -> SamplingParams:
    cfg = state.config
    if max_tokens is not None and max_tokens > cfg.max_tokens_limit:
        raise InvalidRequestError(
            f"max_tokens is {max_tokens}; this server allows at most {cfg.max_tokens_limit}",
            param="max_tokens",
        )
    room = state.engine.max_model_len - prompt_tokens
    if room < 1:
        raise PromptTooLongError(
            f"prompt is {prompt_tokens} tokens; the model's context is "
            f"{state.engine.max_model_len} tokens",
            param="messages",
        )
    if max_tokens is None:
        max_tokens = min(cfg.default_max_tokens, room)
    elif max_tokens > room:
        raise PromptTooLongError(
            f"prompt ({prompt_tokens} tokens) + max_tokens ({max_tokens}) exceeds the model's "
            f"context of {state.engine.max_model_len} tokens",
            param="max_tokens",
        )
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=seed,
        stop=stop,
        stop_token_ids=stop_token_ids,
        ignore_eos=ignore_eos,
    )


def admit(state: ServerState) -> None:
    """Admission control: refuse (429 + Retry-After) rather than queue without bound."""
    if state.draining:
        raise ShuttingDownError("the server is shutting down; retry on another replica")
    cfg = state.config
    if len(state.streams) >= cfg.max_streams:
        raise OverloadedError(f"{cfg.max_streams} streams are open; retry shortly", retry_after_s=1)
    if state.engine.stats().waiting >= cfg.max_queued:
        raise OverloadedError(
            f"{cfg.max_queued} requests are already queued; retry shortly", retry_after_s=2
        )


def flush_settings(state: ServerState, options: StreamOptions | None) -> tuple[int, float]:
    cfg = state.config
    if options is None:
        return cfg.flush_tokens, cfg.flush_ms
    tokens = options.flush_tokens if options.flush_tokens is not None else cfg.flush_tokens
    ms = options.flush_ms if options.flush_ms is not None else cfg.flush_ms
    return tokens, ms


def engine_error(err: Exception) -> TokenspoutError:
    """Anything an engine's encode step raises, as a client-facing error."""
    if isinstance(err, TokenspoutError):
        return err
    return InvalidRequestError(f"the prompt could not be encoded: {err}")
