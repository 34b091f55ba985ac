"""Skewed routing for experiments: router weights whose top-1 popularity follows a Zipf law.

Real routers are skewed: a few experts take a large share of tokens. A random router is not.
`skew_router` rescales the rows of a router weight [E, H] so that, over router inputs shaped like
the model's (post-norm hidden states, roughly isotropic), expert popularity approaches
p(rank r) ~ 1 / r^exponent. Only row norms change: the direction of every row, and so which
tokens prefer which expert, stays random. A larger norm makes an expert's logit spread wider,
so it is the maximum more often; the norms are fitted by a fixed-point iteration on sampled
inputs. `ranking` says which expert gets which popularity rank (vary it with --skew-seed).
"""

from __future__ import annotations

import torch


def hot_expert_ranking(num_experts: int, skew_seed: int, layer_idx: int) -> torch.Tensor:
    """Which expert gets which popularity rank in one layer: ranking[r] is the expert with rank
    r + 1, int64 [E]. The one convention shared by skewed checkpoints (`--skew-seed`) and the
    simulator, so both aim at the same hot experts."""
    return torch.randperm(num_experts, generator=torch.Generator().manual_seed(skew_seed * 1009 + layer_idx))


def zipf(num_experts: int, exponent: float) -> torch.Tensor:
    """Target shares [E] for ranks 1..E."""
    p = 1.0 / torch.arange(1, num_experts + 1, dtype=torch.float64) ** exponent
    return (p / p.sum()).float()


def skew_router(
    router: torch.Tensor,
    exponent: float,
    ranking: torch.Tensor,
    seed: int = 0,
    samples: int = 4096,
    iterations: int = 150,
) -> torch.Tensor:
    """router [E, H] -> rescaled copy. ranking [E]: ranking[r] is the expert with rank r+1."""
    if exponent < 0:
        raise ValueError(f"--expert-skew must be >= 0, got {exponent}")
    if exponent == 0:
        return router.clone()
    num_experts, hidden = router.shape
    g = torch.Generator().manual_seed(seed)
    unit = router / router.norm(dim=1, keepdim=True)
    z = torch.randn(samples, hidden, generator=g) @ unit.T  # [N, E] logits at unit norm
    target = torch.empty(num_experts)
    target[ranking] = zipf(num_experts, exponent)
    log_norm = torch.zeros(num_experts)
    for _ in range(iterations):
        wins = torch.bincount((z * log_norm.exp()).argmax(-1), minlength=num_experts).float()
        observed = (wins + 0.5) / (samples + 0.5 * num_experts)
        log_norm += 0.1 * (target.log() - observed.log())
        log_norm -= log_norm.mean()
    scale = router.norm(dim=1).mean()
    return unit * (log_norm.exp() * scale)[:, None]


def popularity(expert_idx: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Shares [E] of tokens per expert, sorted descending."""
    counts = torch.bincount(expert_idx.flatten(), minlength=num_experts).float()
    return (counts / counts.sum()).sort(descending=True).values


def fitted_exponent(shares: torch.Tensor, top: int = 16) -> float:
    """Least-squares slope of log share against log rank over the top ranks (a Zipf exponent)."""
    ranks = torch.arange(1, top + 1, dtype=torch.float64).log()
    y = shares[:top].double().clamp_min(1e-9).log()
    x = ranks - ranks.mean()
    return float(-(x * (y - y.mean())).sum() / (x * x).sum())
