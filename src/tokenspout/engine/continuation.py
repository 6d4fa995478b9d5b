"""Where an answer that was cut stands, so that an engine can generate the rest of it.

An engine's ``continuation(prompt, params, sofar)`` turns a request and its ``Continuation``
into the request that generates only what is missing: the same prompt followed by the text
so far, and what is left of ``max_tokens``. The upstream engine uses it to fail over to
another server mid-stream without the client noticing.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from tokenspout.engine.request import SamplingParams
from tokenspout.errors import NothingLeftError


@dataclass(frozen=True)
class Continuation:
    """An answer's state at the cut."""

    #: The answer's text generated (and delivered) so far.
    text: str
    #: The embedded engine's token ids for ``text``, when known (re-tokenizing text need
    #: not give back the ids that produced it).
    token_ids: tuple[int, ...] | None
    #: Tokens generated so far, as the engine that generated them counted them.
    completion_tokens: int


def remaining_params(params: SamplingParams, sofar: Continuation) -> SamplingParams:
    """``params`` for the rest of the answer: ``max_tokens`` less what was generated.
    ``NothingLeftError`` when nothing is left (the answer was complete: ``length``)."""
    left = params.max_tokens - sofar.completion_tokens
    if left < 1:
        raise NothingLeftError(
            f"nothing is left to generate: {sofar.completion_tokens} of "
            f"{params.max_tokens} tokens are already there",
            param="max_tokens",
        )
    return replace(params, max_tokens=left)
