"""Routed-expert math over slots: each slot holds one replica of one logical expert.

`grouped_swiglu` runs the rows of one MoE layer, each through its own slot. With the slots
stacked into one tensor, the rows are grouped by slot and each projection is one grouped matrix
product (torch's grouped GEMM): on a GPU always, with no host sync; on a CPU when there are at
least an eighth as many rows as slots. Otherwise (few rows on a CPU, per-slot tensors, a torch
without a usable grouped GEMM) it loops over the slots that have rows, one matmul each, with a
host sync for the slot list.

On a CPU torch's grouped GEMM runs each group's product as the loop does, so both give the same
results (bitwise, as measured); what it saves is the loop's Python and small ops, and what it
costs is a pass over every slot, empty ones too. Measured on 2 cores (bench-maverick's experts,
H = I = 256, two threads), loop time over grouped: 128 slots 0.63 at 2 rows, 1.02 at 16, 1.22
at 32, 1.33 at 48; 34 slots 0.97 at 2, 1.01 at 4, 1.26 at 8; 16 slots 1.08 at 2. Hence the
eighth (`CPU_GROUPED_ROWS_PER_SLOT`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F

# torch >= 2.9 names it torch.nn.functional.grouped_mm; 2.8 has only the private op
_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
CPU_GROUPED_ROWS_PER_SLOT = 1 / 8  # on a CPU, rows per slot from which the grouped GEMM is faster


def expert_swiglu(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """One expert in the fused checkpoint layout. x [n, H], gate_up [H, 2I] (gate first), down [I, H]."""
    return _swiglu_hidden(x, gate_up) @ down


def grouped_swiglu(
    x: torch.Tensor,
    slot_idx: torch.Tensor,
    gate_up: torch.Tensor | Sequence[torch.Tensor],
    down: torch.Tensor | Sequence[torch.Tensor],
) -> torch.Tensor:
    """Sparse expert compute: row t goes through slot slot_idx[t] only.

    x [T, H], slot_idx [T] int64 in [0, S), gate_up [S, H, 2I], down [S, I, H] (stacked, or a
    sequence of S per-slot tensors), all on one device -> [T, H] on that device. Slots with no
    rows compute nothing. Host syncs: none on the grouped GEMM path on a GPU; on the per-slot loop
    the slot list (and, on a GPU, the sizing of torch.unique's output).
    """
    if x.shape[0] == 0:
        return torch.empty_like(x)
    stacked = isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor)
    if stacked and _takes_grouped(x, down):
        return _grouped(x, slot_idx, gate_up, down)
    return _per_slot(x, slot_idx, gate_up, down)


def uses_grouped_mm(x: torch.Tensor) -> bool:
    """Whether rows like `x` take the grouped GEMM: on a GPU whose torch runs it for x's dtype."""
    return x.device.type == "cuda" and grouped_mm_works(x.device, x.dtype)


def _takes_grouped(x: torch.Tensor, down: torch.Tensor) -> bool:
    num_slots, width, hidden = down.shape
    if (width * x.element_size()) % 16 or (hidden * x.element_size()) % 16:
        return False  # the grouped GEMM wants rows that start on 16-byte boundaries
    if x.device.type == "cpu":
        many = x.shape[0] >= max(2, num_slots * CPU_GROUPED_ROWS_PER_SLOT)
        return many and grouped_mm_works(x.device, x.dtype)
    return uses_grouped_mm(x)


@functools.cache
def grouped_mm_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Try torch's grouped GEMM once per (device, dtype): its kernels cover some GPUs and dtypes
    only (bf16 on sm80+ in torch 2.8-2.11), and say so by raising."""
    if _GROUPED_MM is None:
        return False
    try:
        a = torch.zeros((4, 16), dtype=dtype, device=device)
        b = torch.zeros((2, 16, 16), dtype=dtype, device=device)
        offs = torch.full((2,), 4, dtype=torch.int32, device=device)  # the second group empty
        return tuple(_GROUPED_MM(a, b, offs=offs).shape) == (4, 16)
    except (RuntimeError, NotImplementedError, TypeError, ValueError):
        return False


def _grouped(
    x: torch.Tensor, slot_idx: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor
) -> torch.Tensor:
    order = torch.argsort(slot_idx, stable=True)
    # offs[s]: end of slot s's rows in the sorted order (empty slots repeat the offset); found by
    # search, as CUDA's bincount would read the largest slot on the host
    slots = torch.arange(gate_up.shape[0], device=x.device)
    offs = torch.searchsorted(slot_idx[order], slots, right=True).to(torch.int32)
    rows = x.index_select(0, order)
    gate, up = _GROUPED_MM(rows, gate_up, offs=offs).chunk(2, dim=-1)
    out = _GROUPED_MM(up * F.silu(gate), down, offs=offs)
    return torch.empty_like(x).index_copy_(0, order, out)


def _per_slot(
    x: torch.Tensor,
    slot_idx: torch.Tensor,
    gate_up: torch.Tensor | Sequence[torch.Tensor],
    down: torch.Tensor | Sequence[torch.Tensor],
) -> torch.Tensor:
    """One matmul pair per slot with rows, over contiguous slices of the rows sorted by slot (one
    gather in, one scatter out, rather than an index and an index_put per slot). Each row gets
    the same products as before: a slot's rows are the same set, in the same order."""
    if x.shape[0] == 1:  # a decode step of one sequence: nothing to group
        slot = int(slot_idx[0])
        return expert_swiglu(x, gate_up[slot], down[slot])
    order = torch.argsort(slot_idx, stable=True)
    slots, counts = torch.unique_consecutive(slot_idx[order], return_counts=True)
    rows = x.index_select(0, order)
    out = torch.empty_like(rows)
    start = 0
    for slot, count in torch.stack([slots, counts]).T.tolist():  # one host sync: the fallback
        end = start + count
        torch.mm(_swiglu_hidden(rows[start:end], gate_up[slot]), down[slot], out=out[start:end])
        start = end
    return torch.empty_like(x).index_copy_(0, order, out)


def _swiglu_hidden(x: torch.Tensor, gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = (x @ gate_up).chunk(2, dim=-1)
    return up * F.silu(gate)
