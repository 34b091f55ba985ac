"""Simulated top-1 routing: an expert per token per MoE layer from a Zipf popularity, then the
engine's own replica choice (`router.placement.choose_replica`) picks the physical slot.

The popularity of MoE layer m follows the same convention as the skewed checkpoints of
`cluster.presets` (`--expert-skew`, `--skew-seed`): ranking = randperm(E) seeded with
`skew_seed * 1009 + layer` (the model layer index), and ranking[r] is the expert with rank r + 1,
so a simulation and a skewed tiny checkpoint aim at the same hot experts.
"""

from __future__ import annotations

import numpy as np
import torch

from router.placement import Placement, choose_replica
from router.skew import zipf


def popularity(moe_layers: tuple[int, ...], num_experts: int, exponent: float, skew_seed: int) -> np.ndarray:
    """Shares per expert, float64 [L_moe, E], each row summing to 1."""
    if exponent < 0:
        raise ValueError(f"expert skew (Zipf exponent) must be >= 0, got {exponent}")
    shares = zipf(num_experts, exponent).double().numpy()
    out = np.empty((len(moe_layers), num_experts))
    for m, layer in enumerate(moe_layers):
        g = torch.Generator().manual_seed(skew_seed * 1009 + layer)
        out[m, torch.randperm(num_experts, generator=g).numpy()] = shares
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


class ReplicaChooser:
    """Rows per physical slot for a step's tokens on every attention rank, as the dispatcher
    picks the slots.

    The dispatcher calls `choose_replica(expert_idx, log2phy[m], logcnt[m], step_id + dp_rank)`
    per rank and MoE layer, and skips it for a layer where no expert has a second replica (a
    plain lookup then). Here every rank and layer goes through one call: the key of a token is
    (rank, layer, expert), and rank r's rows of the table list each expert's replicas rotated by
    r, so `offset=step_id` on them picks exactly what `offset=step_id + r` picks on the plain
    rows. A token's replica depends only on how many earlier tokens share its key, so keys of
    other ranks and layers change nothing, and neither does the order of the tokens (drawn
    independently): they are laid out grouped by key.
    """

    def __init__(self, placement: Placement, num_ranks: int) -> None:
        self.placement = placement
        self.num_ranks = num_ranks
        num_layers, num_experts, max_replicas = placement.log2phy.shape
        num_slots = placement.num_slots
        # where a (rank, layer, expert) key's tokens go when the expert has one replica
        group = np.arange(num_ranks * num_layers).reshape(num_ranks, num_layers, 1)
        target = (group * num_slots + placement.log2phy[:, :, 0].numpy()[None]).ravel()
        single = np.broadcast_to((placement.logcnt == 1).numpy()[None], (num_ranks, num_layers, num_experts))
        self._single_pos = np.flatnonzero(single.ravel())
        self._single_target = target[self._single_pos]
        self._replicated_pos = np.flatnonzero(~single.ravel())
        self._size = num_ranks * num_layers * num_slots
        if self._replicated_pos.size == 0:
            return
        cnt = placement.logcnt.reshape(-1, 1)  # [L * E, 1]
        j = torch.arange(max_replicas)
        flat = placement.log2phy.reshape(-1, max_replicas)
        rows = [torch.where(j < cnt, flat.gather(1, (j + r) % cnt), -1) for r in range(num_ranks)]
        self._log2phy = torch.cat(rows)  # [M * L * E, R]
        self._logcnt = placement.logcnt.reshape(-1).repeat(num_ranks)

    def slot_rows(self, counts: np.ndarray, step_id: int) -> np.ndarray:
        """counts int64 [M, L, E] tokens per (rank, layer, expert) -> rows per (rank, layer,
        physical slot) int64 [M, L, W*S]."""
        num_ranks, num_layers, num_experts = counts.shape
        flat = counts.ravel()
        # Experts with one replica go to it (choose_replica would pick it too); only the tokens of
        # replicated experts go through choose_replica, and their keys do not depend on the rest.
        rows = np.bincount(self._single_target, weights=flat[self._single_pos], minlength=self._size)
        rows = rows.astype(np.int64)
        if self._replicated_pos.size:
            keys = np.repeat(self._replicated_pos, flat[self._replicated_pos])  # (rank, layer, expert)
            slot = choose_replica(torch.from_numpy(keys), self._log2phy, self._logcnt, step_id, False)
            rows += np.bincount(
                keys // num_experts * self.placement.num_slots + slot.numpy(), minlength=self._size
            )
        return rows.reshape(num_ranks, num_layers, self.placement.num_slots)
