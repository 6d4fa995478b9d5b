"""Per-request scheduling state: one ``Sequence`` per generation request.

Pure data: no torch, no I/O. The scheduler and the engine thread mutate it; nothing else
does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum, auto

from tokenspout.engine.request import SamplingParams


class SequenceStatus(Enum):
    """Where a sequence is in its life: queued, holding a slot, or done."""

    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


@dataclass(eq=False)
class Sequence:
    """A prompt and the tokens generated for it so far.

    ``num_computed_tokens`` counts the leading tokens of ``token_ids`` whose KV is in
    ``slot`` (prefilled, reused from the prefix cache, or fed back while decoding). The last
    sampled token is never computed yet: it is fed at the next step.
    """

    seq_id: str
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams = field(default_factory=SamplingParams)
    #: Generation stops at this many output tokens: ``params.max_tokens`` clamped so that
    #: prompt + output fits the model's context (see ``LLMEngine``).
    max_tokens: int = 16
    output_token_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    slot: int | None = None
    num_computed_tokens: int = 0
    #: Prompt tokens whose KV came from the prefix cache instead of being computed.
    num_cached_tokens: int = 0
    #: The logits of the prompt's last token, kept from an identical prompt (an engine
    #: tensor; opaque here): set when the whole prompt came from the cache, so the first
    #: token is sampled from them without a forward pass.
    first_logits: object | None = None

    def __post_init__(self) -> None:
        if not self.prompt_token_ids:
            raise ValueError("a sequence needs at least one prompt token")

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def token_ids(self) -> tuple[int, ...]:
        """Prompt followed by the output so far."""
        return self.prompt_token_ids + tuple(self.output_token_ids)

    @property
    def last_token_id(self) -> int:
        return self.output_token_ids[-1] if self.output_token_ids else self.prompt_token_ids[-1]

    @property
    def computed_token_ids(self) -> tuple[int, ...]:
        """The tokens whose KV the slot holds, in order."""
        return self.token_ids[: self.num_computed_tokens]

    @property
    def is_prefilling(self) -> bool:
        return self.num_computed_tokens < self.num_prompt_tokens
