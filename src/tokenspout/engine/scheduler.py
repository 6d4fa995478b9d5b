"""Continuous batching with chunked prefill: which tokens each engine step computes.

Pure: no torch, no I/O, no threads; it takes plain sizes and ``Sequence`` objects, so it is
tested with fake sequences. One ``schedule()`` call plans one step:

1. admit waiting sequences in FIFO order while fewer than ``max_num_seqs`` run and a slot is
   free (the prefix cache picks the slot and may reuse KV for a prompt prefix);
2. every running sequence past its prompt decodes its last sampled token;
3. prompts still to compute get chunks from a budget of ``max_prefill_tokens`` tokens per
   step, oldest first, so a long new prompt is spread over several steps while the running
   streams keep decoding. A prompt that shares a prefix with an older prompt still being
   computed waits for it, then copies that prefix instead of computing it again;
4. a prompt identical to one whose last token this step computes is a **twin**: it computes
   nothing; after the forward pass it copies the rest of that prompt's KV and samples from
   the same logits row (with its own parameters). The engine hands those logits back
   (``remember_first_logits``; a few recent prompts are kept), so a prompt repeated later,
   whose whole KV is still in a slot, is a twin too: it samples its first token without a
   forward pass, in a step of its own (no request's first token waits for others' forward
   pass when it needs none). A burst of the same question, a retry or a "regenerate" then gets its
   first token without computing the prompt again.

With ``isolate_last_prompt_token`` (the default) the last prompt token gets a step of its
own: a request whose whole prompt is in the prefix cache computes only that token, alone,
so computing it alone on a cold start too gives the same first logits, and the same greedy
answer, with or without a cache hit (the kernels' results depend on how many rows a step
has, and a small model's logits are often nearly tied). It costs one step of TTFT.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field
from functools import cached_property

from tokenspout.engine.prefix_cache import PrefixCache, SlotAssignment, common_prefix_len
from tokenspout.engine.sequence import Sequence, SequenceStatus


@dataclass(frozen=True)
class ScheduledChunk:
    """Tokens of one sequence to feed this step, starting at position ``start_pos``.

    ``samples`` is true when the chunk reaches the end of the sequence's tokens, so its
    logits pick the next token; a non-final prompt chunk's logits are discarded.
    """

    seq: Sequence
    token_ids: tuple[int, ...]
    start_pos: int
    samples: bool

    @property
    def is_prefill(self) -> bool:
        return self.start_pos < self.seq.num_prompt_tokens


@dataclass(frozen=True)
class SlotCopy:
    """Copy KV ``[start, num_tokens)`` from slot ``src`` to slot ``dst``."""

    src: int
    dst: int
    num_tokens: int
    start: int = 0


@dataclass(frozen=True)
class Twin:
    """A sequence that samples its first token from logits row ``row`` of the step without
    computing its prompt's last token: the row of a chunk ending the same prompt, after
    which ``copy`` gives it the prompt's KV, or (``copy`` None: its slot holds the whole
    prompt already) a row of ``plan.first_logits`` (a step of its own, with no chunks)."""

    seq: Sequence
    row: int
    copy: SlotCopy | None


@dataclass(frozen=True)
class SchedulerOutput:
    """One step's plan: prefix copies to apply in order, the chunks to run, then the twins
    to copy and sample."""

    chunks: list[ScheduledChunk]
    copies: list[SlotCopy]
    twins: list[Twin] = field(default_factory=list)
    #: The indexes of the chunks ending a prompt whose logits are to be kept
    #: (``Scheduler.remember_first_logits``).
    ending: list[int] = field(default_factory=list)
    #: Kept logits that twins sample from, in a step that runs no chunk: its logits rows.
    first_logits: list[object] = field(default_factory=list)

    @cached_property
    def sampling(self) -> list[tuple[int, Sequence]]:
        """(logits row, sequence) of each token this step samples, in ``postprocess``'s
        order: the sampling chunks, then the twins."""
        rows = [(i, c.seq) for i, c in enumerate(self.chunks) if c.samples]
        return rows + [(t.row, t.seq) for t in self.twins]

    @property
    def num_prefill_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.chunks if c.is_prefill)


class Scheduler:
    """See the module docstring. Not thread-safe: the engine thread alone calls it."""

    def __init__(
        self,
        *,
        max_num_seqs: int,
        max_prefill_tokens: int,
        num_slots: int,
        prefix_cache: bool = True,
        min_prefix_match: int = 16,
        isolate_last_prompt_token: bool = True,
    ):
        if max_num_seqs < 1 or max_prefill_tokens < 1 or num_slots < 1:
            raise ValueError("max_num_seqs, max_prefill_tokens and num_slots must be >= 1")
        self.max_num_seqs = max_num_seqs
        self.max_prefill_tokens = max_prefill_tokens
        self.isolate_last_prompt_token = isolate_last_prompt_token
        self.prefix_cache = PrefixCache(
            num_slots, enabled=prefix_cache, min_match_tokens=min_prefix_match
        )
        # Prompt -> the logits of its last token, least recently used first.
        self._first_logits: OrderedDict[tuple[int, ...], object] = OrderedDict()
        self.waiting: deque[Sequence] = deque()
        # Insertion order is admission order: prefill budget goes to the oldest first.
        self.running: dict[str, Sequence] = {}

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        """Queue a new sequence; it can join the batch at the next ``schedule()``."""
        if seq.seq_id in self.running or any(s.seq_id == seq.seq_id for s in self.waiting):
            raise ValueError(f"sequence {seq.seq_id!r} is already scheduled")
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def abort(self, seq_id: str) -> Sequence | None:
        """Remove a sequence; a waiting one is never prefilled. None when unknown."""
        seq = self.running.get(seq_id)
        if seq is not None:
            self.finish(seq)
            return seq
        for seq in self.waiting:
            if seq.seq_id == seq_id:
                self.waiting.remove(seq)
                seq.status = SequenceStatus.FINISHED
                return seq
        return None

    def finish(self, seq: Sequence) -> None:
        """Take a running sequence out of the batch; its slot keeps its KV for reuse."""
        del self.running[seq.seq_id]
        seq.status = SequenceStatus.FINISHED
        assert seq.slot is not None
        self.prefix_cache.release(seq.slot, seq.computed_token_ids)

    def fail(self, seq: Sequence) -> None:
        """Like ``finish``, but the slot's KV may be half-written: forget it."""
        del self.running[seq.seq_id]
        seq.status = SequenceStatus.FINISHED
        assert seq.slot is not None
        self.prefix_cache.release(seq.slot, ())

    #: How many prompts' last-token logits are kept (~200 KB each for a 49k vocabulary).
    FIRST_LOGITS_KEPT = 16

    def remember_first_logits(self, prompt: tuple[int, ...], logits: object) -> None:
        """Keep the logits a prompt's last token gave (the engine's; opaque here), for the
        identical prompts that come later (see the module docstring)."""
        if not self.prefix_cache.enabled:
            return
        self._first_logits[prompt] = logits
        self._first_logits.move_to_end(prompt)
        if len(self._first_logits) > self.FIRST_LOGITS_KEPT:
            self._first_logits.popitem(last=False)

    def schedule(self) -> SchedulerOutput:
        """Plan the next step (see the module docstring)."""
        copies = self._admit()
        kept = [seq for seq in self.running.values() if seq.first_logits is not None]
        if kept:
            # Their first tokens need no forward pass (~1 ms to sample): a step of their own,
            # rather than after the others' forward pass (5-20 ms), for each request of a
            # burst arriving while a step runs.
            twins = [Twin(seq, k, None) for k, seq in enumerate(kept)]
            first_logits = [seq.first_logits for seq in kept]
            return SchedulerOutput([], copies, twins, first_logits=first_logits)
        chunks = [
            ScheduledChunk(seq, (seq.last_token_id,), seq.num_tokens - 1, samples=True)
            for seq in self.running.values()
            if not seq.is_prefilling
        ]
        budget = self.max_prefill_tokens
        twins: list[Twin] = []
        # Prompts whose last token this step computes -> their chunk's index.
        ending: dict[tuple[int, ...], int] = {}
        for seq in self.running.values():
            if not seq.is_prefilling:
                continue
            # A prompt whose logprobs are asked for is computed whole, never copied.
            copyable = self.prefix_cache.enabled and not seq.params.prompt_logprobs
            if copyable and seq.prompt_token_ids in ending:
                twins.append(self._twin(seq, chunks, ending[seq.prompt_token_ids]))
                continue
            if budget == 0:
                continue
            if copyable and seq.num_computed_tokens == seq.num_cached_tokens:
                if self._prefix_in_flight(seq):
                    continue  # an older prompt is computing our prefix: copy it later
                copies.extend(self._late_copy(seq))
                if seq.first_logits is not None:
                    continue  # its whole prompt copied: it samples in the next step
            start = seq.num_computed_tokens
            n = min(self._chunk_len(seq.num_prompt_tokens - start), budget)
            ids = seq.prompt_token_ids[start : start + n]
            chunks.append(ScheduledChunk(seq, ids, start, samples=start + n == seq.num_tokens))
            budget -= n
            if copyable and chunks[-1].samples:
                ending.setdefault(seq.prompt_token_ids, len(chunks) - 1)
        return SchedulerOutput(chunks, copies, twins, list(ending.values()))

    def _twin(self, seq: Sequence, chunks: list[ScheduledChunk], row: int) -> Twin:
        """Make ``seq`` a twin of ``chunks[row]``, whose prompt is the same."""
        source = chunks[row].seq
        assert source.slot is not None and seq.slot is not None
        if seq.num_computed_tokens < self.prefix_cache.min_match_tokens:
            self.prefix_cache.hits += 1  # its allocation missed; the twin reuses the prompt
        copy = SlotCopy(source.slot, seq.slot, seq.num_prompt_tokens, seq.num_computed_tokens)
        return Twin(seq, row, copy)

    def _chunk_len(self, remaining: int) -> int:
        """How many of a prompt's ``remaining`` tokens the next chunk may take."""
        if self.isolate_last_prompt_token and remaining > 1:
            return remaining - 1
        return remaining

    def postprocess(self, out: SchedulerOutput, sampled: list[int]) -> None:
        """Record a finished step: ``sampled`` has a token per ``out.sampling``, in order."""
        for chunk in out.chunks:
            chunk.seq.num_computed_tokens += len(chunk.token_ids)
        for twin in out.twins:
            twin.seq.num_computed_tokens = twin.seq.num_cached_tokens = twin.seq.num_prompt_tokens
            twin.seq.first_logits = None
        for (_, seq), token in zip(out.sampling, sampled, strict=True):
            seq.output_token_ids.append(token)

    def _busy_slots(self, but: Sequence | None = None) -> dict[int, tuple[int, ...]]:
        """Busy slot -> tokens whose KV it holds, for prefix matching."""
        return {
            s.slot: s.computed_token_ids
            for s in self.running.values()
            if s.slot is not None and s is not but
        }

    def _prefix_in_flight(self, seq: Sequence) -> bool:
        """Is an older sequence still prefilling a prefix it shares with ``seq``?

        Requests that share a system prompt often arrive together; the later ones wait for
        the first to compute the shared part rather than compute it again each.
        """
        if not self.prefix_cache.enabled:
            return False
        for older in self.running.values():
            if older is seq:
                return False
            if older.is_prefilling:
                shared = min(
                    common_prefix_len(seq.prompt_token_ids, older.prompt_token_ids),
                    seq.num_prompt_tokens - 1,
                )
                if (
                    shared >= self.prefix_cache.min_match_tokens
                    and shared > seq.num_cached_tokens
                    and older.num_computed_tokens < shared
                ):
                    return True
        return False

    def _late_copy(self, seq: Sequence) -> list[SlotCopy]:
        """Copy a longer prefix computed since ``seq`` was admitted, if there is one."""
        assert seq.slot is not None
        kept = self._kept_logits(seq)
        got = self.prefix_cache.improve(
            seq.prompt_token_ids,
            seq.slot,
            seq.num_cached_tokens,
            self._busy_slots(but=seq),
            whole=kept is not None,
        )
        if got is None or got.copy_from is None:
            return []
        self._take(seq, got, kept)
        return [SlotCopy(got.copy_from, seq.slot, got.num_cached_tokens)]

    def _kept_logits(self, seq: Sequence) -> object | None:
        """The kept logits of ``seq``'s prompt, or None."""
        logits = self._first_logits.get(seq.prompt_token_ids)
        if logits is not None:
            self._first_logits.move_to_end(seq.prompt_token_ids)
        return logits

    @staticmethod
    def _take(seq: Sequence, got: SlotAssignment, kept: object | None) -> None:
        """``seq`` holds ``got``'s prefix; a whole prompt samples from the kept logits."""
        seq.num_computed_tokens = seq.num_cached_tokens = got.num_cached_tokens
        if got.num_cached_tokens == seq.num_prompt_tokens:
            seq.first_logits = kept

    def _admit(self) -> list[SlotCopy]:
        copies: list[SlotCopy] = []
        while (
            self.waiting
            and len(self.running) < self.max_num_seqs
            and self.prefix_cache.num_free > 0
        ):
            seq = self.waiting.popleft()
            busy = {
                s.slot: s.computed_token_ids for s in self.running.values() if s.slot is not None
            }
            reuse = not seq.params.prompt_logprobs
            kept = self._kept_logits(seq) if reuse else None
            got = self.prefix_cache.allocate(
                seq.prompt_token_ids, busy, reuse=reuse, whole=kept is not None
            )
            if got.copy_from is not None:
                copies.append(SlotCopy(got.copy_from, got.slot, got.num_cached_tokens))
            seq.slot = got.slot
            self._take(seq, got, kept)
            seq.status = SequenceStatus.RUNNING
            self.running[seq.seq_id] = seq
        return copies
