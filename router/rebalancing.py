"""Rearranging expert replicas while serving, as a pure state machine: when to report load, when
to ask for a plan, what to stage and when to switch. No I/O and no clock.

    collecting --(report step, re-planning on)--> planning --(a plan that moves slots)--> staging
        ^                                            |                                     |
        +------------------(nothing to move)---------+                                     |
        +------------------(every worker staged: switch between two steps)-----------------+

The cluster engine drives it with Ray calls (`cluster.rebalancer`): plans come from the router
service actor and staging runs on the expert workers' control thread, so no step waits. The
simulator drives the same machine with a simulated clock (`sim.cluster`).
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

from router.placement import Placement


@dataclass(frozen=True)
class RebalanceConfig:
    enabled: bool = True  # False: load is still measured and reported, the map never changes
    window_steps: int = 64  # steps of load the policy sees
    interval_steps: int = 32  # re-plan at most this often
    imbalance_threshold: float = 0.25  # re-plan early when (max - mean) / mean exceeds this
    min_gain: float = 0.05  # keep a layer's map unless the busiest worker gets this much lighter
    report_every: int = 8  # steps between the engine's load reports
    # A change of the hot experts: before each re-plan the newest `shift_steps` steps' expert
    # shares are compared with the rest of the window; a difference above `shift_threshold` times
    # what sampling noise gives (`router.service.shift_score`) drops the steps before the change
    # and re-plans at once. Needs window_steps >= 2 * shift_steps; None turns it off.
    shift_steps: int = 8
    shift_threshold: float | None = 3.0

    def __post_init__(self) -> None:
        for name in ("window_steps", "interval_steps", "report_every", "shift_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"rebalance {name} must be >= 1, got {getattr(self, name)}")
        if self.imbalance_threshold < 0 or self.min_gain < 0:
            raise ValueError("rebalance imbalance_threshold and min_gain must be >= 0")
        if self.shift_threshold is not None and not (
            math.isfinite(self.shift_threshold) and self.shift_threshold > 0
        ):
            raise ValueError(
                f"rebalance shift_threshold must be a number > 0 or None, got {self.shift_threshold}"
            )


class Phase(enum.Enum):
    COLLECTING = "collecting"
    PLANNING = "planning"  # a plan was asked for and has not come back
    STAGING = "staging"  # the workers load the new map's changed slots


@dataclass(frozen=True)
class AfterStep:
    report: bool  # hand the load collected since the last report to the router service
    ask_plan: bool  # ask the router service for a plan (after the report)


def slot_changes(old: Placement, new: Placement) -> list[dict[int, dict[int, int]]]:
    """Per expert worker: moe layer -> {local slot: new logical expert} for slots that change."""
    s = new.slots_per_worker
    changes: list[dict[int, dict[int, int]]] = [{} for _ in range(new.num_workers)]
    for layer, slot in (old.phy2log != new.phy2log).nonzero().tolist():
        changes[slot // s].setdefault(layer, {})[slot % s] = int(new.phy2log[layer, slot])
    return changes


class Rebalancing:
    """The state machine. `placement` is the map steps use now; `staging` the one being loaded."""

    def __init__(self, cfg: RebalanceConfig, placement: Placement) -> None:
        self.cfg = cfg
        self.placement = placement
        self.phase = Phase.COLLECTING
        self.staging: Placement | None = None
        self._steps_since_report = 0

    @property
    def busy(self) -> bool:
        """A plan is being made or staged."""
        return self.phase is not Phase.COLLECTING

    def after_step(self) -> AfterStep:
        """Call once per step, after it ran."""
        self._steps_since_report += 1
        if self._steps_since_report < self.cfg.report_every:
            return AfterStep(report=False, ask_plan=False)
        self._steps_since_report = 0
        ask = self.cfg.enabled and self.phase is Phase.COLLECTING
        if ask:
            self.phase = Phase.PLANNING
        return AfterStep(report=True, ask_plan=ask)

    def planned(self, new: Placement | None) -> list[dict[int, dict[int, int]]] | None:
        """The service's answer to the plan asked for: None (nothing worth moving) goes back to
        collecting; a new map starts staging, and the changes per worker are what to stage."""
        if self.phase is not Phase.PLANNING:
            raise RuntimeError(f"a plan arrived while {self.phase.value}, not planning")
        if new is None:
            self.phase = Phase.COLLECTING
            return None
        self.staging, self.phase = new, Phase.STAGING
        return slot_changes(self.placement, new)

    def staged(self) -> Placement:
        """Every worker has staged: the map the next step uses (the switch)."""
        if self.phase is not Phase.STAGING or self.staging is None:
            raise RuntimeError(f"nothing is staging (the rebalancer is {self.phase.value})")
        self.placement, self.staging, self.phase = self.staging, None, Phase.COLLECTING
        return self.placement
