"""How the scheduler computes the choices of one request (``n`` sequences of one prompt):
the prompt once, the others sampling from its last token's logits; and a prompt whose logprobs are
asked for (echo) is computed whole, never taken from the prefix cache."""

from __future__ import annotations

from tokenspout.engine.request import SamplingParams
from tokenspout.engine.scheduler import Scheduler
from tokenspout.engine.sequence import Sequence

PROMPT = tuple(range(100, 140))  # 40 tokens: past the prefix cache's 16-token minimum


def scheduler() -> Scheduler:
    return Scheduler(max_num_seqs=8, max_prefill_tokens=256, num_slots=8)


def prefill_tokens(s: Scheduler, steps: int) -> list[int]:
    """Prompt tokens computed per step, each sampling chunk producing token 7."""
    counts = []
    for _ in range(steps):
        out = s.schedule()
        counts.append(out.num_prefill_tokens)
        s.postprocess(out, [7] * len(out.sampling))
    return counts


def test_three_choices_compute_their_shared_prompt_once() -> None:
    s = scheduler()
    for i in range(3):
        s.add(Sequence(f"c{i}", PROMPT))
    # Step 1: the first choice computes all but the last prompt token; the others wait.
    # Step 2: the first computes the last token; the others take its KV and logits.
    assert prefill_tokens(s, 3) == [39, 1, 0]
    assert s.prefix_cache.hits == 2
    assert all(len(seq.output_token_ids) == 2 for seq in s.running.values())


def test_a_prompt_scored_with_echo_is_computed_whole_despite_the_cache() -> None:
    s = scheduler()
    s.add(Sequence("first", PROMPT))
    prefill_tokens(s, 3)
    s.finish(s.running["first"])  # its slot keeps the prompt's KV
    echo = SamplingParams(echo=True, logprobs=0, max_tokens=1)
    s.add(Sequence("scored", PROMPT, echo))
    s.add(Sequence("plain", PROMPT))
    out = s.schedule()
    chunks = {c.seq.seq_id: (c.start_pos, len(c.token_ids)) for c in out.chunks}
    assert chunks["scored"] == (0, 39)  # from position 0, nothing reused
    assert chunks["plain"] == (39, 1)  # the cached prefix reused
