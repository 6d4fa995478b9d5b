"""Sampler: greedy, temperature, top-k, top-p, per-request seeds, mixed batches."""

from __future__ import annotations

import torch

from tokenspout.engine.request import SamplingParams
from tokenspout.engine.sampler import RowContext, Sampler, Uniforms

GREEDY = SamplingParams(temperature=0.0)


def sample(logits: torch.Tensor, params: list[SamplingParams], seed: int = 0) -> list[int]:
    return Sampler()(logits, params, [Uniforms(seed + i) for i in range(len(params))]).tokens


def test_greedy_takes_the_argmax_of_each_row() -> None:
    logits = torch.tensor([[0.0, 3.0, 1.0], [5.0, 1.0, 2.0]])
    assert sample(logits, [GREEDY, GREEDY]) == [1, 0]


def test_top_k_1_is_greedy_whatever_the_temperature() -> None:
    logits = torch.randn(4, 100, generator=torch.Generator().manual_seed(1))
    params = [SamplingParams(temperature=2.0, top_k=1)] * 4
    assert sample(logits, params) == logits.argmax(-1).tolist()


def test_top_k_keeps_only_the_k_best_tokens() -> None:
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0]] * 1)
    drawn = {sample(logits, [SamplingParams(top_k=2)], seed=s)[0] for s in range(200)}
    assert drawn == {3, 4}


def test_tiny_top_p_keeps_only_the_most_likely_token() -> None:
    logits = torch.tensor([[0.0, 1.0, 2.5, 2.0]])
    drawn = {sample(logits, [SamplingParams(top_p=0.01)], seed=s)[0] for s in range(50)}
    assert drawn == {2}


def test_top_p_keeps_the_nucleus() -> None:
    # probs ~ [0.5, 0.3, 0.15, 0.05]: top_p=0.7 keeps the first two tokens.
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    drawn = {sample(logits, [SamplingParams(top_p=0.7)], seed=s)[0] for s in range(300)}
    assert drawn == {0, 1}


def test_temperature_sampling_follows_the_distribution() -> None:
    probs = torch.tensor([0.6, 0.3, 0.1])
    logits = torch.log(probs).unsqueeze(0)
    counts = torch.zeros(3)
    for s in range(3000):
        counts[sample(logits, [SamplingParams(temperature=1.0)], seed=s)[0]] += 1
    assert torch.allclose(counts / counts.sum(), probs, atol=0.04)


def test_same_seed_same_tokens_whatever_shares_the_batch() -> None:
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(2))
    hot = SamplingParams(temperature=1.5, seed=42)
    alone = Sampler()(logits[1:2], [hot], [Uniforms(42)]).tokens
    params = [GREEDY, hot, SamplingParams(temperature=1.0)]
    gens = [Uniforms(None), Uniforms(42), Uniforms(None)]
    in_batch = Sampler()(logits, params, gens).tokens
    assert in_batch[1] == alone[0]
    assert in_batch[0] == int(logits[0].argmax())


def test_a_seeded_generator_repeats_its_sequence() -> None:
    logits = torch.zeros(1, 1000)
    params = [SamplingParams(temperature=1.0, seed=7)]
    g1, g2 = Uniforms(7), Uniforms(7)
    first = [Sampler()(logits, params, [g1]).tokens[0] for _ in range(10)]
    second = [Sampler()(logits, params, [g2]).tokens[0] for _ in range(10)]
    assert first == second and len(set(first)) > 1


def test_uniforms_drawn_ahead_are_the_seeds_one_at_a_time_draws() -> None:
    # Drawn 64 at a time for speed, the stream must stay what a seed gave before: one
    # torch.rand(1) per sampled token, across the batches' edges too.
    uniforms = Uniforms(123)
    generator = torch.Generator().manual_seed(123)
    one_at_a_time = [
        torch.rand(1, generator=generator).item() for _ in range(3 * Uniforms.BATCH + 5)
    ]
    assert [uniforms.next() for _ in one_at_a_time] == one_at_a_time


def test_sampling_does_not_modify_the_callers_logits() -> None:
    logits = torch.randn(2, 20, generator=torch.Generator().manual_seed(3))
    before = logits.clone()
    sample(logits, [SamplingParams(top_k=3, top_p=0.5, temperature=0.7)] * 2)
    assert torch.equal(logits, before)


def test_seeds_that_differ_only_in_their_high_bits_draw_differently() -> None:
    # Mersenne Twister keeps a seed's low 32 bits; the whole signed 64-bit seed must count.
    def draws(seed: int) -> list[float]:
        uniforms = Uniforms(seed)
        return [uniforms.next() for _ in range(4)]

    seeds = [7, 7 + 2**32, 7 + 2**40, 7 - 2**63, -1, 2**63 - 1, 0, -(2**63)]
    assert len({tuple(draws(s)) for s in seeds}) == len(seeds)
    # A seed within 32 bits draws as it always did (a seeded answer does not change).
    generator = torch.Generator().manual_seed(7)
    assert draws(7) == torch.rand(4, generator=generator).tolist()


def test_values_too_small_for_float32_sample_as_their_limits_do() -> None:
    # 1e-300 is 0 in float32: a temperature that small divided by 0 (NaN logprobs, random
    # tokens), a top_p that small dropped every token, a repetition penalty that small made
    # inf of the logits it divided.
    logits = torch.randn(1, 50, generator=torch.Generator().manual_seed(3))
    best = int(logits.argmax())
    for params in (
        SamplingParams(temperature=1e-300, logprobs=2),
        SamplingParams(top_p=1e-300, logprobs=2),
        SamplingParams(temperature=0.0, repetition_penalty=1e-300, logprobs=2),
    ):
        context = RowContext(prompt_ids=(best,))
        out = Sampler()(logits, [params], [Uniforms(0)], [context])
        assert torch.isfinite(torch.tensor(out.logprobs[0].logprob)), params  # type: ignore[union-attr]
        if params.repetition_penalty == 1.0:
            assert out.tokens == [best], params


class FixedUniform(Uniforms):
    """The same uniform at every draw (what a seed gives, chosen here)."""

    def __init__(self, u: float):
        self.u = u

    def next(self) -> float:
        return self.u


def test_a_row_is_sampled_alike_whatever_its_neighbours_truncate() -> None:
    # A neighbour's top_p sent every row through the top-p mask, whose float32 cumulative
    # sum reaches 1 before the end of the vocabulary and cut the far tail of rows that never
    # asked; the others' temperature was applied another way there. A seeded row's pick
    # changed with its neighbours' settings (about 1 row in 100 here).
    g = torch.Generator().manual_seed(0)
    vocab, n = 49152, 200
    logits = torch.randn(n, vocab, generator=g) * 2.5  # a long tail...
    logits[:, :20] += torch.rand(n, 20, generator=g) * 12  # ...under a few likely tokens
    logits = logits[:, torch.randperm(vocab, generator=g)]
    rows = [SamplingParams(temperature=t) for t in (1.0, 0.9)] * (n // 2)
    draws = [FixedUniform(u) for u in torch.rand(n, generator=g, dtype=torch.float64).tolist()]
    alone = Sampler()(logits, rows, draws).tokens
    for neighbour in (
        SamplingParams(temperature=0.8, top_p=0.9),
        SamplingParams(temperature=0.8, top_k=40),
        SamplingParams(temperature=0.8, min_p=0.05),
    ):
        both = torch.cat([logits, logits[:1].roll(7)])
        paired = Sampler()(both, [*rows, neighbour], [*draws, FixedUniform(0.5)]).tokens
        assert paired[:-1] == alone, neighbour
