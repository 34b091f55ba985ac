"""Tiers that resize during a simulated run, as the cluster engine's live resize does
(`cluster/resize.py`), on the simulated clock.

    sim = ElasticCluster(cfg, ResizeCosts())
    sim.resize(num_attention=6, num_expert=16)   # returns at once; steps go on
    sim.step()                                   # the switch lands between two steps, once ready

A resize prepares while the old members keep stepping. New workers start (`worker_start_s`) and
load their weights over `load_bandwidth`: a new attention rank its non-expert weights, a new
expert worker its slots of the grown map (`router.recovery.grow`: the workers there keep every
slot). Before expert workers leave, the staying ones stage what only the leaving ones held
(`router.recovery.shrink`) over the hardware's staging bandwidth, as a rearrangement does. A
leaving attention rank drains: it takes no new requests and finishes its own. The switch swaps
the ranks, the map and the cost model between two steps; no request is lost or recomputed.

Workers are held (a GPU each) from the resize request for the ones that come, and up to the
switch for the ones that go: `held` records the count over time, for worker-seconds.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from engine.data_parallel import least_loaded_rank
from engine.scheduler import Scheduler
from router.placement import Placement
from router.rebalancing import Rebalancing
from router.recovery import grow, shrink, survivor_changes
from sim.cluster import SimCluster, SimConfig, _KVCache
from sim.costmodel import GB, CostModel, memory_plan


@dataclass(frozen=True)
class ResizeCosts:
    """What a new worker costs before it serves (assumptions, see docs/simulator.md)."""

    worker_start_s: float = 10.0  # a process on a fresh GPU: CUDA context, joining the collectives
    load_bandwidth: float = 5 * GB  # bytes/s a new worker reads its weights at (storage or network)

    def __post_init__(self) -> None:
        if self.worker_start_s < 0 or self.load_bandwidth <= 0:
            raise ValueError(f"need worker_start_s >= 0 and load_bandwidth > 0, got {self}")


@dataclass(frozen=True)
class Resize:
    """One resize: asked at `requested_s`, serving at `switched_s`."""

    requested_s: float
    switched_s: float
    before: tuple[int, int]  # (attention ranks, expert workers)
    after: tuple[int, int]


@dataclass
class _Pending:
    num_attention: int
    num_expert: int
    requested_s: float
    ready_s: float  # new workers loaded, stagings done (leaving ranks may still drain)
    placement: Placement | None  # the new expert map (None: the expert tier stays)
    survivors: list[int | None]  # per new expert worker: its old index, None for a new one


class ElasticCluster(SimCluster):
    """A `SimCluster` whose attention ranks and expert workers change during the run."""

    def __init__(self, cfg: SimConfig, costs: ResizeCosts | None = None) -> None:
        super().__init__(cfg)
        self.costs = costs or ResizeCosts()
        self.pending: _Pending | None = None
        self.resizes: list[Resize] = []
        self.rows_computed_gone = np.zeros(len(self.shape.moe_layers), dtype=np.int64)  # removed workers'
        self.held: list[tuple[float, int]] = [(0.0, cfg.num_attention + cfg.num_expert_workers)]

    @property
    def sizes(self) -> tuple[int, int]:
        return self.cfg.num_attention, self.cfg.num_expert_workers

    @property
    def resizing(self) -> bool:
        return self.pending is not None

    # -- asking -----------------------------------------------------------------------------

    def resize(self, num_attention: int, num_expert: int) -> None:
        """Start a resize to these sizes (ValueError for a bad size or one in flight)."""
        if self.pending is not None:
            raise ValueError("a resize is in flight; ask again once it switched")
        if num_attention < 1 or not 1 <= num_expert <= self.shape.num_experts:
            raise ValueError(
                f"need 1 <= attention ranks and 1 <= expert workers <= {self.shape.num_experts} experts, "
                f"got {num_attention} and {num_expert}"
            )
        if (num_attention, num_expert) == self.sizes:
            return
        placement, survivors, expert_s = self._expert_plan(num_expert)
        attention_s = 0.0
        if num_attention > self.cfg.num_attention:
            attention_bytes = self.shape.non_expert_params * self.cfg.precision.weight_bytes
            attention_s = self.costs.worker_start_s + attention_bytes / self.costs.load_bandwidth
        ready = self.now + max(attention_s, expert_s)
        self.pending = _Pending(num_attention, num_expert, self.now, ready, placement, survivors)
        if self._staging is not None or self.rebalancing.busy:  # the resize's map replaces any plan
            self._staging = None
            self.rebalancing = Rebalancing(self.cfg.rebalance, self.placement)
        m, w = self.sizes
        self.held.append((self.now, max(m, num_attention) + max(w, num_expert)))

    def _expert_plan(self, num_expert: int) -> tuple[Placement | None, list[int | None], float]:
        """The new map, the old index of each new worker, and the seconds until it is loaded."""
        old, w = self.placement, self.cfg.num_expert_workers
        load = torch.from_numpy(self.router.shares)  # what the routers draw from (the engine: its window)
        slot_bytes = len(self.shape.moe_layers) * self.shape.expert_params * self.cfg.precision.weight_bytes
        if num_expert == w:
            return None, list(range(w)), 0.0
        if num_expert > w:
            new = grow(old, num_expert - w, load)
            load_s = new.slots_per_worker * slot_bytes / self.costs.load_bandwidth
            return new, [*range(w), *([None] * (num_expert - w))], self.costs.worker_start_s + load_s
        hw = self.cfg.hardware
        max_slots = int(hw.mem_bytes * hw.mem_utilization // slot_bytes)
        new, survivors = shrink(old, range(num_expert, w), load, max_slots_per_worker=max_slots)
        changes = survivor_changes(old, new, survivors)
        changed = np.array([sum(len(slots) for slots in c.values()) for c in changes])
        return new, list(survivors), self.cost.stage_seconds(changed)

    # -- the switch -------------------------------------------------------------------------

    def _pick_rank(self) -> int:
        """A draining rank takes no new requests."""
        accepting = self.cfg.num_attention
        if self.pending is not None:
            accepting = min(accepting, self.pending.num_attention)
        return least_loaded_rank(self._unfinished[:accepting])

    def _before_step(self) -> None:
        super()._before_step()
        self.maybe_switch()

    def _plan(self) -> None:
        if self.pending is not None:  # no rearrangement while a resize prepares (as the engine)
            self.rebalancing.planned(None)
            return
        super()._plan()

    def maybe_switch(self) -> bool:
        """Switch to the pending sizes if everything is ready and the leaving ranks are empty."""
        p = self.pending
        if p is None or self.now < p.ready_s or any(self._unfinished[p.num_attention :]):
            return False
        before = self.sizes
        cfg = replace(self.cfg, num_attention=p.num_attention, num_expert_workers=p.num_expert)
        self._switch_attention(cfg)
        if p.placement is not None:
            self._switch_experts(cfg, p.placement, p.survivors)
        self.cfg = cfg
        m, w = cfg.num_attention, cfg.num_expert_workers
        self.cost = CostModel(self.shape, cfg.hardware, cfg.precision, m, w, self.slots_per_worker)
        self.pending = None
        self.resizes.append(Resize(p.requested_s, self.now, before, self.sizes))
        self.held.append((self.now, cfg.num_attention + cfg.num_expert_workers))
        return True

    def _switch_attention(self, cfg: SimConfig) -> None:
        plan = memory_plan(self.shape, cfg.hardware, cfg.precision, self.slots_per_worker, cfg.block_size)
        chunked = list(self.shape.chunked)
        while len(self.schedulers) < cfg.num_attention:
            chunk = cfg.model.attention_chunk_size
            kv = _KVCache(self.num_kv_blocks, cfg.block_size, chunked, chunk, plan.kv_block_bytes)
            self.schedulers.append(Scheduler(cfg.scheduler, kv))
            self._unfinished.append(0)
        del self.schedulers[cfg.num_attention :]  # drained: nothing of theirs is left
        del self._unfinished[cfg.num_attention :]

    def _switch_experts(self, cfg: SimConfig, new: Placement, survivors: list[int | None]) -> None:
        old_rows = self.rows_computed
        rows = np.zeros((old_rows.shape[0], new.num_workers), dtype=np.int64)
        for j, x in enumerate(survivors):
            if x is not None:
                rows[:, j] = old_rows[:, x]
        gone = sorted(set(range(old_rows.shape[1])) - {x for x in survivors if x is not None})
        self.rows_computed_gone += old_rows[:, gone].sum(axis=1)
        self.rows_computed = rows
        self.slots_per_worker = new.slots_per_worker
        self.rebalancing = Rebalancing(cfg.rebalance, new)
        self.service.reset(new)
        self._loads = ([], [])

    # -- accounting -------------------------------------------------------------------------

    def worker_seconds(self, end_s: float) -> float:
        """Workers held x time from 0 to `end_s` (a GPU each)."""
        points = [*self.held, (end_s, 0)]
        spans = zip(points[:-1], points[1:], strict=True)
        return float(sum(n * max(0.0, min(t1, end_s) - t0) for (t0, n), (t1, _) in spans))

    def kv_usage_busiest(self) -> float:
        """The busiest rank's fraction of KV blocks in use (what the engine's autoscaler reads)."""
        return max(s.kv.usage().blocks_used for s in self.schedulers) / self.num_kv_blocks
