"""Sampling controls and logprobs in the batched sampler: each changes what a fixed seed
draws, only for the rows that ask, and logprobs describe the distribution sampled from."""

from __future__ import annotations

import math

import torch

from tokenspout.engine.request import SamplingParams
from tokenspout.engine.sampler import RowContext, Sampler, Uniforms

VOCAB = 50
LOGITS = torch.randn(1, VOCAB, generator=torch.Generator().manual_seed(5))
SEED = 11


NO_CONTEXT = RowContext()


def draws(params: SamplingParams, context: RowContext = NO_CONTEXT, n: int = 200) -> list[int]:
    """``n`` tokens drawn with one seeded generator from the same logits."""
    gen = Uniforms(SEED)
    sampler = Sampler()
    return [sampler(LOGITS, [params], [gen], [context]).tokens[0] for _ in range(n)]


def test_logit_bias_forces_and_bans_tokens() -> None:
    base = draws(SamplingParams(seed=SEED))
    assert draws(SamplingParams(seed=SEED, logit_bias=((7, 100.0),))) == [7] * 200
    banned = int(LOGITS.argmax())
    assert banned in base
    assert banned not in draws(SamplingParams(seed=SEED, logit_bias=((banned, -100.0),)))


def test_presence_and_frequency_penalties_push_repeated_tokens_down() -> None:
    favourite = int(LOGITS.argmax())
    context = RowContext((), [favourite] * 3)
    base = draws(SamplingParams(temperature=0.0), context, n=1)
    assert base == [favourite]
    presence = SamplingParams(temperature=0.0, presence_penalty=2.0)
    frequency = SamplingParams(temperature=0.0, frequency_penalty=2.0)
    gap = float(LOGITS[0].topk(2).values[0] - LOGITS[0].topk(2).values[1])
    # Presence subtracts 2 once; frequency 2 per occurrence (6 here).
    assert (draws(presence, context, n=1) == [favourite]) == (gap > 2.0)
    assert draws(frequency, context, n=1) != [favourite] or gap > 6.0
    sampled = SamplingParams(seed=SEED, frequency_penalty=2.0)
    assert draws(sampled, context).count(favourite) < draws(SamplingParams(seed=SEED)).count(
        favourite
    )


def test_repetition_penalty_covers_the_prompt_too() -> None:
    favourite = int(LOGITS.argmax())
    plain = SamplingParams(seed=SEED)
    penalised = SamplingParams(seed=SEED, repetition_penalty=2.0)
    in_prompt = RowContext((favourite,), ())
    assert draws(penalised, in_prompt).count(favourite) < draws(plain, in_prompt).count(favourite)
    assert draws(penalised, RowContext((), ())) == draws(plain, RowContext((), ()))


def test_min_p_and_top_k_narrow_the_choice() -> None:
    base = set(draws(SamplingParams(seed=SEED)))
    probs = LOGITS.softmax(-1)[0]
    allowed = {i for i in range(VOCAB) if probs[i] >= 0.2 * probs.max()}
    narrowed = set(draws(SamplingParams(seed=SEED, min_p=0.2)))
    assert narrowed <= allowed < base | allowed and len(narrowed) < len(base)
    top3 = set(LOGITS[0].topk(3).indices.tolist())
    assert set(draws(SamplingParams(seed=SEED, top_k=3))) == top3


def test_controls_apply_only_to_the_rows_that_ask() -> None:
    logits = LOGITS.repeat(2, 1)
    params = [
        SamplingParams(temperature=0.0, logit_bias=((3, 100.0),)),
        SamplingParams(temperature=0.0),
    ]
    gens = [Uniforms(1), Uniforms(2)]
    out = Sampler()(logits, params, gens, [RowContext(), RowContext()])
    assert out.tokens == [3, int(LOGITS.argmax())]


def test_logprobs_are_sorted_log_probabilities_at_the_temperature() -> None:
    params = SamplingParams(temperature=0.5, seed=SEED, logprobs=5)
    out = Sampler()(LOGITS, [params], [Uniforms(SEED)])
    (row,) = out.logprobs
    assert row is not None
    expected = torch.log_softmax(LOGITS[0] / 0.5, -1)
    assert math.isclose(row.logprob, float(expected[out.tokens[0]]), rel_tol=1e-5)
    values = [v for _, v in row.top]
    assert values == sorted(values, reverse=True) and all(v <= 0 for v in values)
    assert [t for t, _ in row.top] == expected.topk(5).indices.tolist()
    assert Sampler()(LOGITS, [SamplingParams()], [Uniforms(1)]).logprobs == [None]
