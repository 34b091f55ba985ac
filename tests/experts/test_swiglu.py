"""Routed-expert math: grouped and sparse."""

from __future__ import annotations

import torch

from experts.swiglu import _grouped, expert_swiglu, grouped_swiglu


def test_grouped_equals_per_row_loop():
    g = torch.Generator().manual_seed(0)
    x, gate_up, down = (
        torch.randn(40, 8, generator=g),
        torch.randn(6, 8, 12, generator=g),
        torch.randn(6, 6, 8, generator=g),
    )
    slot = torch.randint(0, 6, (40,), generator=g)
    expected = torch.stack(
        [expert_swiglu(x[t : t + 1], gate_up[s], down[s])[0] for t, s in enumerate(slot.tolist())]
    )
    torch.testing.assert_close(grouped_swiglu(x, slot, gate_up, down), expected)


def test_only_routed_slots_are_touched():
    """Slots that no row routes to hold NaN weights: a dense implementation would spread them."""
    x, gate_up, down = (
        torch.randn(10, 8),
        torch.full((5, 8, 12), float("nan")),
        torch.full((5, 6, 8), float("nan")),
    )
    gate_up[2], down[2] = torch.randn(8, 12), torch.randn(6, 8)
    out = grouped_swiglu(x, torch.full((10,), 2), gate_up, down)
    assert torch.isfinite(out).all()


def test_gate_columns_come_first():
    x = torch.ones(1, 2)
    gate_up = torch.tensor([[[0.0, 1.0]], [[0.0, 1.0]]]).reshape(2, 2)  # gate column 0 -> silu(0) = 0
    down = torch.ones(1, 2)
    assert torch.equal(expert_swiglu(x, gate_up, down), torch.zeros(1, 2))


def _old_grouped_swiglu(x, slot_idx, gate_up, down):
    """The per-slot loop as it was before the grouped GEMM path: the CPU must still give exactly this."""
    out = torch.empty_like(x)
    order = torch.argsort(slot_idx, stable=True)
    slots, counts = torch.unique_consecutive(slot_idx[order], return_counts=True)
    start = 0
    for slot, count in zip(slots.tolist(), counts.tolist(), strict=True):
        rows = order[start : start + count]
        out[rows] = expert_swiglu(x[rows], gate_up[slot], down[slot])
        start += count
    return out


def _inputs(rows: int, slots: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(rows, 16, generator=g).to(dtype)
    gate_up = torch.randn(slots, 16, 32, generator=g).to(dtype)
    down = torch.randn(slots, 16, 16, generator=g).to(dtype)
    slot = torch.randint(0, slots - 1, (rows,), generator=g)  # the last slot gets no rows
    return x, slot, gate_up, down


def test_cpu_results_are_exactly_the_per_slot_loop():
    """Stacked slots with many rows per slot take the grouped GEMM on a CPU, with few the loop;
    per-slot tensors always loop. All give the old loop's results, bit for bit."""
    for dtype in (torch.float32, torch.bfloat16):
        for rows, slots in ((37, 6), (3, 40), (1, 2)):  # 37 >= 6 / 8: grouped; 3 < 40 / 8: the loop
            x, slot, gate_up, down = _inputs(rows, slots, dtype)
            expected = _old_grouped_swiglu(x, slot, gate_up, down)
            assert torch.equal(grouped_swiglu(x, slot, gate_up, down), expected)  # stacked slots
            assert torch.equal(grouped_swiglu(x, slot, list(gate_up), list(down)), expected)  # per-slot


def test_grouped_gemm_path_equals_the_loop():
    """The GPU path's arithmetic, run here on the CPU (torch's grouped GEMM has a CPU kernel for
    fp32): rows out of slot order, empty slots, one slot with every row."""
    for rows, slots in ((37, 6), (5, 3), (1, 2)):
        x, slot, gate_up, down = _inputs(rows, slots)
        torch.testing.assert_close(
            _grouped(x, slot, gate_up, down), _old_grouped_swiglu(x, slot, gate_up, down)
        )
    x, _, gate_up, down = _inputs(9, 4)
    every = torch.full((9,), 2)
    torch.testing.assert_close(_grouped(x, every, gate_up, down), expert_swiglu(x, gate_up[2], down[2]))
