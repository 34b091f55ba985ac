"""What one cluster engine is made of: worker counts, device, slots and placement strategy."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from cluster.rendezvous import DEVICES
from model.config import ModelConfig
from router.layout import RankLayout, plan_layout
from router.placement import Placement
from router.rebalancing import RebalanceConfig
from router.transport import resolve_transport

STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


@dataclass(frozen=True)
class FaultTolerance:
    """How the engine notices a lost or stalled worker, and how hard it tries to recover.

    A dead worker (process or node gone) is noticed at once: its peers' collectives fail as its
    sockets close, and Ray reports the actor's death. A stalled one is noticed by the driver: a
    step running longer than `stall_check_s` makes it ping every worker on its control thread;
    one that does not answer within `ping_timeout_s` is killed and handled as lost. Collectives
    time out after `collective_timeout_s` whatever happens (the step-scoped backstop)."""

    collective_timeout_s: float = 30.0
    stall_check_s: float = 1.5  # a step this long makes the driver ping (a ping costs little)
    ping_timeout_s: float = 3.0  # a worker this late to answer is hung (killing it costs a recovery)
    max_recoveries_per_step: int = 3  # a step that keeps failing with every worker alive is a bug
    max_slots_per_worker: int | None = None  # None: survivors may grow to hold every expert

    def __post_init__(self) -> None:
        for name in ("collective_timeout_s", "stall_check_s", "ping_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.max_recoveries_per_step < 1:
            raise ValueError(f"max_recoveries_per_step must be >= 1, got {self.max_recoveries_per_step}")
        if self.max_slots_per_worker is not None and self.max_slots_per_worker < 1:
            raise ValueError(f"max_slots_per_worker must be >= 1 or None, got {self.max_slots_per_worker}")


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
    faults: FaultTolerance = field(default_factory=FaultTolerance)
    # vision-encoder actors (one device each); 0: each attention worker encodes its own requests
    num_vision_workers: int = 0
    # how the dispatcher's rows travel (router.transport): "auto" is sockets on CPUs, NCCL on GPUs;
    # "collective" is torch.distributed's backend on either (gloo on CPUs)
    transport: str = "auto"

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
        resolve_transport(self.transport, torch.device(self.device))  # raises for a bad one
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
