"""Routed-expert math over slots: each slot holds one replica of one logical expert.

`grouped_swiglu` runs the rows of one MoE layer, each through its own slot. On a GPU, with the
slots stacked into one tensor, the rows are grouped by slot and each projection is one grouped
matrix product (torch's grouped GEMM), with no host sync. Everywhere else (CPUs, per-slot
tensors, a torch without a usable grouped GEMM) it loops over the slots that have rows, one
matmul each: a host sync for the slot list, and on a CPU exactly the results it always gave.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F

# torch >= 2.9 names it torch.nn.functional.grouped_mm; 2.8 has only the private op
_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def expert_swiglu(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """One expert in the fused checkpoint layout. x [n, H], gate_up [H, 2I] (gate first), down [I, H]."""
    gate, up = (x @ gate_up).chunk(2, dim=-1)
    return (up * F.silu(gate)) @ down


def grouped_swiglu(
    x: torch.Tensor,
    slot_idx: torch.Tensor,
    gate_up: torch.Tensor | Sequence[torch.Tensor],
    down: torch.Tensor | Sequence[torch.Tensor],
) -> torch.Tensor:
    """Sparse expert compute: row t goes through slot slot_idx[t] only.

    x [T, H], slot_idx [T] int64 in [0, S), gate_up [S, H, 2I], down [S, I, H] (stacked, or a
    sequence of S per-slot tensors), all on one device -> [T, H] on that device. Slots with no
    rows do no work. Host syncs: none on the grouped GEMM path (a GPU, stacked slots); on the
    per-slot loop the slot list (and, on a GPU, the sizing of torch.unique's output).
    """
    if x.shape[0] == 0:
        return torch.empty_like(x)
    if isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor) and uses_grouped_mm(x):
        return _grouped(x, slot_idx, gate_up, down)
    return _per_slot(x, slot_idx, gate_up, down)


def uses_grouped_mm(x: torch.Tensor) -> bool:
    """Whether rows like `x` take the grouped GEMM: on a GPU whose torch runs it for x's dtype."""
    return x.device.type == "cuda" and grouped_mm_works(x.device, x.dtype)


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
    out = torch.empty_like(x)
    order = torch.argsort(slot_idx, stable=True)
    slots, counts = torch.unique_consecutive(slot_idx[order], return_counts=True)
    start = 0
    for slot, count in zip(slots.tolist(), counts.tolist(), strict=True):  # host syncs: the fallback
        rows = order[start : start + count]
        out[rows] = expert_swiglu(x[rows], gate_up[slot], down[slot])
        start += count
    return out
