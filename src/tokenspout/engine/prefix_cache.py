"""Slot allocation that reuses KV already computed for a common prompt prefix.

Pure: no torch, no I/O. Every KV-cache slot is either busy (a running sequence owns it) or
free. A free slot still holds the KV of the last sequence that used it, and this cache
remembers those token ids. On admission, ``allocate`` looks for the longest common prefix
between the new prompt and every slot's content:

* best match in a free slot: the sequence takes that slot and keeps its KV in place;
* best match in a busy slot: the sequence takes a free slot and the engine first copies the
  matched KV into it (``ModelRunner.copy_slot_prefix``);
* no match: the sequence takes the free slot whose content was released longest ago.

``improve`` lets a sequence that has not computed anything yet copy a longer prefix that a
busy slot has computed since its admission (see ``Scheduler``).

A match shorter than ``min_match_tokens`` is ignored: such a short prefix is not worth a
copy, and counting it would call every chat request a hit (chat templates share their first
few tokens). A **hit** is an allocation that reuses at least ``min_match_tokens`` tokens; the
last prompt token is left to compute, because its logits pick the first output token, unless
the caller already has those logits (``whole``: the scheduler keeps them for recent prompts).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from collections.abc import Sequence as Tokens
from dataclasses import dataclass


@dataclass(frozen=True)
class SlotAssignment:
    """Where a new sequence goes and how much of its prompt is already computed.

    When ``copy_from`` is set, KV ``[0, num_cached_tokens)`` must be copied from that slot
    into ``slot`` before the sequence's first forward pass.
    """

    slot: int
    num_cached_tokens: int = 0
    copy_from: int | None = None


def common_prefix_len(a: Tokens[int], b: Tokens[int]) -> int:
    """Length of the longest common prefix of two token sequences."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class PrefixCache:
    """Owns the free-slot list and what each free slot's KV holds; see the module docstring."""

    def __init__(self, num_slots: int, *, enabled: bool = True, min_match_tokens: int = 16):
        if num_slots < 1:
            raise ValueError("num_slots must be >= 1")
        if min_match_tokens < 1:
            raise ValueError("min_match_tokens must be >= 1")
        self.enabled = enabled
        self.min_match_tokens = min_match_tokens
        # slot -> token ids whose KV it holds; ordered from least to most recently released,
        # so that eviction takes the front. Never-used slots start at the front, empty.
        self._free: OrderedDict[int, tuple[int, ...]] = OrderedDict(
            (slot, ()) for slot in range(num_slots)
        )
        self.queries = 0
        self.hits = 0

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(
        self,
        prompt: Tokens[int],
        busy: Mapping[int, Tokens[int]],
        *,
        reuse: bool = True,
        whole: bool = False,
    ) -> SlotAssignment:
        """Take a free slot for ``prompt``; ``busy`` maps busy slots to their computed tokens.
        ``reuse=False``: the prompt is to be computed whole (its every position's logits are
        wanted), so the least recently used slot is taken and nothing is reused.
        ``whole=True``: the logits of the prompt's last token are known, so that token too
        may come from the cache.

        Raises ``RuntimeError`` when no slot is free (the scheduler checks ``num_free``).
        """
        if not self._free:
            raise RuntimeError("no free KV-cache slot")
        if not (self.enabled and reuse):
            slot, _ = self._free.popitem(last=False)
            return SlotAssignment(slot)
        self.queries += 1
        # Leave the last prompt token to compute: its logits sample the first output token.
        limit = len(prompt) - (0 if whole else 1)
        best_free, free_len = self._best(prompt, self._free, limit)
        best_busy, busy_len = self._best(prompt, busy, limit)
        if free_len >= self.min_match_tokens and free_len >= busy_len:
            assert best_free is not None
            del self._free[best_free]
            self.hits += 1
            return SlotAssignment(best_free, free_len)
        slot, _ = self._free.popitem(last=False)
        if busy_len >= self.min_match_tokens:
            self.hits += 1
            return SlotAssignment(slot, busy_len, copy_from=best_busy)
        return SlotAssignment(slot)

    def improve(
        self,
        prompt: Tokens[int],
        slot: int,
        num_cached: int,
        busy: Mapping[int, Tokens[int]],
        *,
        whole: bool = False,
    ) -> SlotAssignment | None:
        """A longer prefix of ``prompt`` than ``num_cached`` is now computed in a busy slot.

        Called before a sequence computes anything itself, e.g. when requests sharing a
        system prompt arrive together: the first computes it, the others copy it. Returns the
        copy to make into ``slot``, or None. Turns the allocation's miss into a hit.
        ``whole`` as for ``allocate``.
        """
        if not self.enabled:
            return None
        src, n = self._best(prompt, busy, len(prompt) - (0 if whole else 1))
        if src is None or n < self.min_match_tokens or n <= num_cached:
            return None
        if num_cached < self.min_match_tokens:
            self.hits += 1
        return SlotAssignment(slot, n, copy_from=src)

    def release(self, slot: int, computed: Tokens[int]) -> None:
        """Give ``slot`` back; ``computed`` are the tokens whose KV it now holds (may be empty)."""
        assert slot not in self._free, f"slot {slot} released twice"
        self._free[slot] = tuple(computed) if self.enabled else ()

    @staticmethod
    def _best(
        prompt: Tokens[int], slots: Mapping[int, Tokens[int]], limit: int
    ) -> tuple[int | None, int]:
        """The slot sharing the longest prefix with ``prompt`` (capped at ``limit``)."""
        best, best_len = None, 0
        for slot, tokens in slots.items():
            n = min(common_prefix_len(prompt, tokens), limit)
            if n > best_len:
                best, best_len = slot, n
        return best, best_len
