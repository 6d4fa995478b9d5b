"""Pick the next token of every row of a step's logits, each row with its own settings.

Greedy rows (temperature 0) take the argmax. The others are scaled by their temperature,
cut to their top-k and top-p sets, and drawn by inverse-CDF sampling: one uniform number per
row, located in the row's cumulative distribution. That needs a single random number per
row (a per-vocabulary-entry noise, as in the Gumbel trick, costs ~1 ms per row here), and
each row draws it from its own ``torch.Generator``: a request with a ``seed`` gets the same
tokens whatever else shares its batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tokenspout.engine.request import SamplingParams


def make_generator(seed: int | None) -> torch.Generator:
    """A per-request generator: seeded when the request gives a seed, random otherwise."""
    gen = torch.Generator()
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen


class Sampler:
    """Batched sampling over the rows of one step; stateless."""

    def __call__(
        self,
        logits: torch.Tensor,
        params: Sequence[SamplingParams],
        generators: Sequence[torch.Generator],
    ) -> list[int]:
        """Return one token id per row of ``logits`` ([rows, vocab], float32)."""
        assert logits.dim() == 2 and logits.shape[0] == len(params) == len(generators)
        if not params:
            return []
        tokens = [0] * len(params)
        # Each op over [rows, vocab] costs about a millisecond here: touch only the rows
        # that need it.
        greedy = [i for i, p in enumerate(params) if p.greedy]
        if greedy:
            for i, t in zip(greedy, logits[greedy].argmax(dim=-1).tolist(), strict=True):
                tokens[i] = t
        rows = [i for i, p in enumerate(params) if not p.greedy]
        if rows:
            picked = self._sample(
                logits[rows], [params[i] for i in rows], [generators[i] for i in rows]
            )
            for i, t in zip(rows, picked.tolist(), strict=True):
                tokens[i] = t
        return tokens

    @staticmethod
    def _sample(
        logits: torch.Tensor,
        params: Sequence[SamplingParams],
        generators: Sequence[torch.Generator],
    ) -> torch.Tensor:
        # logits: [R, V]; a copy, so masking in place does not touch the caller's tensor.
        temps = torch.tensor([p.temperature for p in params], dtype=logits.dtype)
        logits = logits / temps.unsqueeze(1)
        if any(p.top_k > 0 for p in params):
            _mask_top_k(logits, [p.top_k for p in params])
        if any(p.top_p < 1.0 for p in params):
            _mask_top_p(logits, [p.top_p for p in params])
        cdf = torch.softmax(logits, dim=-1).cumsum_(dim=-1)  # [R, V], non-decreasing
        u = torch.cat([torch.rand(1, generator=g) for g in generators])  # [R] in [0, 1)
        # side="right": the first token whose cumulative mass exceeds u * total. A masked
        # token adds no mass, so it is never picked.
        picked = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1), right=True)  # [R, 1]
        return picked.squeeze(1).clamp_(max=cdf.shape[-1] - 1)


def _mask_top_k(logits: torch.Tensor, top_k: list[int]) -> None:
    """Set every logit below each row's k-th largest to -inf (k <= 0: row untouched)."""
    vocab = logits.shape[-1]
    ks = torch.tensor([k if 0 < k < vocab else vocab for k in top_k])  # [R]
    kth = logits.topk(int(ks.max()), dim=-1).values  # [R, kmax], descending
    threshold = kth.gather(1, (ks - 1).unsqueeze(1))  # [R, 1]
    logits.masked_fill_(logits < threshold, float("-inf"))


def _mask_top_p(logits: torch.Tensor, top_p: list[float]) -> None:
    """Keep each row's smallest set of tokens whose probability reaches top_p."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # [R, V]
    probs = sorted_logits.softmax(dim=-1)
    # Mass strictly before each token: a token is kept while that is below top_p, so the
    # most likely token always survives.
    before = probs.cumsum(dim=-1) - probs
    drop_sorted = before >= torch.tensor(top_p, dtype=probs.dtype).unsqueeze(1)
    drop = torch.zeros_like(drop_sorted).scatter_(1, order, drop_sorted)
    logits.masked_fill_(drop, float("-inf"))
