"""The router service: load statistics over a sliding window, and when to re-plan the placement.

The attention workers count tokens per logical expert and per physical slot each step; the
engine forwards those counts here in batches (no collective, no Ray call per step). On an
interval, or sooner when the measured imbalance crosses a threshold, the service runs the
placement policy (`router.placement.rebalance`) and hands out a new versioned map.
This module is plain Python; the engine runs it as a Ray actor.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Hashable, Sequence

import torch

from router.balance import balance_figures, measured_worker_load
from router.nodes import spread_over_nodes
from router.placement import Placement, rebalance
from router.rebalancing import RebalanceConfig


class LoadWindow:
    """Sums of the last `window_steps` steps of expert_load [L, E] and slot_load [L, P]."""

    def __init__(self, window_steps: int) -> None:
        self._steps: deque[tuple[torch.Tensor, torch.Tensor]] = deque(maxlen=window_steps)

    def add(self, expert_load: torch.Tensor, slot_load: torch.Tensor) -> None:
        self._steps.append((expert_load, slot_load))

    def clear_slots(self) -> None:
        """Slot counts describe one placement; after a switch only new steps count."""
        self._steps = deque(((e, torch.zeros_like(s)) for e, s in self._steps), maxlen=self._steps.maxlen)

    @property
    def num_steps(self) -> int:
        return len(self._steps)

    def expert_load(self) -> torch.Tensor:
        return torch.stack([e for e, _ in self._steps]).sum(0)

    def slot_load(self) -> torch.Tensor:
        return torch.stack([s for _, s in self._steps]).sum(0)


class RouterService:
    def __init__(
        self, placement: Placement, cfg: RebalanceConfig, node_of_worker: Sequence[Hashable] | None = None
    ) -> None:
        """node_of_worker[w]: the Ray node of expert worker w; plans keep replicas of one expert on
        different nodes where they can (`router.nodes`)."""
        self.placement = placement
        self.cfg = cfg
        self.node_of_worker = node_of_worker
        self.window = LoadWindow(cfg.window_steps)
        self.last_plan_step = 0
        self.rearrangements = 0
        self.rearrangement_seconds: list[float] = []
        self._planned_at: float | None = None

    def record(self, expert_loads: Sequence[torch.Tensor], slot_loads: Sequence[torch.Tensor]) -> None:
        """A batch of per-step counts: expert_load int64 [L, E] and slot_load int64 [L, W*S] each."""
        for e, s in zip(expert_loads, slot_loads, strict=True):
            self.window.add(torch.as_tensor(e, dtype=torch.long), torch.as_tensor(s, dtype=torch.long))

    def maybe_replan(self, step_id: int) -> Placement | None:
        """A new placement when one is due and it changes something, else None."""
        if not self.cfg.enabled or self.window.num_steps == 0:
            return None
        due = step_id - self.last_plan_step >= self.cfg.interval_steps
        measured = balance_figures(
            measured_worker_load(self.window.slot_load(), self.placement.slots_per_worker)
        )
        if not due and measured["imbalance"] <= self.cfg.imbalance_threshold:
            return None
        self.last_plan_step = step_id
        new = rebalance(
            self.window.expert_load().double(),
            self.placement.num_workers,
            self.placement.slots_per_worker,
            previous=self.placement,
            min_gain=self.cfg.min_gain,
        )
        if new is self.placement:
            return None
        if self.node_of_worker is not None:
            new = spread_over_nodes(new, self.node_of_worker, self.window.expert_load())
        self._planned_at = time.perf_counter()
        return new

    def reset(self, placement: Placement, node_of_worker: Sequence[Hashable] | None = None) -> None:
        """A new map of another shape (workers were lost or added): the window starts over."""
        self.placement = placement
        self.node_of_worker = node_of_worker
        self.window = LoadWindow(self.cfg.window_steps)

    def commit(self, placement: Placement) -> float:
        """The engine switched to `placement`; returns seconds from plan to switch."""
        seconds = time.perf_counter() - self._planned_at if self._planned_at is not None else 0.0
        self.placement = placement
        self.rearrangements += 1
        self.rearrangement_seconds.append(seconds)
        self.window.clear_slots()
        return seconds

    def metrics(self) -> dict:
        p = self.placement
        figures = {
            "placement_version": p.version,
            "rearrangements": self.rearrangements,
            "rearrangement_seconds": list(self.rearrangement_seconds),
            "replicas_per_expert": p.logcnt.tolist(),
            "window_steps": self.window.num_steps,
        }
        if self.window.num_steps:
            figures.update(balance_figures(measured_worker_load(self.window.slot_load(), p.slots_per_worker)))
        return figures
