"""Per-key limits: concurrent streams, requests per minute, tokens per minute.

Behind the small ``KeyLimiter`` interface so that a limiter shared by replicas (Redis) can
take the in-memory one's place. Both minute limits are token buckets (capacity: the limit;
refill: the limit per 60 s), as LiteLLM's proxy limits behave: a key may burst up to its
minute's worth and then gets its share back continuously. Tokens are prompt + completion:
a request is charged its prompt and each stream's ``max_tokens`` when admitted, and each
stream gives back what it did not generate when it ends (``key_admission``). A request is
admitted while the key's token balance is positive, so one request may take the balance
below zero (the next ones wait until it refills), but requests at once cannot all be
admitted against the same full bucket.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from tokenspout.errors import RateLimitError
from tokenspout.server.api_keys import ApiKey


class KeyLimiter(Protocol):
    def admit(self, key: ApiKey, prompt_tokens: int, n: int = 1) -> None:
        """Count a new request of ``key`` with ``n`` streams (its choices: one request, its
        prompt once), or raise ``RateLimitError`` (nothing counted)."""

    def finished(self, key_name: str, completion_tokens: int) -> None:
        """A stream admitted for ``key_name`` ended after ``completion_tokens`` tokens."""


@dataclass(slots=True)
class _Bucket:
    level: float
    at: float

    def refill(self, per_minute: int, now: float) -> None:
        self.level = min(float(per_minute), self.level + (now - self.at) * per_minute / 60.0)
        self.at = now

    def wait_s(self, need: float, per_minute: int) -> int:
        """Whole seconds until the level reaches ``need`` (at least 1: a Retry-After)."""
        return max(1, math.ceil((need - self.level) * 60.0 / per_minute))


@dataclass(slots=True)
class _Usage:
    streams: int = 0
    requests: _Bucket | None = None
    tokens: _Bucket | None = None


class InMemoryKeyLimiter:
    """This process's counts. State per key name, created on first use: a name has one
    entry whatever its limits, and the limits are read from the key on each request, so a
    reload that changes them applies at once."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._usage: dict[str, _Usage] = {}

    def admit(self, key: ApiKey, prompt_tokens: int, n: int = 1) -> None:
        now = self._clock()
        usage = self._usage.setdefault(key.name, _Usage())
        limit = key.max_concurrent_streams
        if limit is not None and usage.streams + n > limit:
            raise RateLimitError(
                f"key {key.name!r} has {usage.streams} streams open, its limit is {limit}; "
                "retry when one ends",
                retry_after_s=1,
                limit="streams",
            )
        rpm = key.requests_per_minute
        if rpm is not None:
            usage.requests = usage.requests or _Bucket(float(rpm), now)
            usage.requests.refill(rpm, now)
            if usage.requests.level < 1.0:
                raise RateLimitError(
                    f"key {key.name!r} is over its {rpm} requests per minute",
                    retry_after_s=usage.requests.wait_s(1.0, rpm),
                    limit="requests",
                )
        tpm = key.tokens_per_minute
        if tpm is not None:
            usage.tokens = usage.tokens or _Bucket(float(tpm), now)
            usage.tokens.refill(tpm, now)
            if usage.tokens.level <= 0.0:
                raise RateLimitError(
                    f"key {key.name!r} is over its {tpm} tokens per minute",
                    retry_after_s=usage.tokens.wait_s(1.0, tpm),
                    limit="tokens",
                )
            usage.tokens.level -= prompt_tokens
        if usage.requests is not None:
            usage.requests.level -= 1.0
        usage.streams += n

    def finished(self, key_name: str, completion_tokens: int) -> None:
        usage = self._usage.get(key_name)
        if usage is None:
            return
        usage.streams -= 1
        if usage.tokens is not None:
            usage.tokens.level -= completion_tokens
