"""The router service: load statistics over a sliding window, and when to re-plan the placement.

The attention workers count tokens per logical expert and per physical slot each step; the
engine forwards those counts here in batches (no collective, no Ray call per step). On an
interval, or sooner when the measured imbalance crosses a threshold, the service runs the
placement policy (`router.placement.rebalance`) and hands out a new versioned map.

A sliding window weighs every step in it the same, so when the hot experts change it would plan
on a mix of the old and the new load until the old steps had left it. Before each re-plan the
service therefore asks whether the newest steps' expert shares differ from the rest of the
window by more than sampling noise explains (`find_shift`); if they do, the steps before the
change leave the window and the service plans at once on the steps after it.
This module is plain Python; the engine runs it as a Ray actor.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Hashable, Sequence
from typing import NamedTuple

import torch

from router.balance import balance_figures, measured_worker_load
from router.nodes import spread_over_nodes
from router.placement import Placement, rebalance
from router.rebalancing import RebalanceConfig

_SQRT_2_OVER_PI = math.sqrt(2 / math.pi)


def shift_score(recent: torch.Tensor, older: torch.Tensor) -> torch.Tensor:
    """How far apart the shapes of two loads are, in units of sampling noise.

    recent, older: tokens per expert float [..., L, E] -> float64 [...]: the total variation
    distance between their expert shares, summed over layers, over the distance that two samples
    of the same sizes from one distribution (the pooled shares) are apart on average. About 1 (or
    less) for two stretches of one load; layers where either side has no tokens count for nothing,
    and a score with no such layer left is 0."""
    recent, older = recent.double(), older.double()
    n_recent, n_older = recent.sum(-1, keepdim=True), older.sum(-1, keepdim=True)
    live = ((n_recent > 0) & (n_older > 0)).squeeze(-1)  # [..., L]
    n_recent, n_older = n_recent.clamp(min=1), n_older.clamp(min=1)
    distance = 0.5 * (recent / n_recent - older / n_older).abs().sum(-1)
    pooled = (recent + older) / (n_recent + n_older)
    # E|X / n_r - Y / n_o| for X ~ Bin(n_r, p), Y ~ Bin(n_o, p): about sqrt(2 / pi) times its
    # standard deviation where counts are large, and never more than 2p where they are small
    spread = _SQRT_2_OVER_PI * (pooled * (1 - pooled) * (1 / n_recent + 1 / n_older)).sqrt()
    noise = 0.5 * torch.minimum(spread, 2 * pooled).sum(-1)
    noise_total = torch.where(live, noise, 0.0).sum(-1)
    distance_total = torch.where(live, distance, 0.0).sum(-1)
    return torch.where(noise_total > 0, distance_total / noise_total.clamp(min=1e-300), 0.0)


class LoadShift(NamedTuple):
    score: float  # the newest steps against the rest of the window (`shift_score`); 0: too few steps
    num_new_steps: int | None  # steps since the change of the load's shape; None: no change


def find_shift(expert_steps: torch.Tensor, recent_steps: int, threshold: float) -> LoadShift:
    """Whether the load's shape changed lately, and how many steps ago.

    expert_steps: tokens per expert per step, float [T, L, E], oldest first. The score is the
    newest `recent_steps` steps' against the steps before them (0 with fewer than
    2 * recent_steps steps). Above `threshold` the load changed, and `num_new_steps` is the j
    whose newest j steps score highest against the rest, among those that leave at least
    `recent_steps` steps before them: a load that changed k steps ago scores highest at j = k
    (fewer steps are noisier, more mix the old load in)."""
    if recent_steps < 1:
        raise ValueError(f"recent_steps must be >= 1, got {recent_steps}")
    num_steps = expert_steps.shape[0]
    if num_steps < 2 * recent_steps:
        return LoadShift(0.0, None)
    steps = expert_steps.double()
    newest = steps.flip(0)[: num_steps - recent_steps].cumsum(0)  # [j - 1]: the newest j steps
    scores = shift_score(newest, steps.sum(0) - newest)
    score = float(scores[recent_steps - 1])
    return LoadShift(score, int(scores.argmax()) + 1 if score > threshold else None)


class LoadWindow:
    """Sums of the last `window_steps` steps of expert_load [L, E] and slot_load [L, P]."""

    def __init__(self, window_steps: int) -> None:
        self._steps: deque[tuple[torch.Tensor, torch.Tensor]] = deque(maxlen=window_steps)

    def add(self, expert_load: torch.Tensor, slot_load: torch.Tensor) -> None:
        self._steps.append((expert_load, slot_load))

    def keep_newest(self, num_steps: int) -> None:
        """Forget all but the newest `num_steps` steps (the load changed before them)."""
        if num_steps < 0:
            raise ValueError(f"num_steps must be >= 0, got {num_steps}")
        drop = max(0, len(self._steps) - num_steps)
        self._steps = deque(list(self._steps)[drop:], maxlen=self._steps.maxlen)

    def clear_slots(self) -> None:
        """Slot counts describe one placement; after a switch only new steps count."""
        self._steps = deque(((e, torch.zeros_like(s)) for e, s in self._steps), maxlen=self._steps.maxlen)

    @property
    def num_steps(self) -> int:
        return len(self._steps)

    def expert_steps(self) -> torch.Tensor:
        """expert_load of every step in the window, oldest first: [T, L, E]."""
        return torch.stack([e for e, _ in self._steps])

    def expert_load(self) -> torch.Tensor:
        return self.expert_steps().sum(0)

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
        self.load_shifts = 0  # times the window forgot the steps before a change of the load
        self.load_shift_score = 0.0  # the last test's (`find_shift`): about 1 while the load holds
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
        shifted = self._forget_before_shift()
        due = shifted or step_id - self.last_plan_step >= self.cfg.interval_steps
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

    def _forget_before_shift(self) -> bool:
        """If the load's shape changed lately, drop the steps before the change; True if it did."""
        if self.cfg.shift_threshold is None:
            return False
        shift = find_shift(self.window.expert_steps(), self.cfg.shift_steps, self.cfg.shift_threshold)
        self.load_shift_score = shift.score
        if shift.num_new_steps is None:
            return False
        self.window.keep_newest(shift.num_new_steps)
        self.load_shifts += 1
        return True

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
            "load_shifts": self.load_shifts,
            "load_shift_score": self.load_shift_score,
            "rearrangement_seconds": list(self.rearrangement_seconds),
            "replicas_per_expert": p.logcnt.tolist(),
            "window_steps": self.window.num_steps,
        }
        if self.window.num_steps:
            figures.update(balance_figures(measured_worker_load(self.window.slot_load(), p.slots_per_worker)))
        return figures
