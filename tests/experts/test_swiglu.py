"""Routed-expert math: grouped and sparse."""

from __future__ import annotations

import torch

from experts.swiglu import expert_swiglu, grouped_swiglu


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
