"""Cluster shape as pure functions: worker counts, slots, placement-group bundles."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from cluster.config import ModelConfig
from cluster.rendezvous import DEVICES
from router.dispatcher import Topology
from router.placement import Placement, static_placement
from router.service import RebalanceConfig

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
        if self.cpus_per_worker is not None and self.cpus_per_worker <= 0:
            raise ValueError(f"cpus per worker must be > 0, got {self.cpus_per_worker}")

    @property
    def num_workers(self) -> int:
        return self.num_attention_workers + self.num_expert_workers


def plan_topology(model: ModelConfig, cluster: ClusterConfig) -> tuple[Topology, Placement]:
    """Slots per worker and the initial (even, one replica each) placement map."""
    experts, workers = model.num_local_experts, cluster.num_expert_workers
    if workers > experts:
        raise ValueError(f"{workers} expert workers for {experts} experts: at most one worker per expert")
    if not model.moe_layers:
        raise ValueError("the model has no MoE layers; expert workers have nothing to hold")
    slots = math.ceil(experts / workers) + cluster.redundant_slots_per_worker
    topology = Topology(cluster.num_attention_workers, workers, slots)
    return topology, static_placement(len(model.moe_layers), experts, workers, slots)


def bundles(cluster: ClusterConfig, cpus_available: float, gpus_available: float) -> list[dict[str, float]]:
    """One placement-group bundle per worker: a GPU each on GPUs, else a share of the CPUs.

    Fixed sizes (GPUs, or `cpus_per_worker` given) do not depend on what the cluster holds right
    now: on an autoscaling cluster the placement group waits while nodes are added. Only the
    CPU share of a fixed-size cluster is derived from (and checked against) what is there."""
    n = cluster.num_workers
    if cluster.device == "cuda":
        return [{"GPU": 1.0, "CPU": 1.0} for _ in range(n)]
    if cluster.cpus_per_worker is not None:
        return [{"CPU": cluster.cpus_per_worker} for _ in range(n)]
    share = max(0.01, min(1.0, math.floor(cpus_available / n * 100) / 100))
    if share * n > cpus_available + 1e-9:
        raise ValueError(f"{n} workers x {share:g} CPUs exceed the cluster's {cpus_available:g} CPUs")
    return [{"CPU": share} for _ in range(n)]
