"""Host memory for weights, backed by 2 MB pages where Linux offers them.

Every decode step reads each weight it uses once, and at batch 1 almost every read is cold: the
lm_head's 207 MB (bench-maverick) pushes the rest out of the caches. In 4 KB pages a cold read
of a few hundred KB also pays a page walk every 4 KB (two levels of them in a VM), so it runs
well under the machine's bandwidth. Weights placed in memory the kernel backs with 2 MB pages
(an anonymous mapping advised `MADV_HUGEPAGE` before its first touch, which transparent huge
pages honour when set to `madvise` or `always`) read faster. Measured on the 2-core machine
this was written on, one thread, with a 64 MB pass between products to empty the caches
(`x [1, 256] @ gate_up[e]`, 28 random experts of a stacked [128, 256, 1024] weight; the one-row
lm_head as 32 blocks of columns): 64 against 71 us per expert, 9.2 against 9.6 ms per head. In
the engine (bench-maverick, two engines taking turns in one process) decode went 1.02-1.04x
faster at batch 1, 1.03x at batch 8, and even at batch 32, where the lm_head is bound by its
arithmetic and reads oneDNN's packed weight, which this module cannot place.

Only weights: they are allocated once. Advising the allocations of every step instead (torch's
`THP_MEM_ALLOC_ENABLE=1`) made bench-maverick's batch-32 decode 4-18% slower here: each step then
faults in and zeroes fresh 2 MB pages for its activations.

The bytes and the layout are those of an ordinary contiguous tensor, so every kernel computes
what it would on torch's own memory. Off Linux, off the CPU, or for less than one 2 MB page,
these functions give ordinary tensors.
"""

from __future__ import annotations

import contextlib
import math
import mmap
from collections.abc import Sequence

import torch

HUGE_PAGE = 2 << 20
MIN_BYTES = HUGE_PAGE  # less than a page gains nothing: ordinary memory
ALIGN = 64  # bytes, the alignment torch's CPU allocator gives every tensor


def empty(shape: Sequence[int], dtype: torch.dtype, device: torch.device | None = None) -> torch.Tensor:
    """An uninitialised contiguous tensor, in 2 MB pages when it is a CPU tensor of at least one."""
    nbytes = math.prod(shape) * dtype.itemsize
    if not _advisable(device, nbytes):
        return torch.empty(tuple(shape), dtype=dtype, device=device)
    return _arena(nbytes).view(dtype).view(tuple(shape))


def copy(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of `t`, in 2 MB pages where `empty` gives them."""
    return empty(t.shape, t.dtype, t.device).copy_(t)


def in_huge_pages(t: torch.Tensor) -> torch.Tensor:
    """`t` copied into 2 MB pages where `empty` gives them, else `t` itself (a GPU tensor, say)."""
    return copy(t) if _advisable(t.device, t.numel() * t.element_size()) else t


def pack(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Contiguous copies of CPU tensors side by side in one mapping of 2 MB pages (each aligned as
    torch aligns its own), for weights too small to fill a page alone. Returned unchanged where
    `empty` would give ordinary memory for their sum."""
    offsets, end = [], 0
    for t in tensors:
        offsets.append(end)
        end += -(-t.numel() * t.element_size() // ALIGN) * ALIGN
    if not all(t.device.type == "cpu" for t in tensors) or not _advisable(torch.device("cpu"), end):
        return list(tensors)
    arena = _arena(end)
    out = []
    for t, start in zip(tensors, offsets, strict=True):
        piece = arena[start : start + t.numel() * t.element_size()].view(t.dtype).view(t.shape)
        out.append(piece.copy_(t))
    return out


def _advisable(device: torch.device | None, nbytes: int) -> bool:
    on_cpu = device is None or torch.device(device).type == "cpu"
    return on_cpu and nbytes >= max(MIN_BYTES, 1) and hasattr(mmap, "MADV_HUGEPAGE")


def _arena(nbytes: int) -> torch.Tensor:
    """`nbytes` of fresh memory [nbytes] uint8, starting on a 2 MB boundary of an anonymous mapping
    advised before any page of it is touched. The tensor keeps the mapping alive; it is unmapped
    when the last tensor over it goes."""
    mapping = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    with contextlib.suppress(OSError):  # a kernel without transparent huge pages: ordinary pages
        mapping.madvise(mmap.MADV_HUGEPAGE)
    raw = torch.frombuffer(mapping, dtype=torch.uint8)
    skip = -raw.data_ptr() % HUGE_PAGE
    return raw[skip : skip + nbytes]
