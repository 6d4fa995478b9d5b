"""A preallocated KV cache: ``num_slots`` slots × ``max_model_len`` positions per layer."""

from __future__ import annotations

import numpy as np
import torch


class KVCache:
    """Keys and values of every layer, one fixed region per sequence slot.

    Layout ``k[layer]``: [num_slots * max_len, Hkv, D], so a token's K/V lands at row
    ``slot * max_len + pos`` with a single ``index_copy_`` for the whole step, and
    ``slot_view`` reshapes it to [num_slots, max_len, Hkv, D] without a copy.
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
        shape = (num_layers, num_slots * max_len, kv_heads, head_dim)
        self.k = _lazy_zeros(shape, dtype)
        self.v = _lazy_zeros(shape, dtype)

    def write(self, layer: int, rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v: [N, Hkv, D] at flat rows [N] (``slot * max_len + pos``)."""
        self.k[layer].index_copy_(0, rows, k)
        self.v[layer].index_copy_(0, rows, v)

    def slot_view(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v of one layer as [num_slots, max_len, Hkv, D] views."""
        shape = (self.num_slots, self.max_len, *self.k.shape[2:])
        return self.k[layer].view(shape), self.v[layer].view(shape)

    def copy_prefix(self, src: int, dst: int, num_tokens: int) -> None:
        """Copy positions [0, num_tokens) of slot ``src`` into slot ``dst``, every layer."""
        s, d = src * self.max_len, dst * self.max_len
        self.k[:, d : d + num_tokens] = self.k[:, s : s + num_tokens]
        self.v[:, d : d + num_tokens] = self.v[:, s : s + num_tokens]


def _lazy_zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Zeros whose pages the OS maps only when written.

    ``np.zeros`` of a large array is a calloc: untouched slots cost no memory (16 slots ×
    2048 positions is ~0.75 GB in bf16). Zeros rather than ``empty`` because attention reads
    masked-out positions too, and garbage there could be NaN, which survives a zero weight.
    """
    element = torch.empty((), dtype=dtype).element_size()
    storage = np.zeros(shape, dtype={2: np.int16, 4: np.float32}[element])
    return torch.from_numpy(storage).view(dtype)
