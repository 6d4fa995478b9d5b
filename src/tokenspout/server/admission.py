"""Admit: whether a prepared request may start now. Refuse (429 + Retry-After) rather than
queue without bound; 503 while draining or when the engine can no longer generate."""

from __future__ import annotations

from tokenspout.errors import (
    EngineUnavailableError,
    InvalidRequestError,
    OverloadedError,
    ShuttingDownError,
)
from tokenspout.server.server_state import ServerState


def admit(state: ServerState, n: int = 1) -> None:
    """Raise unless ``n`` more streams (a request's choices) may start now."""
    if state.draining:
        raise ShuttingDownError("the server is shutting down; retry on another replica")
    failure = state.engine.failure
    if failure is not None:
        if state.engine.forwards_fields:
            # In front of other servers, this passes when one of them is back.
            raise EngineUnavailableError.upstreams_down(failure, state.engine.retry_after_s)
        raise EngineUnavailableError(f"the engine has stopped: {failure}; restart the server")
    cfg = state.config
    if n > cfg.max_streams:
        # Never admitted, however long the client waits: not a 429 to retry.
        raise InvalidRequestError(
            f"n is {n}, but this server runs at most {cfg.max_streams} streams at once "
            "(--max-streams)",
            param="n",
        )
    if state.cluster is not None:
        return  # counted across replicas: key_admission.admit_shared
    if len(state.streams) + n > cfg.max_streams:
        raise OverloadedError(f"{cfg.max_streams} streams are open; retry shortly", retry_after_s=1)
    if state.engine.stats().waiting >= cfg.max_queued:
        raise OverloadedError(
            f"{cfg.max_queued} requests are already queued; retry shortly", retry_after_s=2
        )
