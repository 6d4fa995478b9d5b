"""Coalescing: when buffered tokens become one event. Pure: time is passed in, no I/O.

The first visible text is sent the moment it exists (that is the time to first token people
see). After that, tokens are held and sent together when ``flush_tokens`` are pending or
``flush_ms`` has passed since the oldest pending one, whichever comes first. The end of the
stream always flushes (``take`` whatever is pending). ``flush_tokens=1, flush_ms=0`` gives one
event per token. Per-token extras (logprobs, tool-call pieces) travel with their tokens and
count as visible output, like text.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class FlushPolicy:
    """Per-connection coalescing state. ``now`` values are seconds on any monotonic clock."""

    flush_tokens: int = 5
    flush_ms: float = 50.0
    _text: str = ""
    _tokens: int = 0
    _oldest: float | None = None
    _sent_any: bool = False
    _extras: list[Any] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.flush_tokens < 1:
            raise ValueError("flush_tokens must be >= 1")
        if self.flush_ms < 0:
            raise ValueError("flush_ms must be >= 0")

    @property
    def pending_tokens(self) -> int:
        return self._tokens

    @property
    def has_output(self) -> bool:
        """Visible output (text or extras) is pending."""
        return bool(self._text or self._extras)

    def add(self, text: str, num_tokens: int, now: float, extras: Any = None) -> None:
        """Buffer new output. Text may be empty (a token held back by the detokenizer)."""
        if self._oldest is None and (text or num_tokens):
            self._oldest = now
        self._text += text
        self._tokens += num_tokens
        if extras is not None:
            self._extras.append(extras)

    def due(self, now: float) -> bool:
        """Whether the pending text should be sent now. Nothing visible is never due."""
        if not self.has_output:
            return False
        if not self._sent_any or self._tokens >= self.flush_tokens:
            return True
        assert self._oldest is not None
        # The same sum as ``deadline()``: a reader woken at its deadline finds the text due
        # (``(now - oldest) * 1000 >= flush_ms`` is False there for most values, by rounding).
        return now >= self._oldest + self.flush_ms / 1000.0

    def tokens_until_due(self) -> int:
        """How many more tokens make the pending text due by count (at least 1): a reader
        need not look before then unless the deadline comes first. Before the first event
        any text is due at once, and tokens pending without visible text need a look at
        each next one; otherwise it is what fills the batch."""
        if not self._sent_any or (self._tokens and not self.has_output):
            return 1
        return max(1, self.flush_tokens - self._tokens)

    def clock_starts_on_next_token(self) -> bool:
        """Nothing is pending after an event: the next token starts the ``flush_ms`` clock,
        so whoever produces it must arm the deadline (``add`` that token with its arrival
        time)."""
        return self._sent_any and self._oldest is None

    def deadline(self) -> float | None:
        """When pending text becomes due by time alone; None if nothing visible is pending."""
        if not self.has_output or self._oldest is None:
            return None
        if not self._sent_any:
            return self._oldest
        return self._oldest + self.flush_ms / 1000.0

    def take(self) -> tuple[str, int]:
        """Hand over the pending text and its token count, and start a new batch."""
        text, tokens = self._text, self._tokens
        self._text, self._tokens, self._oldest = "", 0, None
        if text or self._extras:
            self._sent_any = True
        return text, tokens

    def take_extras(self) -> list[Any]:
        """The extras of what ``take`` handed over (call right after it)."""
        extras, self._extras = self._extras, []
        return extras
