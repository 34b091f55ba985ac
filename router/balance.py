"""How balanced the expert workers are: the one definition every part of the project uses.

Balancedness is mean / max tokens per expert worker. Per MoE layer it is one number in (0, 1];
over several layers it is the sum of the layers' means over the sum of their maxes, because a
step waits for each layer's busiest worker in turn. An idle layer (or step) counts as perfect.
Imbalance is (max - mean) / mean, so an overall imbalance is 1 / balancedness - 1.
"""

from __future__ import annotations

import torch


def measured_worker_load(slot_load: torch.Tensor, slots_per_worker: int) -> torch.Tensor:
    """Tokens per physical slot [..., L, W*S] -> tokens per expert worker [..., L, W]."""
    return slot_load.unflatten(-1, (-1, slots_per_worker)).sum(-1)


def balancedness_per_layer(worker_load: torch.Tensor) -> torch.Tensor:
    """mean / max per layer: float [..., L, W] -> float64 [..., L] in (0, 1]."""
    loads = _check(worker_load)
    peak = loads.amax(dim=-1)
    return torch.where(peak > 0, loads.mean(dim=-1) / peak.clamp(min=1e-300), 1.0)


def imbalance_per_layer(worker_load: torch.Tensor) -> torch.Tensor:
    """(max - mean) / mean per layer: float [..., L, W] -> float64 [..., L], >= 0."""
    loads = _check(worker_load)
    mean = loads.mean(dim=-1)
    return torch.where(mean > 0, (loads.amax(dim=-1) - mean) / mean.clamp(min=1e-300), 0.0)


def balancedness(worker_load: torch.Tensor) -> torch.Tensor:
    """Over all layers: sum of means / sum of maxes, float [..., L, W] -> float64 [...] (a 0-dim
    tensor for one [L, W]; one value per step for [steps, L, W])."""
    loads = _check(worker_load)
    peak = loads.amax(dim=-1).sum(dim=-1)
    return torch.where(peak > 0, loads.mean(dim=-1).sum(dim=-1) / peak.clamp(min=1e-300), 1.0)


def balance_figures(worker_load: torch.Tensor) -> dict:
    """Balancedness per layer and overall, and the overall imbalance, for worker_load [L, W]."""
    overall = float(balancedness(worker_load))
    return {
        "balancedness_per_layer": balancedness_per_layer(worker_load).tolist(),
        "balancedness": overall,
        "imbalance": 1.0 / overall - 1.0,
    }


def _check(worker_load: torch.Tensor) -> torch.Tensor:
    if worker_load.dim() < 2 or worker_load.shape[-1] < 1:
        raise ValueError(f"worker loads must be [..., L, W] with W >= 1, got {list(worker_load.shape)}")
    return worker_load.to(torch.float64)
