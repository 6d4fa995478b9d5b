"""Pick the next token of every row of a step's logits, each row with its own settings.

Before picking, each row's logits go through its own processors, in vLLM's order, touching
only the rows that asked: ``logit_bias``; the repetition, frequency and presence penalties
(over the prompt and the output so far); the grammar's token mask (``grammar.TokenMasks``).
Logprobs are taken from that distribution at the row's temperature (unscaled for greedy
rows), before ``top_k``/``top_p``/``min_p`` truncation, as vLLM's ``processed_logprobs``:
a token the grammar forbids has no logprob and is never listed.

Greedy rows (temperature 0) take the argmax. The others are scaled by their temperature,
cut to their top-k and top-p sets, and drawn by inverse-CDF sampling: one uniform number per
row, located in the row's cumulative distribution. That needs a single random number per
row (a per-vocabulary-entry noise, as in the Gumbel trick, costs ~1 ms per row here), and
each row draws it from its own ``torch.Generator``: a request with a ``seed`` gets the same
tokens whatever else shares its batch. Where the block kernels run, the softmax, cumulative
sum and search are one C call (``block_kernels.sample_rows``: 0.7 ms for 16 rows against
8.4 ms for the torch ops, which allocate and fault in a [rows, vocab] tensor each).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NamedTuple, TypeVar

import torch

from tokenspout.engine import block_kernels
from tokenspout.engine.request import SamplingParams

if TYPE_CHECKING:
    import llguidance

    from tokenspout.engine.grammar import TokenMasks


class RowContext(NamedTuple):
    """What a row's processors need besides its params: the tokens so far (penalties) and
    its grammar matcher (None: unconstrained)."""

    prompt_ids: Sequence[int] = ()
    output_ids: Sequence[int] = ()
    matcher: llguidance.LLMatcher | None = None


class RowLogprobs(NamedTuple):
    """The sampled token's logprob and the ``top`` (token id, logprob), most likely first."""

    logprob: float
    top: list[tuple[int, float]]


class Sampled(NamedTuple):
    """One step's picks: a token per row, and its logprobs where the row asked for them."""

    tokens: list[int]
    logprobs: list[RowLogprobs | None]


_MASK64 = (1 << 64) - 1
T = TypeVar("T")


def _seed32(seed: int) -> int:
    """The 32 bits torch's CPU generator takes (Mersenne Twister keeps a seed's low 32
    bits: 7 and 7 + 2**32 drew the same answer). A seed that fits in them is used as it is,
    so its draws are what they were; any other signed 64-bit seed is mixed down
    (splitmix64's finaliser), so that seeds which differ only in their high bits differ."""
    if 0 <= seed < 1 << 32:
        return seed
    z = (seed & _MASK64) + 0x9E3779B97F4A7C15 & _MASK64
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9 & _MASK64
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB & _MASK64
    return (z ^ (z >> 31)) & 0xFFFFFFFF


class Uniforms:
    """A request's uniforms in [0, 1), one per sampled token, from a generator seeded by the
    request's seed (random without one).

    Drawn ``BATCH`` at a time: right after a decode step, whose ~100 MB of weights have
    streamed through the caches, one ``torch.rand(1)`` took ~160 µs (torch's code and data
    cold) of a ~10 ms batch-1 step. The values are those one draw at a time gives: a seed's
    sequence is unchanged.
    """

    BATCH = 64

    def __init__(self, seed: int | None):
        self._generator = torch.Generator()
        if seed is None:
            self._generator.seed()
        else:
            self._generator.manual_seed(_seed32(seed))
        self._ahead: list[float] = []  # the next draws, last first

    def next(self) -> float:
        if not self._ahead:
            self._ahead = torch.rand(self.BATCH, generator=self._generator).tolist()[::-1]
        return self._ahead.pop()


class Sampler:
    """Batched sampling over the rows of one step; stateless but for the grammar masks
    (``masks``, set by the engine once its tokenizer is loaded)."""

    def __init__(self, masks: TokenMasks | None = None):
        self.masks = masks

    def __call__(
        self,
        logits: torch.Tensor,
        params: Sequence[SamplingParams],
        uniforms: Sequence[Uniforms],
        contexts: Sequence[RowContext] | None = None,
    ) -> Sampled:
        """Pick one token id per row of ``logits`` ([rows, vocab], float32; not modified),
        each sampled row taking the next of its ``uniforms``."""
        assert logits.dim() == 2 and logits.shape[0] == len(params) == len(uniforms)
        if not params:
            return Sampled([], [])
        if contexts is not None:
            logits = self._process(logits, params, contexts)
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
                logits, rows, [params[i] for i in rows], [uniforms[i].next() for i in rows]
            )
            for i, t in zip(rows, picked, strict=True):
                tokens[i] = t
        return Sampled(tokens, _logprobs(logits, params, tokens))

    def _process(
        self,
        logits: torch.Tensor,
        params: Sequence[SamplingParams],
        contexts: Sequence[RowContext],
    ) -> torch.Tensor:
        """Bias, penalties and grammar masks, on a copy, for the rows that use them."""
        biased = [i for i, p in enumerate(params) if p.logit_bias or p.penalized]
        constrained = [i for i, c in enumerate(contexts) if c.matcher is not None]
        if not (biased or constrained):
            return logits
        logits = logits.clone()
        for i in biased:
            _bias_and_penalize(logits[i], params[i], contexts[i])
        if constrained:
            if self.masks is None:
                raise RuntimeError("a constrained row but no grammar masks")
            matchers = [contexts[i].matcher for i in constrained]
            self.masks.apply(logits, constrained, matchers)  # type: ignore[arg-type]
        return logits

    @staticmethod
    def _sample(
        logits: torch.Tensor,
        rows: list[int],
        params: Sequence[SamplingParams],
        u: list[float],
    ) -> list[int]:
        """The picks of ``logits[rows]`` (not modified), one row per param and uniform.

        A row goes through the top-k/top-p/min-p masks only when it asked for one of them,
        and each mask touches only the rows that asked for it, so that a row is sampled with
        the same arithmetic whatever else shares the step. (A neighbour's top_p sent every
        row through ``_mask_top_p``, whose float32 cumulative sum reaches 1 before the end
        of the vocabulary and cut the far tail of rows that never asked: a seeded row's pick
        changed with its neighbours' settings.)"""
        cut: list[int] = []
        whole: list[int] = []
        for i, p in enumerate(params):
            (cut if p.top_k > 0 or p.top_p < 1.0 or p.min_p > 0.0 else whole).append(i)
        if not cut:
            return _pick(logits, rows, [p.temperature for p in params], u)
        picks = [0] * len(rows)
        if whole:
            picked = _pick(
                logits, [rows[i] for i in whole], [params[i].temperature for i in whole],
                [u[i] for i in whole],
            )  # fmt: skip
            for i, t in zip(whole, picked, strict=True):
                picks[i] = t
        asked = [params[i] for i in cut]
        # A copy, scaled, so masking in place does not touch the caller's tensor.
        temps = torch.tensor([p.temperature for p in asked], dtype=logits.dtype)
        scaled = logits[[rows[i] for i in cut]] / temps.unsqueeze(1)
        _on_rows(scaled, [p.top_k for p in asked], lambda k: k > 0, _mask_top_k)
        _on_rows(scaled, [p.top_p for p in asked], lambda p: p < 1.0, _mask_top_p)
        _on_rows(scaled, [p.min_p for p in asked], lambda p: p > 0.0, _mask_min_p)
        picked = _pick(scaled, list(range(len(cut))), [1.0] * len(cut), [u[i] for i in cut])
        for i, t in zip(cut, picked, strict=True):
            picks[i] = t
        return picks


def _pick(
    logits: torch.Tensor, rows: list[int], temperatures: list[float], u: list[float]
) -> list[int]:
    """Inverse-CDF picks of ``logits[rows]`` at their ``temperatures``, one uniform each."""
    if logits.dtype == torch.float32 and block_kernels.available():
        return block_kernels.sample_rows(logits.contiguous(), rows, temperatures, u)
    scaled = logits[rows] / torch.tensor(temperatures, dtype=logits.dtype).unsqueeze(1)
    cdf = torch.softmax(scaled, dim=-1).cumsum_(dim=-1)  # [R, V], non-decreasing
    # side="right": the first token whose cumulative mass exceeds u * total. A masked
    # token adds no mass, so it is never picked.
    targets = torch.tensor(u, dtype=cdf.dtype) * cdf[:, -1]
    picked = torch.searchsorted(cdf, targets.unsqueeze(1), right=True)  # [R, 1]
    return picked.squeeze(1).clamp_(max=cdf.shape[-1] - 1).tolist()


def _on_rows(
    logits: torch.Tensor,
    values: list[T],
    wanted: Callable[[T], bool],
    mask: Callable[[torch.Tensor, list[T]], None],
) -> None:
    """``mask`` (in place) on the rows of ``logits`` whose value is ``wanted``, alone."""
    rows = [i for i, v in enumerate(values) if wanted(v)]
    if not rows:
        return
    if len(rows) == len(values):
        mask(logits, values)
        return
    part = logits[rows]
    mask(part, [values[i] for i in rows])
    logits[rows] = part


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
    # ...also when top_p is too small for float32 (1e-300 is 0 there, and 0 >= 0).
    drop_sorted[:, 0] = False
    drop = torch.zeros_like(drop_sorted).scatter_(1, order, drop_sorted)
    logits.masked_fill_(drop, float("-inf"))


def _mask_min_p(logits: torch.Tensor, min_p: list[float]) -> None:
    """Drop tokens less likely than ``min_p`` times each row's most likely token."""
    probs = logits.softmax(dim=-1)
    floor = probs.max(dim=-1, keepdim=True).values * torch.tensor(min_p).unsqueeze(1)
    logits.masked_fill_(probs < floor, float("-inf"))


def _bias_and_penalize(row: torch.Tensor, params: SamplingParams, context: RowContext) -> None:
    """``logit_bias``, then vLLM's repetition penalty (divide a positive logit, multiply a
    negative one, for tokens of the prompt or output) and OpenAI's frequency and presence
    penalties (output tokens only), in place on one row."""
    vocab = row.shape[-1]
    if params.logit_bias:
        ids = torch.tensor([t for t, _ in params.logit_bias])
        row.index_add_(0, ids, torch.tensor([b for _, b in params.logit_bias], dtype=row.dtype))
    if params.repetition_penalty != 1.0:
        seen = torch.tensor([*context.prompt_ids, *context.output_ids], dtype=torch.long)
        seen = seen.unique()
        values = row[seen]
        # Its effect is whole long before 1e-6; below, float32 would divide by 0 (inf, NaN).
        penalty = max(params.repetition_penalty, 1e-6)
        row[seen] = torch.where(values > 0, values / penalty, values * penalty)
    if (params.frequency_penalty or params.presence_penalty) and context.output_ids:
        counts = torch.bincount(torch.tensor(list(context.output_ids)), minlength=vocab)
        counts = counts[:vocab].to(row.dtype)
        row -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0)


def _logprobs(
    logits: torch.Tensor, params: Sequence[SamplingParams], tokens: list[int]
) -> list[RowLogprobs | None]:
    """Each asking row's log-softmax at its temperature (see the module docstring)."""
    rows = [i for i, p in enumerate(params) if p.logprobs is not None]
    out: list[RowLogprobs | None] = [None] * len(params)
    if not rows:
        return out
    temps = torch.tensor(
        [1.0 if params[i].greedy else params[i].temperature for i in rows], dtype=logits.dtype
    )
    logprobs = torch.log_softmax(logits[rows] / temps.unsqueeze(1), dim=-1)  # [R, V]
    k = max(params[i].logprobs or 0 for i in rows)
    top_values, top_ids = logprobs.topk(k, dim=-1) if k else (None, None)
    for j, i in enumerate(rows):
        chosen = float(logprobs[j, tokens[i]])
        top: list[tuple[int, float]] = []
        want = params[i].logprobs or 0
        if want:
            assert top_values is not None and top_ids is not None
            pairs = zip(top_ids[j, :want].tolist(), top_values[j, :want].tolist(), strict=True)
            top = [(t, v) for t, v in pairs if v != float("-inf")]
        out[i] = RowLogprobs(chosen, top)
    return out
