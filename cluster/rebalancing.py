"""Rearranging expert replicas while the cluster keeps serving (the engine-side orchestration).

States, advanced once per step and never blocking a step:
1. collect: per-step load counts from the attention workers go to the router service in batches;
   a plan request is in flight at most once at a time.
2. stage: a new map arrived; each expert worker loads the weights of its changed slots into
   staging on its second thread while the step loop keeps serving the old map.
3. switch: all workers staged; the next step carries the new map to the attention workers and
   its header carries the new version, at which the expert workers swap the staged slots in
   (pointer swaps) before serving. Retired weights are dropped after the swap.
"""

from __future__ import annotations

import ray
import torch

from router.placement import Placement
from router.service import RebalanceConfig, RouterService


def slot_changes(old: Placement, new: Placement) -> list[dict[int, dict[int, int]]]:
    """Per expert worker: moe layer -> {local slot: new logical expert} for slots that change."""
    s = new.slots_per_worker
    changes: list[dict[int, dict[int, int]]] = [{} for _ in range(new.num_workers)]
    diff = (old.phy2log != new.phy2log).nonzero().tolist()
    for layer, slot in diff:
        changes[slot // s].setdefault(layer, {})[slot % s] = int(new.phy2log[layer, slot])
    return changes


class Rebalancer:
    def __init__(self, placement: Placement, cfg: RebalanceConfig, experts: list) -> None:
        self.cfg = cfg
        self.experts = experts
        self.placement = placement
        self.service = ray.remote(RouterService).options(num_cpus=0).remote(placement, cfg)
        self._expert_loads: list = []
        self._slot_loads: list = []
        self._plan_ref: ray.ObjectRef | None = None
        self._staging: tuple[Placement, list[ray.ObjectRef]] | None = None
        self._metrics_ref: ray.ObjectRef | None = None
        self.stage_seconds: list[float] = []
        self.latest_metrics: dict = {}
        self.tokens_per_worker = torch.zeros(placement.num_workers, dtype=torch.long)

    def after_step(self, step_id: int, results: list) -> None:
        """Sum the ranks' counts; report and ask for a plan every `report_every` steps."""
        loads = [r for r in results if r.expert_load is not None]
        if loads:
            slot_load = torch.tensor([r.slot_load for r in loads]).sum(0)
            self._expert_loads.append(torch.tensor([r.expert_load for r in loads]).sum(0).tolist())
            self._slot_loads.append(slot_load.tolist())
            s = self.placement.slots_per_worker
            self.tokens_per_worker += slot_load.view(slot_load.shape[0], -1, s).sum((0, 2))
        if len(self._expert_loads) >= self.cfg.report_every:
            self.service.record.remote(self._expert_loads, self._slot_loads)
            self._expert_loads, self._slot_loads = [], []
            if self.cfg.enabled and self._plan_ref is None and self._staging is None:
                self._plan_ref = self.service.maybe_replan.remote(step_id)
            self._refresh_metrics()

    def _refresh_metrics(self) -> None:
        """Keep `latest_metrics` fresh without ever waiting on the service."""
        if self._metrics_ref is not None:
            ready, _ = ray.wait([self._metrics_ref], timeout=0)
            if not ready:
                return
            self.latest_metrics = ray.get(self._metrics_ref)
        self._metrics_ref = self.service.metrics.remote()

    def before_step(self) -> Placement | None:
        """The map to switch to at this step, if staging has finished; otherwise None."""
        self._poll_plan()
        if self._staging is None:
            return None
        new, refs = self._staging
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        if len(ready) < len(refs):
            return None
        self.stage_seconds.append(max(ray.get(refs)))
        self._staging = None
        self.placement = new
        self.service.commit.remote(new)
        return new

    def _poll_plan(self) -> None:
        if self._plan_ref is None:
            return
        ready, _ = ray.wait([self._plan_ref], timeout=0)
        if not ready:
            return
        new = ray.get(self._plan_ref)
        self._plan_ref = None
        if new is not None:
            self.start(new)

    def start(self, new: Placement) -> None:
        """Stage `new` on every expert worker (workers without changes stage nothing, quickly)."""
        changes = slot_changes(self.placement, new)
        refs = [w.stage.remote(new.version, c) for w, c in zip(self.experts, changes, strict=True)]
        self._staging = (new, refs)

    @property
    def busy(self) -> bool:
        return self._staging is not None or self._plan_ref is not None

    def metrics(self) -> dict:
        figures = ray.get(self.service.metrics.remote())
        figures["stage_seconds"] = list(self.stage_seconds)
        return figures
