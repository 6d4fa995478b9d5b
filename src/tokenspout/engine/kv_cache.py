"""A preallocated KV cache: ``num_slots`` slots × ``max_model_len`` positions per layer."""

from __future__ import annotations

import math
import mmap

import torch


class KVCache:
    """Keys and values of every layer, one fixed region per sequence slot.

    Layout ``k[layer]``: [num_slots, Hkv, max_len, D], head-major, so that the keys a
    sequence's head attends to are one contiguous [length, D] block: decode attention reads
    them in place (with the position-major layout, [max_len, Hkv, D], each head's keys were
    strided, and attention at batch 16 over 512 positions took twice as long).
    """

    def __init__(
        self,
        num_layers: int,
        num_slots: int,
        max_len: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
    ):
        self.num_slots = num_slots
        self.max_len = max_len
        shape = (num_layers, num_slots, kv_heads, max_len, head_dim)
        self.k = _lazy_zeros(shape, dtype)
        self.v = _lazy_zeros(shape, dtype)
        self._heads = torch.arange(kv_heads)[None, :]  # [1, Hkv], broadcast against tokens

    def rows(self, slots: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Where tokens at ``positions`` [N] of ``slots`` [N] go: [N * Hkv] rows of a layer
        flattened to [num_slots * Hkv * max_len, D], token-major like ``k.reshape(-1, D)``.
        Computed once per step and shared by every layer's ``write``."""
        heads = self.k.shape[2]
        return ((slots[:, None] * heads + self._heads) * self.max_len + positions[:, None]).view(-1)

    def write(self, layer: int, rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v: [N, Hkv, D] at ``rows`` (from ``rows()``), in the cache's dtype."""
        d, dtype = k.shape[-1], self.k.dtype
        self.k[layer].view(-1, d).index_copy_(0, rows, k.reshape(-1, d).to(dtype))
        self.v[layer].view(-1, d).index_copy_(0, rows, v.reshape(-1, d).to(dtype))

    def slot_view(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v of one layer: [num_slots, Hkv, max_len, D]."""
        return self.k[layer], self.v[layer]

    def copy_prefix(self, src: int, dst: int, num_tokens: int, *, start: int = 0) -> None:
        """Copy positions [start, num_tokens) of slot ``src`` into slot ``dst``, every layer."""
        self.k[:, dst, :, start:num_tokens] = self.k[:, src, :, start:num_tokens]
        self.v[:, dst, :, start:num_tokens] = self.v[:, src, :, start:num_tokens]


def _lazy_zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Zeros whose pages the OS maps only when written, 4 KB at a time.

    An anonymous ``mmap`` is zero-filled on first touch: untouched slots cost no memory (16
    slots × 2048 positions is ~0.75 GB in bf16). ``MADV_NOHUGEPAGE`` because with
    transparent huge pages each first write to a head's region mapped a 2 MB page: a
    41-token prompt grew the process by 240 MB, and 64 slots of short chats took 6.4 GB.
    Zeros rather than ``empty`` because attention reads masked-out positions too, and
    garbage there could be NaN, which survives a zero weight.
    """
    element = torch.empty((), dtype=dtype).element_size()
    buffer = mmap.mmap(-1, math.prod(shape) * element)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):  # Linux
        buffer.madvise(mmap.MADV_NOHUGEPAGE)
    # The tensor keeps the buffer alive (frombuffer holds a reference to it).
    return torch.frombuffer(buffer, dtype=dtype).view(shape)
