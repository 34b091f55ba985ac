"""Weights in memory advised for 2 MB pages: the same bytes and layout as torch's own tensors."""

from __future__ import annotations

import gc
import mmap
import sys

import pytest
import torch

from model import host_memory

linux_only = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_HUGEPAGE"), reason="madvise is Linux's"
)


def _vm_flags(ptr: int) -> list[str]:
    """The VmFlags of the mapping of this process that holds address `ptr` (/proc/self/smaps)."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= ptr < hi
            elif inside and head == "VmFlags:":
                return line.split()[1:]
    raise AssertionError(f"no mapping holds {ptr:#x}")


@linux_only
def test_a_large_tensor_starts_a_mapping_advised_for_huge_pages():
    src = torch.randn(3, 1024, 1024)  # 12 MB
    t = host_memory.copy(src)
    assert torch.equal(t, src) and t.is_contiguous() and t.dtype == src.dtype
    assert t.data_ptr() % host_memory.HUGE_PAGE == 0
    assert "hg" in _vm_flags(t.data_ptr())  # MADV_HUGEPAGE took
    assert "hg" not in _vm_flags(src.data_ptr())


@linux_only
def test_pack_puts_small_weights_side_by_side_in_one_mapping():
    tensors = [torch.randn(256, 512), torch.randn(256), torch.arange(7), torch.randn(3, 5).double()] * 8
    packed = host_memory.pack(tensors)
    pairs = list(zip(tensors, packed, strict=True))
    assert all(torch.equal(a, b) and a.shape == b.shape and a.dtype == b.dtype for a, b in pairs)
    assert all(p.is_contiguous() and p.data_ptr() % host_memory.ALIGN == 0 for p in packed)
    base = packed[0].untyped_storage().data_ptr()
    assert {p.untyped_storage().data_ptr() for p in packed} == {base}
    ends = sorted((p.data_ptr(), p.data_ptr() + p.numel() * p.element_size()) for p in packed)
    assert all(end <= start for (_, end), (start, _) in zip(ends, ends[1:], strict=False))  # no two overlap
    assert "hg" in _vm_flags(packed[0].data_ptr())


def test_less_than_a_page_is_left_alone():
    small = [torch.randn(16, 16), torch.randn(16)]
    assert all(a is b for a, b in zip(small, host_memory.pack(small), strict=True))
    assert host_memory.pack([]) == []
    t = host_memory.empty((4, 4), torch.float32)
    assert t.shape == (4, 4) and t.untyped_storage().nbytes() == 64  # torch's own allocation
    assert host_memory.in_huge_pages(small[0]) is small[0]
    copied = host_memory.copy(small[0])
    assert copied is not small[0] and torch.equal(copied, small[0])


@linux_only
def test_a_view_keeps_its_mapping_alive():
    packed = host_memory.pack([torch.full((512, 1024), 2.0), torch.full((512, 1024), 3.0)])
    last = packed[1][-1]
    del packed
    gc.collect()
    garbage = [torch.randn(512, 1024) for _ in range(8)]  # would reuse freed pages
    assert bool((last == 3.0).all()) and len(garbage) == 8
