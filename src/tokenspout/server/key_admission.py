"""What a key may open: its models (403) and its limits (429), checked as a stream opens,
and the key's counts released when the stream ends."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tokenspout.errors import InvalidRequestError, PermissionDeniedError, RateLimitError
from tokenspout.server.api_keys import ApiKey

if TYPE_CHECKING:
    from tokenspout.server.server_state import ServerState
    from tokenspout.streaming.stream import Stream


def admit_key(state: ServerState, key: ApiKey, model: str, tokens: int, n: int = 1) -> None:
    """Raise 403 for a model the key may not use, 429 over one of its limits; otherwise
    the key's new request and its ``n`` streams are counted (``stream_ended`` gives each
    stream back). ``tokens``: what the request is charged now (``charged_ahead``)."""
    check_model(state, key, model)
    check_choices(key, n)
    try:
        state.key_limiter.admit(key, tokens, n)
    except RateLimitError as err:
        state.key_metrics.refused(key.name, err.limit)
        raise
    state.key_metrics.admitted(key.name, n)


async def admit_shared(
    state: ServerState, key: ApiKey | None, model: str, tokens: int, n: int = 1
) -> None:
    """With ``--redis-url``: the server's and the key's limits for ``n`` new streams,
    counted across replicas in one atomic check (429 over one of them; 503 while Redis is
    unreachable)."""
    if key is not None:
        check_model(state, key, model)
        check_choices(key, n)
    assert state.cluster is not None and state.cluster.admission is not None
    try:
        await state.cluster.admission.admit(key, tokens, n)
    except RateLimitError as err:
        if key is not None:
            state.key_metrics.refused(key.name, err.limit)
        raise
    if key is not None:
        state.key_metrics.admitted(key.name, n)


def charged_ahead(key: ApiKey, max_tokens: int) -> int:
    """What a key with a tokens-per-minute limit is charged ahead for each stream as a
    request is admitted (besides its prompt): the stream's ``max_tokens``, which
    ``stream_ended`` gives back less what the stream generated. Charged only at the end,
    concurrent requests were all admitted while the bucket was still full: 20 of 1,000
    tokens each on a key of 60 a minute. Nothing for a key without the limit."""
    return 0 if key.tokens_per_minute is None else max_tokens


def reserved(state: ServerState, streams: list[Stream], ahead: int) -> None:
    """Record what each of a key's new streams was charged ahead (``charged_ahead``)."""
    if ahead:
        for stream in streams:
            state.key_reserved[stream.id] = ahead


def check_choices(key: ApiKey, n: int) -> None:
    """400 for more choices than the key may ever stream at once (a 429 would have the
    client retry forever)."""
    limit = key.max_concurrent_streams
    if limit is not None and n > limit:
        raise InvalidRequestError(
            f"n is {n}, but key {key.name!r} may stream at most {limit} at once", param="n"
        )


def check_model(state: ServerState, key: ApiKey, model: str) -> None:
    """403 unless the key may use ``model``, the served id the request resolved to (the
    engine's own model also answers to the server's aliases). In front of upstreams that
    serve several models, a key allowed one of them must not reach the others."""
    if key.models is None:
        return
    names = {model}
    if model == state.engine.model_id:
        names.update(state.config.model_aliases)
    if key.models.isdisjoint(names):
        raise PermissionDeniedError(
            f"the API key {key.name!r} may not use the model {model!r}", param="model"
        )


def stream_ended(state: ServerState, stream: Stream) -> None:
    if stream.owner is None:
        return
    completion = stream.end.completion_tokens if stream.end is not None else 0
    # A stream taken over from a dead replica was charged there: nothing to give back.
    _finished(state, stream.owner, completion - state.key_reserved.pop(stream.id, 0))
    state.key_metrics.finished(stream.owner, stream.prompt_tokens, completion)


def release_key(state: ServerState, key_name: str, ahead: int) -> None:
    """An admitted stream that could not be opened after all: its slot is given back, and
    what it was charged ahead."""
    _finished(state, key_name, -ahead)
    state.key_metrics.finished(key_name, 0, 0)


def _finished(state: ServerState, key_name: str, tokens: int) -> None:
    """A stream of ``key_name`` ended: its slot back, ``tokens`` more charged (fewer than 0:
    given back)."""
    if state.cluster is not None and state.cluster.admission is not None:
        state.cluster.admission.finished(key_name, tokens)
    else:
        state.key_limiter.finished(key_name, tokens)
