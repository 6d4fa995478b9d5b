"""Table tests of the coalescing rule: first text at once, then N tokens or M ms."""

from __future__ import annotations

import pytest

from tokenspout.streaming.flush_policy import FlushPolicy


def run(
    policy: FlushPolicy, arrivals: list[tuple[float, str]], end: float
) -> list[tuple[float, str]]:
    """Feed (time, text) tokens; poll at every arrival and at each deadline. Returns the
    (time, text) of each flush, with the final flush at ``end``."""
    events: list[tuple[float, str]] = []
    queue = sorted(arrivals)
    now = 0.0
    while True:
        deadline = policy.deadline()
        next_arrival = queue[0][0] if queue else end
        if deadline is not None and deadline < next_arrival:
            now = deadline
        elif not queue:
            break
        else:
            now, text = queue.pop(0)
            policy.add(text, 1, now)
        if policy.due(now):
            events.append((now, policy.take()[0]))
    text, _ = policy.take()
    if text:
        events.append((end, text))
    return events


CASES = [
    # name, flush_tokens, flush_ms, arrivals, expected flushes
    ("first token goes at once", 5, 50, [(0.0, "a")], [(0.0, "a")]),
    (
        "then five tokens make an event",
        5,
        1000,
        [(i * 0.001, str(i)) for i in range(11)],
        [(0.0, "0"), (0.005, "12345"), (0.010, "678910")],
    ),
    (
        "or fifty milliseconds after the oldest pending token",
        5,
        50,
        [(0.0, "a"), (0.010, "b"), (0.030, "c")],
        [(0.0, "a"), (0.060, "bc")],
    ),
    (
        "one event per token with 1/0",
        1,
        0,
        [(0.0, "a"), (0.0, "b"), (0.001, "c")],
        [(0.0, "a"), (0.0, "b"), (0.001, "c")],
    ),
    (
        "the end flushes what is pending",
        5,
        100_000,
        [(0.0, "a"), (0.01, "b")],
        [(0.0, "a"), (9.0, "b")],
    ),
]


@pytest.mark.parametrize(
    ("flush_tokens", "flush_ms", "arrivals", "expected"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_flush_schedule(
    flush_tokens: int, flush_ms: float, arrivals: list[tuple[float, str]], expected: list
) -> None:
    got = run(FlushPolicy(flush_tokens, flush_ms), arrivals, end=9.0)
    assert [(round(t, 6), text) for t, text in got] == [(round(t, 6), s) for t, s in expected]


def test_held_back_tokens_are_not_sent_as_empty_events() -> None:
    policy = FlushPolicy(1, 0)
    policy.add("", 1, 0.0)  # a token that ends inside a UTF-8 character
    assert not policy.due(0.0)
    assert policy.deadline() is None
    policy.add("é", 1, 0.001)
    assert policy.due(0.001)
    assert policy.take() == ("é", 2)


def test_many_pending_tokens_merge_into_one_event() -> None:
    policy = FlushPolicy(5, 50)
    policy.add("x", 1, 0.0)
    policy.take()
    for i in range(40):
        policy.add("y", 1, 0.001 * i)
    assert policy.due(0.04)
    assert policy.take() == ("y" * 40, 40)


@pytest.mark.parametrize(("tokens", "ms"), [(0, 50), (5, -1)])
def test_rejects_bad_settings(tokens: int, ms: float) -> None:
    with pytest.raises(ValueError):
        FlushPolicy(tokens, ms)


@pytest.mark.parametrize(
    ("flush_tokens", "added", "sent_any", "expected"),
    [
        (5, [], False, 1),  # the first visible text is due at once
        (5, [("a", 1)], False, 1),
        (5, [], True, 5),  # a whole batch (the producer starts the flush_ms clock)
        (5, [("a", 1), ("b", 2)], True, 2),  # then only the tokens that fill the batch
        (5, [("", 7)], True, 1),  # tokens without visible text yet
        (1, [], True, 1),
    ],
)
def test_tokens_until_due(
    flush_tokens: int, added: list[tuple[str, int]], sent_any: bool, expected: int
) -> None:
    policy = FlushPolicy(flush_tokens, 50.0)
    if sent_any:
        policy.add("x", 1, 0.0)
        policy.take()
    for text, tokens in added:
        policy.add(text, tokens, 0.0)
    assert policy.tokens_until_due() == expected


def test_clock_starts_on_next_token_only_between_events() -> None:
    policy = FlushPolicy(5, 50.0)
    assert not policy.clock_starts_on_next_token()  # the first text is due at once
    policy.add("a", 1, 0.0)
    policy.take()
    assert policy.clock_starts_on_next_token()
    policy.add("b", 1, 0.01)
    assert not policy.clock_starts_on_next_token()  # running since 0.01
    assert policy.deadline() == pytest.approx(0.06)
