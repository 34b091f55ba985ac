"""What one cluster engine is made of: worker counts, device, slots and placement strategy."""

from __future__ import annotations

from dataclasses import dataclass, field

from cluster.rendezvous import DEVICES
from model.config import ModelConfig
from router.layout import RankLayout, plan_layout
from router.placement import Placement
from router.rebalancing import RebalanceConfig

STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


@dataclass(frozen=True)
class ClusterConfig:
    num_attention_workers: int = 1
    num_expert_workers: int = 1
    redundant_slots_per_worker: int = 0
    device: str = "cpu"
    placement_strategy: str = "PACK"
    cpus_per_worker: float | None = None  # None: share the node's CPUs among the workers
    # load statistics are always collected; enabled=False keeps the static placement
    rebalance: RebalanceConfig = field(default_factory=lambda: RebalanceConfig(enabled=False))
    # vision-encoder actors (one device each); 0: each attention worker encodes its own requests
    num_vision_workers: int = 0

    def __post_init__(self) -> None:
        if self.num_attention_workers < 1:
            raise ValueError(f"attention workers must be >= 1, got {self.num_attention_workers}")
        if self.num_expert_workers < 1:
            raise ValueError(f"expert workers must be >= 1, got {self.num_expert_workers}")
        if self.redundant_slots_per_worker < 0:
            raise ValueError(
                f"redundant slots per worker must be >= 0, got {self.redundant_slots_per_worker}"
            )
        if self.device not in DEVICES:
            raise ValueError(f"unknown device {self.device!r} (allowed: {', '.join(DEVICES)})")
        if self.placement_strategy not in STRATEGIES:
            raise ValueError(
                f"unknown placement strategy {self.placement_strategy!r} (allowed: {', '.join(STRATEGIES)})"
            )
        if self.num_vision_workers < 0:
            raise ValueError(f"vision workers must be >= 0, got {self.num_vision_workers}")
        if self.cpus_per_worker is not None and self.cpus_per_worker <= 0:
            raise ValueError(f"cpus per worker must be > 0, got {self.cpus_per_worker}")

    @property
    def num_workers(self) -> int:
        """Every actor with a bundle of its own: attention ranks, expert workers, vision workers."""
        return self.num_attention_workers + self.num_expert_workers + self.num_vision_workers

    def plan(self, model: ModelConfig) -> tuple[RankLayout, Placement]:
        """The world's rank layout and the initial placement map for this model."""
        return plan_layout(
            len(model.moe_layers),
            model.num_local_experts,
            self.num_attention_workers,
            self.num_expert_workers,
            self.redundant_slots_per_worker,
        )
