"""The model API the engine core calls: load once, then ``forward`` a step's chunks.

One engine thread calls ``forward`` and ``copy_slot_prefix``; nothing here is thread-safe.
"""

from __future__ import annotations

import ctypes
import errno
import math
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tokenspout.engine.cpu_budget import CpuBudget, usable_cpus
from tokenspout.engine.kv_cache import KVCache
from tokenspout.engine.llama_model import AttentionBatch, LlamaConfig, LlamaModel
from tokenspout.engine.model_files import ModelFiles
from tokenspout.engine.tokenizer import Tokenizer
from tokenspout.engine.weight_formats import FORMATS, WeightFormat
from tokenspout.engine.weights import Weights, default_format
from tokenspout.errors import ModelLoadError


@dataclass(frozen=True)
class SeqChunk:
    """Tokens of one sequence to run in a step."""

    slot: int  # KV-cache slot owned by the sequence (0 <= slot < num_slots)
    token_ids: Sequence[int]  # a prompt chunk, or the one last sampled token
    start_pos: int  # position of token_ids[0]; KV for [0, start_pos) is already in the slot
    #: token_ids are prompt tokens. A one-token prompt chunk (a prompt whose rest came from
    #: the prefix cache) then picks an answer's first token, and its step keeps int16 x.
    prompt: bool = False


class ModelRunner:
    """A model, its tokenizer and a KV cache of ``num_slots`` × ``max_model_len`` positions."""

    def __init__(
        self,
        model: str | None = None,
        *,
        num_slots: int = 16,
        max_model_len: int = 2048,
        weights: str | None = None,
        num_threads: int | None = None,
    ):
        """Load ``model`` (see ``ModelFiles.resolve``); ``weights`` is one of ``FORMATS``, by
        default the fastest for this CPU (``default_format``).

        Raises ``ModelLoadError`` for a model it cannot load, ``ValueError`` for bad sizes.
        """
        if num_slots < 1 or max_model_len < 2:
            raise ValueError("num_slots must be >= 1 and max_model_len >= 2")
        weights = weights or default_format()
        if weights not in FORMATS:
            raise ModelLoadError(f"weights must be one of {FORMATS}, not {weights!r}")
        start = time.perf_counter()
        # Intra-op threads = usable cores (affinity, cgroup quota): extra threads only
        # contend; fewer while other processes compete for the cores (CpuBudget), unless
        # the caller fixed the count.
        self.num_threads = num_threads or usable_cpus()
        self.cpu_budget = CpuBudget(self.num_threads, adaptive=num_threads is None)
        self._threads_set: tuple[int, int] | None = None  # (thread ident, count)
        self._set_threads()
        files = ModelFiles.resolve(model)
        meta = files.metadata()
        if files.format == "gguf":
            self.tokenizer = Tokenizer.from_metadata(meta["tokenizer"])
        else:
            self.tokenizer = Tokenizer.from_directory(files.path)
        self.config = LlamaConfig.from_dict(meta["config"])
        self.config.check_context(max_model_len)
        fmt: WeightFormat = weights  # type: ignore[assignment]  # checked against FORMATS
        self.model = LlamaModel(
            self.config, Weights.load(files, meta["config"], fmt), max_model_len
        )
        self.cache = _kv_cache(self.config, num_slots, max_model_len, self.model.kv_dtype)
        self.model_id = files.model_id
        self.weights = weights
        self.num_slots = num_slots
        self.max_model_len = max_model_len
        self.vocab_size = self.config.vocab_size
        # Throwaway steps, so that the first request does not pay for kernel set-up: a
        # decode token, and a prompt's two kinds of step (a chunk through the GEMMs, then
        # its last token alone); without the prompt's, the first one after start took
        # ~100 ms where the next took ~40.
        self.forward([SeqChunk(0, [0], 0)])
        self.forward([SeqChunk(0, [0] * 16, 0, prompt=True)])
        self.forward([SeqChunk(0, [0], 16, prompt=True)])
        _return_freed_memory()
        print(
            f"tokenspout: {self.model_id} ({weights}) ready in {time.perf_counter() - start:.1f} s",
            file=sys.stderr,
            flush=True,
        )

    def forward(self, chunks: Sequence[SeqChunk]) -> torch.Tensor:
        """Run all chunks in one step; write their KV; return float32 logits
        [len(chunks), vocab] for the last token of each chunk.

        Every chunk's tokens go through the matmuls together; attention batches the
        one-token chunks and runs each longer chunk on its own.
        """
        self._check(chunks)
        self._set_threads()
        if len(chunks) <= self.model.decode_rows and all(len(c.token_ids) == 1 for c in chunks):
            # One token per sequence: the one-call step needs only their ids, slots and
            # positions, in the chunks' order (its rows do not depend on each other). Packing
            # a step for the per-op path costs ~0.7 ms at batch 1 in the server; no torch op
            # runs here, so no inference mode either (entering it cold cost up to ~0.1 ms).
            ids = [c.token_ids[0] for c in chunks]
            slots = [c.slot for c in chunks]
            positions = [c.start_pos for c in chunks]
            int8 = not any(c.prompt for c in chunks)
            return self.model.decode(ids, slots, positions, self.cache, int8=int8)
        with torch.inference_mode():
            token_ids, positions, batch, logit_rows = self._plan(chunks)
            return self.model.forward(token_ids, positions, batch, self.cache, logit_rows)

    def forward_all(
        self, chunks: Sequence[SeqChunk], full: Sequence[int]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``forward``, and for the chunks at the indexes ``full`` the logits of every
        position, [len(chunk.token_ids), vocab] each (what a prompt's logprobs need)."""
        self._check(chunks)
        self._set_threads()
        with torch.inference_mode():
            token_ids, positions, batch, last_rows = self._plan(chunks)
            sizes = [len(chunks[i].token_ids) for i in full]
            firsts = [int(last_rows[i]) - n + 1 for i, n in zip(full, sizes, strict=True)]
            rows = torch.cat(
                [last_rows, *(torch.arange(a, a + n) for a, n in zip(firsts, sizes, strict=True))]
            )
            logits = self.model.forward(token_ids, positions, batch, self.cache, rows)
        # logits: [len(chunks) + sum(sizes), V]
        return logits[: len(chunks)], list(logits[len(chunks) :].split(sizes))

    def copy_slot_prefix(self, src: int, dst: int, num_tokens: int, *, start: int = 0) -> None:
        """Copy KV positions [start, num_tokens) of slot src into slot dst, whose [0, start)
        already holds the same prefix (for the prefix cache)."""
        for slot in (src, dst):
            self._check_slot(slot)
        if not 0 <= start <= num_tokens <= self.max_model_len:
            raise ValueError(
                f"positions [{start}, {num_tokens}) are outside [0, {self.max_model_len}]"
            )
        if src != dst:
            with torch.inference_mode():
                self.cache.copy_prefix(src, dst, num_tokens, start=start)

    def _plan(
        self, chunks: Sequence[SeqChunk]
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionBatch, torch.Tensor]:
        """Pack the chunks (``_check``-ed): decode tokens first (sorted by slot), then each
        prefill chunk."""
        # A one-token chunk, prompt or not, attends to exactly what a decode token does.
        decode = sorted(
            (i for i, c in enumerate(chunks) if len(c.token_ids) == 1), key=lambda i: chunks[i].slot
        )
        prefill = [i for i, c in enumerate(chunks) if len(c.token_ids) > 1]
        ids: list[int] = []
        pos: list[int] = []
        token_slots: list[int] = []
        last_row = [0] * len(chunks)
        for i in decode + prefill:
            c = chunks[i]
            ids.extend(c.token_ids)
            pos.extend(range(c.start_pos, c.start_pos + len(c.token_ids)))
            token_slots.extend([c.slot] * len(c.token_ids))
            last_row[i] = len(ids) - 1
        slots = [chunks[i].slot for i in decode]
        positions = torch.tensor(pos)
        batch = AttentionBatch(
            write_rows=self.cache.rows(torch.tensor(token_slots), positions),
            num_decode=len(decode),
            decode_slots=_slots_index(slots),
            decode_len=0,
            decode_mask=None,
            prefills=[],
            prefill_masks=[],
        )
        if decode:
            batch.decode_len = max(pos[: len(decode)]) + 1  # Python ints: no tensor reductions
            if min(pos[: len(decode)]) + 1 != batch.decode_len:  # ragged: hide the padding
                lengths = positions[: len(decode)] + 1  # [B]
                keys = torch.arange(batch.decode_len)
                batch.decode_mask = (keys[None, :] < lengths[:, None])[:, None, None, :]
        row = len(decode)
        for i in prefill:
            c = chunks[i]
            t = len(c.token_ids)
            batch.prefills.append((row, t, c.slot, c.start_pos))
            batch.prefill_masks.append(_causal_mask(c.start_pos, t, self.model.dtype))
            row += t
        return torch.tensor(ids), positions, batch, torch.tensor(last_row)

    def _check(self, chunks: Sequence[SeqChunk]) -> None:
        """Refuse (``ValueError``) a step whose chunks do not fit the slots, the cache or the
        vocabulary, or share a slot."""
        if not chunks:
            raise ValueError("forward needs at least one chunk")
        for c in chunks:
            self._check_slot(c.slot)
            if (
                not c.token_ids
                or c.start_pos < 0
                or c.start_pos + len(c.token_ids) > self.max_model_len
            ):
                raise ValueError(
                    f"chunk of {len(c.token_ids)} tokens at {c.start_pos} does not fit in "
                    f"[0, {self.max_model_len})"
                )
            # The embedding is read by index, in C on the one-call decode path: never past it.
            if not all(0 <= t < self.vocab_size for t in c.token_ids):
                raise ValueError(f"a token id of a chunk is outside [0, {self.vocab_size})")
        if len({c.slot for c in chunks}) != len(chunks):
            raise ValueError("two chunks in one step share a slot")

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.num_slots:
            raise ValueError(f"slot {slot} is outside [0, {self.num_slots})")

    def _set_threads(self) -> None:
        # OpenMP's thread count is per calling thread: set it in the thread that runs steps.
        wanted = (threading.get_ident(), self.cpu_budget.threads())
        if self._threads_set != wanted:
            torch.set_num_threads(wanted[1])
            self._threads_set = wanted


def _kv_cache(
    config: LlamaConfig, num_slots: int, max_model_len: int, dtype: torch.dtype
) -> KVCache:
    """The KV cache, or a ``ModelLoadError`` saying which settings to lower when the OS
    refuses to map it: its pages are touched only when written, but the mapping of all of
    them must still fit what the kernel allows (100000 sequences: ENOMEM, a traceback)."""
    shape = (config.num_hidden_layers, config.num_key_value_heads, config.head_dim)
    try:
        return KVCache(shape[0], num_slots, max_model_len, shape[1], shape[2], dtype)
    except (MemoryError, OSError) as exc:
        if isinstance(exc, OSError) and exc.errno != errno.ENOMEM:
            raise
        size = 2 * math.prod(shape) * num_slots * max_model_len * dtype.itemsize
        raise ModelLoadError(
            f"not enough memory for the KV cache of {num_slots} sequences × {max_model_len} "
            f"tokens ({size / 2**30:.1f} GiB); lower --max-num-seqs or --max-model-len"
        ) from exc


def _return_freed_memory() -> None:
    """Hand the heap pages freed while loading back to the OS.

    glibc keeps them in its arenas otherwise: the conversion temporaries of a load (fp32
    copies of every weight while fbgemm packs them, one arena per packing thread) stayed in
    RSS, ~170 MB of it after a warm start.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def _causal_mask(start: int, t: int, dtype: torch.dtype) -> torch.Tensor | None:
    """The additive mask of a chunk of ``t`` tokens from position ``start``: [t, start + t],
    query i seeing keys j <= start + i; None from position 0, where attention's own causal
    mode is the same mask."""
    if start == 0:
        return None
    keys = torch.arange(start + t)
    hidden = keys[None, :] > torch.arange(start, start + t)[:, None]
    return torch.zeros(hidden.shape, dtype=dtype).masked_fill_(hidden, float("-inf"))


def _slots_index(slots: list[int]) -> torch.Tensor | slice:
    """A slice when the (sorted) slots are consecutive, so attention reads the cache in place."""
    if slots and slots == list(range(slots[0], slots[0] + len(slots))):
        return slice(slots[0], slots[0] + len(slots))
    return torch.tensor(slots, dtype=torch.long)
