"""The rank layout of one cluster engine's torch.distributed world, and its first placement.

World ranks: attention (data-parallel) ranks 0..M-1 first, then expert ranks M..M+N-1 (expert
worker w is rank M + w), each expert worker with S slots per MoE layer. A routed row's
destination is one key, rank * S + local slot; global slot g lives on expert rank M + g // S,
so its key is M * S + g.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from router.placement import Placement, static_placement


@dataclass(frozen=True)
class RankLayout:
    num_attention: int
    num_expert_workers: int
    slots_per_worker: int

    def __post_init__(self) -> None:
        if min(self.num_attention, self.num_expert_workers, self.slots_per_worker) < 1:
            raise ValueError(f"a rank layout needs >= 1 attention rank, expert rank and slot, got {self}")

    @property
    def world_size(self) -> int:
        return self.num_attention + self.num_expert_workers

    @property
    def num_keys(self) -> int:
        """Destination keys of one exchange: world_size * S."""
        return self.world_size * self.slots_per_worker

    @property
    def first_expert_key(self) -> int:
        """The key of global slot 0 (expert rank M, local slot 0)."""
        return self.num_attention * self.slots_per_worker

    def expert_rank(self, worker_idx: int) -> int:
        return self.num_attention + worker_idx


def plan_layout(
    num_moe_layers: int,
    num_experts: int,
    num_attention: int,
    num_expert_workers: int,
    redundant_slots_per_worker: int = 0,
) -> tuple[RankLayout, Placement]:
    """Slots per worker (ceil(E / N) plus the redundant ones) and the initial placement map (one
    replica per expert, redundant slots round-robin)."""
    if num_expert_workers > num_experts:
        raise ValueError(
            f"{num_expert_workers} expert workers for {num_experts} experts: at most one worker per expert"
        )
    if num_moe_layers < 1:
        raise ValueError("the model has no MoE layers; expert workers have nothing to hold")
    if redundant_slots_per_worker < 0:
        raise ValueError(f"redundant slots per worker must be >= 0, got {redundant_slots_per_worker}")
    slots = math.ceil(num_experts / num_expert_workers) + redundant_slots_per_worker
    layout = RankLayout(num_attention, num_expert_workers, slots)
    return layout, static_placement(num_moe_layers, num_experts, num_expert_workers, slots)
