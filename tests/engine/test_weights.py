"""Where the weights live: Q4_1 weights are copied into one mapping that asks for huge pages."""

from __future__ import annotations

import itertools
import sys

import pytest
import torch

from tokenspout.engine.weights import in_huge_pages


def vm_flags(address: int) -> list[str]:
    """The kernel's VmFlags of the mapping that holds ``address`` (/proc/self/smaps)."""
    inside = False
    for line in open("/proc/self/smaps"):
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            start, end = (int(x, 16) for x in head.split("-"))
            inside = start <= address < end
        elif inside and head == "VmFlags:":
            return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


def test_copies_are_equal_aligned_and_packed() -> None:
    tensors = {
        "qs": torch.randint(0, 255, (7, 33), dtype=torch.uint8),
        "d": torch.randn(7, 3),
        "half": torch.randn(5).to(torch.bfloat16),
        "int8": torch.randint(-128, 127, (3, 3, 3), dtype=torch.int8),
        "scalar_row": torch.randn(1),
    }
    copies = in_huge_pages(tensors)
    assert list(copies) == list(tensors)
    for name, t in tensors.items():
        c = copies[name]
        assert c.dtype == t.dtype and c.shape == t.shape and c.is_contiguous()
        assert torch.equal(c, t) and c.data_ptr() != t.data_ptr()
        assert c.data_ptr() % 64 == 0, name
    assert copies["qs"].data_ptr() % (2 << 20) == 0, "the arena starts on a huge page"
    ends = sorted(
        (c.data_ptr(), c.data_ptr() + c.numel() * c.element_size()) for c in copies.values()
    )
    assert all(end <= start for (_, end), (start, _) in itertools.pairwise(ends))
    tensors["d"].zero_()
    assert not torch.equal(copies["d"], tensors["d"]), "copies, not views"


@pytest.mark.skipif(sys.platform != "linux", reason="madvise and /proc/self/smaps are Linux's")
def test_the_mapping_asks_for_huge_pages() -> None:
    # Asked for, not necessarily granted: the kernel falls back to 4 KB pages when THP is off
    # or no 2 MB page is free, so the test checks the advice ("hg"), not AnonHugePages.
    copies = in_huge_pages({"w": torch.ones(1 << 20)})
    assert "hg" in vm_flags(copies["w"].data_ptr())
    assert torch.equal(copies["w"], torch.ones(1 << 20))
