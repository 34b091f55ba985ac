"""Simulated top-1 routing: an expert per token per MoE layer from a Zipf popularity (the
engine's own replica choice, `router.routing.ReplicaTable`, then picks the physical slot).

The popularity of MoE layer m ranks the experts with `model.skew.hot_expert_ranking`, the
convention of the skewed checkpoints (`--expert-skew`, `--skew-seed`), so a simulation and a
skewed tiny checkpoint aim at the same hot experts.
"""

from __future__ import annotations

import numpy as np

from model.skew import hot_expert_ranking, zipf


def popularity(moe_layers: tuple[int, ...], num_experts: int, exponent: float, skew_seed: int) -> np.ndarray:
    """Shares per expert, float64 [L_moe, E], each row summing to 1."""
    if exponent < 0:
        raise ValueError(f"expert skew (Zipf exponent) must be >= 0, got {exponent}")
    shares = zipf(num_experts, exponent).double().numpy()
    out = np.empty((len(moe_layers), num_experts))
    for m, layer in enumerate(moe_layers):
        out[m, hot_expert_ranking(num_experts, skew_seed, layer).numpy()] = shares
    return out / out.sum(axis=1, keepdims=True)


class Router:
    """Tokens per expert for each rank and MoE layer, drawn per step.

    Top-1 choices of different tokens are independent draws from the layer's popularity, so the
    counts carry everything (the replica choice below re-creates the tokens from them). Small
    steps draw each token (one inverse-CDF lookup over all layers); large ones draw the counts
    with one multinomial per (rank, layer): the same distribution, whichever is cheaper."""

    def __init__(self, shares: np.ndarray, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.set_shares(shares)

    def set_shares(self, shares: np.ndarray) -> None:
        """shares [L_moe, E] (rows summing to 1)."""
        self.shares = shares
        num_layers, num_experts = shares.shape
        cdf = np.cumsum(shares, axis=1)
        cdf[:, -1] = 1.0
        self._layer = np.arange(num_layers)[:, None]
        self._cdf = (cdf + self._layer).ravel()  # layer m's CDF lives in [m, m + 1]

    def sample(self, tokens_per_rank: np.ndarray) -> np.ndarray:
        """tokens_per_rank int [M] -> tokens per (rank, MoE layer, logical expert) int64 [M, L, E]."""
        tokens = np.asarray(tokens_per_rank, dtype=np.int64)
        num_ranks, (num_layers, num_experts) = len(tokens), self.shares.shape
        total = int(tokens.sum())
        if total >= num_ranks * num_experts:
            n = np.broadcast_to(tokens[:, None], (num_ranks, num_layers))
            return self.rng.multinomial(n, self.shares)
        u = self.rng.random((num_layers, total)) + self._layer
        flat = np.searchsorted(self._cdf, u, side="right")  # layer * E + expert
        flat = np.minimum(flat, self._layer * num_experts + num_experts - 1)
        rank = np.repeat(np.arange(num_ranks), tokens)[None, :]
        keys = rank * (num_layers * num_experts) + flat
        counts = np.bincount(keys.ravel(), minlength=num_ranks * num_layers * num_experts)
        return counts.reshape(num_ranks, num_layers, num_experts)
