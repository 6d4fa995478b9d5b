"""What a generation request carries into an engine and what comes back out."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

from tokenspout.errors import InvalidRequestError

FinishReason = Literal["stop", "length", "cancelled"]


@dataclass(frozen=True)
class ChatMessage:
    """One message of a chat; ``role`` is system, user, assistant or tool."""

    role: str
    content: str


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. ``temperature == 0`` means greedy; ``top_k <= 0`` disables top-k."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise InvalidRequestError("max_tokens must be at least 1", param="max_tokens")
        if not 0.0 <= self.temperature <= 2.0:
            raise InvalidRequestError("temperature must be between 0 and 2", param="temperature")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequestError("top_p must be in (0, 1]", param="top_p")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class Prompt:
    """A prompt ready for an engine, built by ``Engine.encode_completion/encode_chat``.

    ``token_ids`` is what the model consumes; ``text`` is the rendered prompt (chat template
    applied). Engines read whichever they need: the synthetic engine echoes ``text``'s words.
    """

    token_ids: tuple[int, ...]
    text: str


class EngineOutput(NamedTuple):
    """One step's worth of output for one request (a named tuple: one is built per token,
    and a tuple is the cheapest immutable record to build).

    ``text`` is the new text since the previous output; it may be empty when the
    detokenizer holds back an incomplete UTF-8 character or a possible stop string.
    ``num_tokens`` is the number of new tokens this output accounts for. The last output of
    a request has ``finish_reason`` set; counts are cumulative for the request.
    """

    text: str
    num_tokens: int
    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason | None = None
