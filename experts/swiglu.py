"""Routed-expert math over slots: each slot holds one replica of one logical expert."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


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
    sequence of S per-slot tensors) -> [T, H].
    Rows are grouped by slot so each slot runs one matmul over just its rows; slots with no
    rows do no work.
    """
    out = torch.empty_like(x)
    if x.shape[0] == 0:
        return out
    order = torch.argsort(slot_idx, stable=True)
    slots, counts = torch.unique_consecutive(slot_idx[order], return_counts=True)
    start = 0
    for slot, count in zip(slots.tolist(), counts.tolist(), strict=True):
        rows = order[start : start + count]
        out[rows] = expert_swiglu(x[rows], gate_up[slot], down[slot])
        start += count
    return out
