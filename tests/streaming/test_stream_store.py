"""The in-memory replay store: positions, release behind the slowest reader, when producing
must pause, what may be evicted (never text a live reader has not delivered), and byte
accounting that stays exact through any sequence of operations."""

from __future__ import annotations

import random

import pytest

from tokenspout.errors import StreamGoneError
from tokenspout.streaming.stream_store import Chunk, InMemoryStreamStore, ReplayBuffer


def texts(buffer: ReplayBuffer) -> list[str]:
    return [chunk.text for chunk in buffer.read(buffer.start)]


def fill(buffer: ReplayBuffer, count: int, size: int, char: str = "x") -> None:
    for _ in range(count):
        buffer.append(char * size, 1)


@pytest.mark.parametrize(("per_stream", "total"), [(0, 10), (10, 9)])
def test_bounds_must_make_sense(per_stream: int, total: int) -> None:
    with pytest.raises(ValueError):
        InMemoryStreamStore(max_stream_bytes=per_stream, max_total_bytes=total)


def test_chunks_are_addressed_by_absolute_position_with_their_utf8_size() -> None:
    store = InMemoryStreamStore()
    buffer = store.create("s", resumable=True)
    assert (buffer.start, buffer.end) == (0, 0) and buffer.read(0) == []
    buffer.append("ab", 1)
    buffer.append("é", 1)
    buffer.append("", 1)  # a token whose text the detokenizer holds back
    buffer.append("😀!", 2)
    assert buffer.read(0) == [
        Chunk("ab", 1, 2),
        Chunk("é", 1, 2),
        Chunk("", 1, 0),
        Chunk("😀!", 2, 5),
    ]
    assert buffer.read(3) == [Chunk("😀!", 2, 5)] and buffer.read(4) == []
    assert buffer.end == 4 and store.total_bytes == 9 and "s" in store and "t" not in store


def test_text_with_no_utf8_form_is_refused_and_leaves_nothing() -> None:
    store = InMemoryStreamStore()
    buffer = store.create("s", resumable=False)
    buffer.hold_from(0)
    buffer.append("ok", 1)
    with pytest.raises(UnicodeEncodeError):
        buffer.append("a\ud800b", 1)
    assert buffer.end == 1 and texts(buffer) == ["ok"]
    assert (store.total_bytes, store.held_bytes) == (2, 2)


def test_a_non_resumable_buffer_releases_what_its_reader_delivered() -> None:
    store = InMemoryStreamStore()
    buffer = store.create("s", resumable=False)
    buffer.hold_from(0)
    for text in ("aa", "bb", "cc"):
        buffer.append(text, 1)
    buffer.hold_from(2)
    assert buffer.start == 2 and texts(buffer) == ["cc"]
    assert (store.total_bytes, store.held_bytes) == (2, 2)
    with pytest.raises(StreamGoneError) as gone:
        buffer.read(1)
    assert "already delivered" in gone.value.message and gone.value.status_code == 410
    # The reader left (its stream was handed on): nothing more is released, nothing held.
    buffer.hold_from(None)
    assert buffer.start == 2 and store.total_bytes == 2 and store.held_bytes == 0


def test_text_before_any_reader_is_kept_but_not_held() -> None:
    store = InMemoryStreamStore(max_stream_bytes=4, max_total_bytes=8)
    buffer = store.create("s", resumable=False)
    fill(buffer, 5, 3)
    # Nobody reads yet: nothing is evicted (a reader is about to attach), nothing pauses.
    assert buffer.start == 0 and store.total_bytes == 15 and store.held_bytes == 0
    assert not buffer.must_pause
    buffer.hold_from(0)
    assert store.held_bytes == 15 and buffer.must_pause


def test_held_bytes_follow_the_slowest_reader_both_ways() -> None:
    store = InMemoryStreamStore()
    buffer = store.create("s", resumable=True)
    for text in ("a", "bb", "ccc", "dddd"):
        buffer.append(text, 1)
    buffer.hold_from(3)
    assert store.held_bytes == 4
    buffer.hold_from(1)  # a reader resumed from further back
    assert store.held_bytes == 9
    buffer.hold_from(2)
    assert store.held_bytes == 7
    buffer.append("eeeee", 1)
    assert store.held_bytes == 12 and store.total_bytes == 15
    buffer.hold_from(None)
    assert store.held_bytes == 0 and store.total_bytes == 15 and texts(buffer)[0] == "a"


def test_must_pause_past_the_per_stream_bound() -> None:
    store = InMemoryStreamStore(max_stream_bytes=8, max_total_bytes=100)
    buffer = store.create("s", resumable=False)
    buffer.hold_from(0)
    fill(buffer, 4, 2)
    assert not buffer.must_pause  # 8 bytes: at the bound, not past it
    buffer.append("x", 1)
    assert buffer.must_pause
    buffer.hold_from(1)
    assert not buffer.must_pause


def test_must_pause_past_the_global_bound_only_for_streams_holding_text() -> None:
    store = InMemoryStreamStore(max_stream_bytes=8, max_total_bytes=10)
    a = store.create("a", resumable=False)
    b = store.create("b", resumable=False)
    waiting = store.create("waiting", resumable=False)  # its reader has not attached yet
    a.hold_from(0)
    b.hold_from(0)
    fill(a, 3, 2)
    fill(waiting, 1, 2)
    assert not a.must_pause and not waiting.must_pause
    fill(b, 2, 2)  # 12 bytes in all, each stream under its own bound
    assert a.must_pause and b.must_pause
    assert not waiting.must_pause  # holds nothing for a live reader: nothing to wait for
    a.hold_from(3)  # a's reader caught up, and its text is released
    assert (store.total_bytes, store.held_bytes) == (6, 4)
    assert not a.must_pause and not b.must_pause


def test_a_resumable_buffer_without_readers_evicts_its_oldest_text_past_its_bound() -> None:
    store = InMemoryStreamStore(max_stream_bytes=8, max_total_bytes=100)
    buffer = store.create("s", resumable=True)
    for text in ("aaa", "bbb", "ccc"):
        buffer.append(text, 1)
    # Past 8 bytes: the oldest go until at most half the bound is left.
    assert buffer.start == 2 and texts(buffer) == ["ccc"] and store.total_bytes == 3
    with pytest.raises(StreamGoneError) as gone:
        buffer.read(1)
    assert "evicted" in gone.value.message
    assert buffer.read(2) == [Chunk("ccc", 1, 3)]


def test_nothing_a_live_reader_has_not_delivered_is_evicted() -> None:
    store = InMemoryStreamStore(max_stream_bytes=8, max_total_bytes=100)
    buffer = store.create("s", resumable=True)
    buffer.hold_from(0)
    fill(buffer, 2, 3)
    buffer.hold_from(2)  # its reader delivered two chunks
    fill(buffer, 8, 3)
    # Only the two chunks before the reader's position could go.
    assert buffer.start == 2 and buffer.end == 10
    assert store.held_bytes == 24 and buffer.must_pause
    buffer.hold_from(9)
    assert buffer.start == 2  # eviction waits for the next append
    buffer.append("y", 1)
    assert buffer.start == 9 and texts(buffer) == ["xxx", "y"]
    assert (store.total_bytes, store.held_bytes) == (4, 4)


def test_global_eviction_takes_the_oldest_streams_replay_text_first() -> None:
    store = InMemoryStreamStore(max_stream_bytes=100, max_total_bytes=200)
    old = store.create("old", resumable=True)
    mid = store.create("mid", resumable=True)
    new = store.create("new", resumable=True)
    fill(old, 9, 10, "o")
    fill(mid, 9, 10, "m")
    fill(new, 3, 10, "n")  # 210 bytes: past 200
    # The oldest goes, which is enough (down to 3/4 of the bound).
    assert old.start == old.end == 9 and texts(old) == []
    assert mid.start == 0 and new.start == 0
    assert store.total_bytes == 120
    with pytest.raises(StreamGoneError):
        old.read(0)


def test_global_eviction_skips_what_live_readers_have_not_delivered() -> None:
    store = InMemoryStreamStore(max_stream_bytes=100, max_total_bytes=200)
    old = store.create("old", resumable=True)
    mid = store.create("mid", resumable=True)
    new = store.create("new", resumable=True)
    old.hold_from(0)
    fill(old, 9, 10, "o")
    old.hold_from(4)  # its live reader has delivered four chunks
    fill(mid, 9, 10, "m")
    new.hold_from(0)
    fill(new, 3, 10, "n")
    assert old.start == 4 and old.end == 9  # what its reader delivered went, the rest stayed
    assert mid.start == mid.end == 9  # no reader: all of it was replay text
    assert new.start == 0
    assert store.total_bytes == 80 and store.held_bytes == 80


def test_a_non_resumable_buffer_is_never_evicted_to_make_room() -> None:
    store = InMemoryStreamStore(max_stream_bytes=10, max_total_bytes=20)
    live = store.create("live", resumable=False)
    live.hold_from(0)
    fill(live, 3, 6)
    other = store.create("other", resumable=True)
    fill(other, 2, 4)  # total 26 > 20: only the resumable buffer's text can go
    assert live.start == 0 and texts(live) == ["xxxxxx"] * 3
    assert other.start == other.end
    assert live.must_pause


def test_replay_text_makes_room_for_a_live_stream_rather_than_pausing_it() -> None:
    store = InMemoryStreamStore(max_stream_bytes=100, max_total_bytes=100)
    replay = store.create("finished", resumable=True)
    fill(replay, 9, 10)  # a finished resumable stream: no reader, all of it replay text
    live = store.create("live", resumable=False)
    live.hold_from(0)
    fill(live, 2, 10)  # 110 bytes in all, of which only 20 are needed by a reader
    assert replay.start > 0
    assert store.total_bytes <= store.max_total_bytes
    assert not live.must_pause


def test_discard_forgets_a_buffer_and_its_bytes() -> None:
    store = InMemoryStreamStore()
    kept = store.create("kept", resumable=True)
    gone = store.create("gone", resumable=False)
    kept.hold_from(0)
    fill(kept, 2, 3)
    fill(gone, 3, 5)
    gone.hold_from(1)
    assert (store.total_bytes, store.held_bytes) == (16, 16)
    store.discard("gone")
    store.discard("never-existed")
    assert "gone" not in store and "kept" in store
    assert (store.total_bytes, store.held_bytes) == (6, 6)


# -- accounting through random sequences (hypothesis is not a dependency here) -------------


class _Model:
    """What a buffer must contain: every text appended, and its readers' floor."""

    def __init__(self, resumable: bool):
        self.resumable = resumable
        self.texts: list[str] = []
        self.floor: int | None = None


_ALPHABET = "ab é日😀"


def _check(
    store: InMemoryStreamStore, buffers: dict[str, ReplayBuffer], models: dict[str, _Model]
) -> None:
    total = held = 0
    for sid, buffer in buffers.items():
        model = models[sid]
        chunks = buffer.read(buffer.start)
        # What is held is exactly what was appended, from some start on.
        assert buffer.end == len(model.texts)
        assert [c.text for c in chunks] == model.texts[buffer.start :]
        assert all(c.nbytes == len(c.text.encode()) for c in chunks)
        nbytes = sum(c.nbytes for c in chunks)
        assert buffer.nbytes == nbytes  # type: ignore[attr-defined]
        if model.floor is not None:
            # Never anything from under a live reader...
            assert buffer.start <= model.floor
            if not model.resumable:
                # ... and a non-resumable buffer keeps nothing it delivered.
                assert buffer.start == model.floor
            expect_held = sum(c.nbytes for c in buffer.read(model.floor))
        else:
            expect_held = 0
        assert buffer.held_bytes == expect_held  # type: ignore[attr-defined]
        total += nbytes
        held += expect_held
    assert store.total_bytes == total
    assert store.held_bytes == held


def _evictable(buffer: ReplayBuffer, model: _Model) -> int:
    limit = buffer.end if model.floor is None else model.floor
    return sum(c.nbytes for c in buffer.read(buffer.start)[: limit - buffer.start])


@pytest.mark.parametrize("seed", range(30))
def test_accounting_stays_exact_through_random_operations(seed: int) -> None:
    rng = random.Random(seed)
    store = InMemoryStreamStore(max_stream_bytes=rng.choice([8, 32, 64]), max_total_bytes=128)
    buffers: dict[str, ReplayBuffer] = {}
    models: dict[str, _Model] = {}
    names = iter(range(10_000))
    for _ in range(400):
        op = rng.random()
        if op < 0.1 or not buffers:
            sid = f"s{next(names)}"
            models[sid] = _Model(resumable=rng.random() < 0.5)
            buffers[sid] = store.create(sid, resumable=models[sid].resumable)
        elif op < 0.15:
            sid = rng.choice(list(buffers))
            store.discard(sid)
            del buffers[sid], models[sid]
            assert sid not in store
        elif op < 0.35:
            sid = rng.choice(list(buffers))
            buffer, model = buffers[sid], models[sid]
            # A reader moves on, arrives (possibly further back on a resumable stream:
            # never before what is still held), or the last one leaves.
            if rng.random() < 0.15:
                model.floor = None
            else:
                model.floor = rng.randint(buffer.start, buffer.end)
            buffer.hold_from(model.floor)
        else:
            sid = rng.choice(list(buffers))
            buffer, model = buffers[sid], models[sid]
            text = "".join(rng.choice(_ALPHABET) for _ in range(rng.randint(0, 6)))
            buffer.append(text, 1)
            model.texts.append(text)
            if model.resumable:
                # Past its bound, a resumable buffer kept no more than it had to.
                assert buffer.nbytes <= store.max_stream_bytes or _evictable(buffer, model) == 0  # type: ignore[attr-defined]
                over = store.total_bytes > store.max_total_bytes
                assert not over or all(
                    _evictable(buffers[s], models[s]) == 0 for s in buffers if models[s].resumable
                )
        _check(store, buffers, models)
        for sid, buffer in buffers.items():
            floor_held = buffer.held_bytes  # type: ignore[attr-defined]
            assert buffer.must_pause == (
                floor_held > store.max_stream_bytes
                or (floor_held > 0 and store.total_bytes > store.max_total_bytes)
            ), sid
