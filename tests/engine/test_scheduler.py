"""Scheduler: continuous batching, chunked prefill, FIFO, cancellation, slots."""

from __future__ import annotations

import pytest

from tokenspout.engine.request import SamplingParams
from tokenspout.engine.scheduler import Scheduler, SchedulerOutput, SlotCopy
from tokenspout.engine.sequence import Sequence, SequenceStatus


def seq(seq_id: str, n_prompt: int, first: int = 0) -> Sequence:
    """A fake sequence whose prompt is ``first, first+1, ...``: distinct prompts share nothing."""
    return Sequence(seq_id, tuple(range(first, first + n_prompt)))


def run_step(s: Scheduler) -> SchedulerOutput:
    """Plan a step and pretend every sampling chunk produced token 7."""
    out = s.schedule()
    s.postprocess(out, [7] * len(out.sampling))
    return out


def plan(out: SchedulerOutput) -> list[tuple[str, int, int]]:
    """(id, start_pos, number of tokens) of each chunk."""
    return [(c.seq.seq_id, c.start_pos, len(c.token_ids)) for c in out.chunks]


def make(max_num_seqs: int = 4, max_prefill_tokens: int = 100, num_slots: int = 4) -> Scheduler:
    return Scheduler(
        max_num_seqs=max_num_seqs,
        max_prefill_tokens=max_prefill_tokens,
        num_slots=num_slots,
        prefix_cache=False,
        # Chunking is tested on its own here; the isolation rule has its own test below.
        isolate_last_prompt_token=False,
    )


def test_last_prompt_token_gets_a_step_of_its_own_by_default() -> None:
    s = Scheduler(max_num_seqs=4, max_prefill_tokens=8, num_slots=4, prefix_cache=False)
    s.add(seq("a", 12))
    s.add(seq("one", 1, first=100))
    steps = [plan(run_step(s)) for _ in range(3)]
    assert steps == [
        [("a", 0, 8)],
        [("a", 8, 3), ("one", 0, 1)],
        [("one", 1, 1), ("a", 11, 1)],
    ]
    assert s.running["a"].output_token_ids == [7]


def test_short_prompt_prefills_in_one_step_then_decodes() -> None:
    s = make()
    s.add(seq("a", 5))
    out = run_step(s)
    assert plan(out) == [("a", 0, 5)] and out.chunks[0].samples
    assert out.num_prefill_tokens == 5
    a = s.running["a"]
    assert a.output_token_ids == [7] and a.num_computed_tokens == 5
    out = run_step(s)
    assert plan(out) == [("a", 5, 1)] and out.chunks[0].token_ids == (7,)
    assert out.num_prefill_tokens == 0


def test_new_request_joins_the_running_batch_at_the_next_step() -> None:
    s = make()
    s.add(seq("a", 3))
    run_step(s)
    s.add(seq("b", 4, first=100))
    assert plan(run_step(s)) == [("a", 3, 1), ("b", 0, 4)]
    assert plan(run_step(s)) == [("a", 4, 1), ("b", 4, 1)]


def test_long_prompt_is_chunked_and_interleaved_with_decoding() -> None:
    s = make(max_prefill_tokens=8)
    s.add(seq("a", 2))
    run_step(s)
    s.add(seq("long", 20, first=100))
    steps = [plan(run_step(s)) for _ in range(4)]
    assert steps == [
        [("a", 2, 1), ("long", 0, 8)],
        [("a", 3, 1), ("long", 8, 8)],
        [("a", 4, 1), ("long", 16, 4)],
        [("a", 5, 1), ("long", 20, 1)],
    ]
    long = s.running["long"]
    assert long.output_token_ids == [7, 7]


def test_only_the_last_prompt_chunk_samples() -> None:
    s = make(max_prefill_tokens=8)
    s.add(seq("long", 12))
    first, second = run_step(s), run_step(s)
    assert [c.samples for c in first.chunks] == [False]
    assert [c.samples for c in second.chunks] == [True]
    assert s.running["long"].output_token_ids == [7]


def test_prefill_budget_goes_to_the_oldest_prompt_first() -> None:
    s = make(max_prefill_tokens=10)
    s.add(seq("a", 6))
    s.add(seq("b", 6, first=100))
    s.add(seq("c", 6, first=200))
    assert plan(run_step(s)) == [("a", 0, 6), ("b", 0, 4)]
    assert plan(run_step(s)) == [("a", 6, 1), ("b", 4, 2), ("c", 0, 6)]


def test_max_num_seqs_bounds_the_batch_and_the_rest_wait_in_fifo_order() -> None:
    s = make(max_num_seqs=2, num_slots=8)
    for i, name in enumerate("abcd"):
        s.add(seq(name, 3, first=10 * i))
    run_step(s)
    assert list(s.running) == ["a", "b"] and [q.seq_id for q in s.waiting] == ["c", "d"]
    s.finish(s.running["a"])
    run_step(s)
    assert list(s.running) == ["b", "c"] and [q.seq_id for q in s.waiting] == ["d"]


def test_free_slots_bound_admission() -> None:
    s = make(max_num_seqs=8, num_slots=2)
    for i, name in enumerate("abc"):
        s.add(seq(name, 3, first=10 * i))
    run_step(s)
    assert sorted(q.slot for q in s.running.values()) == [0, 1]
    assert [q.seq_id for q in s.waiting] == ["c"]


def test_abort_waiting_drops_it_without_prefilling() -> None:
    s = make(max_num_seqs=1)
    s.add(seq("a", 3))
    s.add(seq("b", 3, first=100))
    run_step(s)
    aborted = s.abort("b")
    assert aborted is not None and aborted.status is SequenceStatus.FINISHED
    assert aborted.slot is None and aborted.num_computed_tokens == 0
    assert not s.waiting
    for _ in range(3):
        assert all(c.seq.seq_id == "a" for c in run_step(s).chunks)


def test_abort_running_frees_its_slot_at_the_next_step() -> None:
    s = make(max_num_seqs=1, num_slots=1)
    s.add(seq("a", 3))
    s.add(seq("b", 3, first=100))
    run_step(s)
    assert s.prefix_cache.num_free == 0
    assert s.abort("a") is not None
    assert s.prefix_cache.num_free == 1 and "a" not in s.running
    assert plan(run_step(s)) == [("b", 0, 3)]
    assert s.running["b"].slot == 0


def test_abort_unknown_returns_none() -> None:
    s = make()
    assert s.abort("nope") is None
    s.add(seq("a", 2))
    run_step(s)
    s.finish(s.running["a"])
    assert s.abort("a") is None


def test_finish_frees_the_slot_for_the_next_waiting_sequence() -> None:
    s = make(max_num_seqs=4, num_slots=1)
    s.add(seq("a", 2))
    s.add(seq("b", 2, first=100))
    run_step(s)
    assert s.running["a"].slot == 0 and len(s.waiting) == 1
    s.finish(s.running["a"])
    run_step(s)
    assert s.running["b"].slot == 0 and not s.waiting


def test_duplicate_id_is_rejected() -> None:
    s = make()
    s.add(seq("a", 2))
    with pytest.raises(ValueError):
        s.add(seq("a", 2))


def test_invalid_sizes_are_rejected() -> None:
    with pytest.raises(ValueError):
        Scheduler(max_num_seqs=0, max_prefill_tokens=1, num_slots=1)


def test_repeated_prompt_reuses_the_cached_prefix() -> None:
    s = Scheduler(
        max_num_seqs=2,
        max_prefill_tokens=100,
        num_slots=2,
        min_prefix_match=4,
        isolate_last_prompt_token=False,
    )
    prompt = tuple(range(50))
    s.add(Sequence("a", prompt))
    run_step(s)
    s.finish(s.running["a"])
    s.add(Sequence("b", (*prompt[:40], 999, 998)))
    out = run_step(s)
    assert plan(out) == [("b", 40, 2)]
    assert s.running["b"].num_cached_tokens == 40
    assert not out.copies


def test_prefix_of_a_busy_slot_is_copied_into_a_free_slot() -> None:
    s = Scheduler(
        max_num_seqs=2,
        max_prefill_tokens=100,
        num_slots=2,
        min_prefix_match=4,
        isolate_last_prompt_token=False,
    )
    prompt = tuple(range(30))
    s.add(Sequence("a", prompt))
    run_step(s)
    s.add(Sequence("b", prompt))
    out = run_step(s)
    a, b = s.running["a"], s.running["b"]
    assert [(c.src, c.dst, c.num_tokens) for c in out.copies] == [(a.slot, b.slot, 29)]
    assert plan(out) == [("a", 30, 1), ("b", 29, 1)]


def test_prompts_arriving_together_compute_their_shared_prefix_once() -> None:
    s = Scheduler(
        max_num_seqs=4,
        max_prefill_tokens=100,
        num_slots=4,
        min_prefix_match=4,
        isolate_last_prompt_token=False,
    )
    system = tuple(range(40))
    for name, tail in (("a", 900), ("b", 901), ("c", 902)):
        s.add(Sequence(name, (*system, tail)))
    first = run_step(s)
    assert plan(first) == [("a", 0, 41)] and not first.copies
    second = run_step(s)
    a = s.running["a"]
    assert [(c.src, c.dst, c.num_tokens) for c in second.copies] == [
        (a.slot, s.running["b"].slot, 40),
        (a.slot, s.running["c"].slot, 40),
    ]
    assert plan(second) == [("a", 41, 1), ("b", 40, 1), ("c", 40, 1)]
    assert (s.prefix_cache.queries, s.prefix_cache.hits) == (3, 2)


def test_an_unrelated_prompt_does_not_wait() -> None:
    s = Scheduler(
        max_num_seqs=4,
        max_prefill_tokens=100,
        num_slots=4,
        min_prefix_match=4,
        isolate_last_prompt_token=False,
    )
    s.add(Sequence("a", tuple(range(40))))
    s.add(Sequence("b", tuple(range(100, 120))))
    assert plan(run_step(s)) == [("a", 0, 40), ("b", 0, 20)]


def test_waiting_for_a_prefix_stops_when_the_older_prompt_is_aborted() -> None:
    s = Scheduler(
        max_num_seqs=4,
        max_prefill_tokens=10,
        num_slots=4,
        min_prefix_match=4,
        isolate_last_prompt_token=False,
    )
    system = tuple(range(40))
    s.add(Sequence("a", (*system, 1)))
    s.add(Sequence("b", (*system, 2)))
    assert plan(run_step(s)) == [("a", 0, 10)]
    s.abort("a")
    assert plan(run_step(s)) == [("b", 0, 10)]


def twin_scheduler(**kwargs: object) -> Scheduler:
    return Scheduler(
        max_num_seqs=4, max_prefill_tokens=100, num_slots=4, min_prefix_match=4, **kwargs
    )


def test_identical_prompts_compute_the_last_token_once_and_the_others_copy_it() -> None:
    s = twin_scheduler()
    prompt = tuple(range(40))
    for name in "abc":
        s.add(Sequence(name, prompt))
    assert plan(run_step(s)) == [("a", 0, 39)]  # b and c wait for a's prefix
    second = s.schedule()
    a, b, c = (s.running[n] for n in "abc")
    assert plan(second) == [("a", 39, 1)] and not second.copies
    # After the forward pass b and c take the whole prompt's KV from a's slot and sample
    # from a's logits row (row 0).
    assert [(t.seq, t.row, t.copy) for t in second.twins] == [
        (b, 0, SlotCopy(a.slot, b.slot, 40, 0)),
        (c, 0, SlotCopy(a.slot, c.slot, 40, 0)),
    ]
    assert second.sampling == [(0, a), (0, b), (0, c)]
    assert second.ending == [0]  # the engine keeps the logits of a's last token
    s.postprocess(second, [5, 6, 7])
    assert [x.output_token_ids for x in (a, b, c)] == [[5], [6], [7]]
    assert all(x.num_computed_tokens == 40 and not x.is_prefilling for x in (a, b, c))
    assert plan(run_step(s)) == [("a", 40, 1), ("b", 40, 1), ("c", 40, 1)]
    assert (s.prefix_cache.queries, s.prefix_cache.hits) == (3, 2)


def test_a_twin_copies_only_what_its_slot_lacks() -> None:
    s = twin_scheduler()
    prompt = tuple(range(40))
    s.add(Sequence("a", prompt))
    for _ in range(3):
        run_step(s)
    s.finish(s.running["a"])  # its free slot keeps the prompt
    s.add(Sequence("b", prompt))
    s.add(Sequence("c", prompt))
    out = s.schedule()
    b, c = s.running["b"], s.running["c"]
    assert b.num_cached_tokens == 39  # from a's old slot, in place
    assert [(x.src, x.dst, x.num_tokens) for x in out.copies] == [(b.slot, c.slot, 39)]
    assert plan(out) == [("b", 39, 1)]
    assert [t.copy for t in out.twins] == [SlotCopy(b.slot, c.slot, 40, 39)]


def test_no_twins_for_other_prompts_scored_prompts_or_without_the_prefix_cache() -> None:
    prompt = tuple(range(40))
    scored = SamplingParams(echo=True, logprobs=0)
    s = twin_scheduler(isolate_last_prompt_token=False)
    s.add(Sequence("a", prompt))
    s.add(Sequence("other", (5, *prompt[1:])))
    s.add(Sequence("scored", prompt, scored))
    out = s.schedule()
    assert [c.seq.seq_id for c in out.chunks] == ["a", "other", "scored"] and not out.twins
    s = twin_scheduler(isolate_last_prompt_token=False)
    s.add(Sequence("scored", prompt, scored))
    s.add(Sequence("b", prompt))
    out = s.schedule()  # b waits for the scored prompt's prefix: it does not take its logits
    assert [c.seq.seq_id for c in out.chunks] == ["scored"] and not out.twins
    s = twin_scheduler(prefix_cache=False)
    s.add(Sequence("a", prompt))
    s.add(Sequence("b", prompt))
    run_step(s)
    out = s.schedule()
    assert plan(out) == [("a", 39, 1), ("b", 39, 1)] and not out.twins


def test_a_twin_needs_no_prefill_budget() -> None:
    s = Scheduler(max_num_seqs=4, max_prefill_tokens=8, num_slots=4, min_prefix_match=4)
    prompt = tuple(range(8))
    s.add(Sequence("a", prompt))
    s.add(Sequence("b", prompt))
    run_step(s)  # a: 7 tokens; b, sharing them, waits
    out = s.schedule()
    assert plan(out) == [("a", 7, 1)]
    assert [t.seq.seq_id for t in out.twins] == ["b"]


def test_a_repeated_prompt_samples_from_its_kept_logits_without_computing() -> None:
    s = twin_scheduler()
    prompt = tuple(range(40))
    s.add(Sequence("a", prompt))
    run_step(s)
    ending = s.schedule()
    assert plan(ending) == [("a", 39, 1)]
    s.remember_first_logits(prompt, "logits of a")  # what the engine does after the forward
    s.postprocess(ending, [7])
    # While a decodes, b copies the whole prompt from a's slot and samples a's logits, in a
    # step of its own: its first token waits for no forward pass.
    s.add(Sequence("b", prompt))
    out = s.schedule()
    a, b = s.running["a"], s.running["b"]
    assert [(c.src, c.dst, c.num_tokens) for c in out.copies] == [(a.slot, b.slot, 40)]
    assert plan(out) == []
    assert [(t.seq, t.row, t.copy) for t in out.twins] == [(b, 0, None)]
    assert out.first_logits == ["logits of a"] and out.sampling == [(0, b)]
    s.postprocess(out, [8])
    assert b.output_token_ids == [8] and b.first_logits is None
    assert plan(run_step(s)) == [("a", 40, 1), ("b", 40, 1)]
    # Once a is done, its free slot holds the prompt: c takes it in place, nothing to run.
    s.finish(a)
    s.add(Sequence("c", prompt))
    s.finish(b)
    out = s.schedule()
    c = s.running["c"]
    assert not out.copies and not out.chunks and c.num_computed_tokens == 40
    assert [(t.seq, t.row) for t in out.twins] == [(c, 0)] and out.first_logits == ["logits of a"]


def test_kept_logits_help_only_while_a_slot_holds_the_whole_prompt() -> None:
    s = Scheduler(max_num_seqs=1, max_prefill_tokens=100, num_slots=1, min_prefix_match=4)
    prompt = tuple(range(40))
    s.add(Sequence("a", prompt))
    run_step(s)
    run_step(s)
    s.remember_first_logits(prompt, "logits of a")
    s.finish(s.running["a"])
    s.add(Sequence("other", tuple(range(100, 140))))  # takes the only slot
    run_step(s)
    s.finish(s.running["other"])
    s.add(Sequence("b", prompt))
    out = s.schedule()
    assert plan(out) == [("b", 0, 39)] and not out.twins


def test_only_a_few_prompts_logits_are_kept_and_none_without_the_prefix_cache() -> None:
    s = twin_scheduler()
    for i in range(Scheduler.FIRST_LOGITS_KEPT + 1):
        s.remember_first_logits((i,), i)
    assert s._kept_logits(Sequence("x", (0,))) is None
    assert s._kept_logits(Sequence("x", (1,))) == 1
    s = twin_scheduler(prefix_cache=False)
    s.remember_first_logits((1,), 1)
    assert s._kept_logits(Sequence("x", (1,))) is None
