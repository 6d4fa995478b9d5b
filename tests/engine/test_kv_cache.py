"""KVCache: writes land where rows() says, and untouched positions cost no memory."""

from __future__ import annotations

import os

import torch

from tokenspout.engine.kv_cache import KVCache


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def test_write_lands_at_the_rows_of_its_slots_and_positions() -> None:
    cache = KVCache(2, 3, 16, 2, 4, torch.float32)
    slots, positions = torch.tensor([2, 0]), torch.tensor([5, 0])
    k = torch.arange(16, dtype=torch.float32).view(2, 2, 4)
    cache.write(1, cache.rows(slots, positions), k, -k)
    keys, values = cache.slot_view(1)
    assert torch.equal(keys[2, :, 5], k[0]) and torch.equal(keys[0, :, 0], k[1])
    assert torch.equal(values[2, :, 5], -k[0])
    assert keys.abs().sum() == k.abs().sum()  # nothing else written
    assert cache.slot_view(0)[0].abs().sum() == 0


def test_a_short_prompt_in_every_slot_touches_only_its_own_pages() -> None:
    # 16 slots x 2048 positions x 30 layers: 1.5 GB if every page were mapped. A 41-token
    # prompt per slot writes ~35 MB of pages; with transparent huge pages (numpy asks for
    # them on large arrays) each first write mapped 2 MB, and this grew by ~1.4 GB.
    before = rss_mb()
    cache = KVCache(30, 16, 2048, 3, 64, torch.float32)
    kv = torch.ones(41, 3, 64)
    for slot in range(16):
        rows = cache.rows(torch.full((41,), slot), torch.arange(41))
        for layer in range(30):
            cache.write(layer, rows, kv, kv)
    assert rss_mb() - before < 300
    assert cache.slot_view(29)[0][15, 2, :41].sum() == 41 * 64
