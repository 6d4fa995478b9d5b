"""PrefixCache: longest-prefix slot choice, in-place reuse, copies, LRU eviction, counters."""

from __future__ import annotations

import pytest

from tokenspout.engine.prefix_cache import PrefixCache, SlotAssignment, common_prefix_len

SYSTEM = tuple(range(100, 140))  # a shared 40-token "system prompt"


@pytest.mark.parametrize(
    ("a", "b", "n"),
    [((), (), 0), ((1, 2), (), 0), ((1, 2, 3), (1, 2, 4), 2), ((1, 2), (1, 2, 3), 2)],
)
def test_common_prefix_len(a: tuple[int, ...], b: tuple[int, ...], n: int) -> None:
    assert common_prefix_len(a, b) == n


def test_cold_cache_hands_out_slots_in_order_and_counts_a_miss() -> None:
    c = PrefixCache(3, min_match_tokens=4)
    assert c.allocate((1, 2, 3), {}) == SlotAssignment(0)
    assert c.allocate((1, 2, 3), {}) == SlotAssignment(1)
    assert (c.queries, c.hits, c.num_free) == (2, 0, 1)


def test_free_slot_with_the_longest_prefix_is_reused_in_place() -> None:
    c = PrefixCache(3, min_match_tokens=4)
    for _ in range(3):
        c.allocate((0,), {})
    c.release(0, (*SYSTEM[:10], 1))
    c.release(1, (*SYSTEM, 5, 6))
    c.release(2, (9, 9, 9))
    got = c.allocate((*SYSTEM, 7), {})
    assert got == SlotAssignment(1, num_cached_tokens=40)
    assert c.hits == 1


def test_at_least_the_last_prompt_token_is_left_to_compute() -> None:
    c = PrefixCache(1, min_match_tokens=4)
    c.allocate((0,), {})
    c.release(0, (*SYSTEM, 1, 2))
    assert c.allocate(SYSTEM, {}) == SlotAssignment(0, num_cached_tokens=39)


def test_busy_slot_prefix_is_copied_into_the_least_recently_released_free_slot() -> None:
    c = PrefixCache(3, min_match_tokens=4)
    for _ in range(3):
        c.allocate((0,), {})
    c.release(2, (1, 2, 3))
    c.release(1, (4, 5, 6))
    got = c.allocate((*SYSTEM, 8), {0: (*SYSTEM, 1)})
    assert got == SlotAssignment(2, num_cached_tokens=40, copy_from=0)
    assert c.hits == 1


def test_free_match_wins_a_tie_with_a_busy_one_no_copy_needed() -> None:
    c = PrefixCache(2, min_match_tokens=4)
    c.allocate((0,), {})
    c.allocate((0,), {})
    c.release(1, SYSTEM)
    got = c.allocate((*SYSTEM, 1), {0: SYSTEM})
    assert got == SlotAssignment(1, num_cached_tokens=40)


def test_match_shorter_than_the_minimum_is_ignored_and_not_a_hit() -> None:
    c = PrefixCache(1, min_match_tokens=16)
    c.allocate((0,), {})
    c.release(0, tuple(range(10)))
    assert c.allocate((*range(10), 99), {}) == SlotAssignment(0)
    assert (c.queries, c.hits) == (2, 0)


def test_disabled_cache_never_reuses_and_counts_nothing() -> None:
    c = PrefixCache(1, enabled=False, min_match_tokens=1)
    c.allocate((0,), {})
    c.release(0, SYSTEM)
    assert c.allocate(SYSTEM, {}) == SlotAssignment(0)
    assert (c.queries, c.hits) == (0, 0)


def test_no_free_slot_raises() -> None:
    c = PrefixCache(1)
    c.allocate((1,), {})
    with pytest.raises(RuntimeError):
        c.allocate((1,), {})


def test_releasing_a_free_slot_twice_is_a_bug() -> None:
    c = PrefixCache(1)
    with pytest.raises(AssertionError):
        c.release(0, ())


def test_improve_copies_a_prefix_computed_since_admission_and_counts_the_hit() -> None:
    c = PrefixCache(2, min_match_tokens=4)
    c.allocate((*SYSTEM, 1), {})
    got = c.allocate((*SYSTEM, 2), {0: ()})
    assert got == SlotAssignment(1) and c.hits == 0
    assert c.improve((*SYSTEM, 2), 1, 0, {0: SYSTEM}) == SlotAssignment(1, 40, copy_from=0)
    assert c.hits == 1
    assert c.improve((*SYSTEM, 2), 1, 40, {0: SYSTEM}) is None
