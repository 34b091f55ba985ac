"""The rebalancing state machine (`router.rebalancing`) driven with Ray calls, never blocking a step.

Load counts from the attention workers' step results are batched to the router service actor;
plan requests go to it asynchronously; staging runs on each expert worker's control thread while
the step loop keeps serving the old map; the switch rides on the next step's header.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import ray
import torch
from ray.exceptions import RayError

from router.placement import Placement
from router.rebalancing import RebalanceConfig, Rebalancing
from router.service import RouterService

log = logging.getLogger(__name__)


class Rebalancer:
    def __init__(
        self, placement: Placement, cfg: RebalanceConfig, experts: list, node_of_worker: list | None = None
    ) -> None:
        self.machine = Rebalancing(cfg, placement)
        self.experts = experts
        self.service = ray.remote(RouterService).options(num_cpus=0).remote(placement, cfg, node_of_worker)
        self._expert_loads: list[torch.Tensor] = []
        self._slot_loads: list[torch.Tensor] = []
        self._plan_ref: ray.ObjectRef | None = None
        self._stage_refs: list[ray.ObjectRef] = []
        self._metrics_ref: ray.ObjectRef | None = None
        self._unasked = False  # the service's figures changed (a report, a commit) since the last ask
        self.stage_seconds: list[float] = []
        self.latest_metrics: dict = {}
        self.tokens_per_worker = torch.zeros(placement.num_workers, dtype=torch.long)
        self._expert_total = torch.zeros(placement.num_layers, placement.num_experts, dtype=torch.long)

    @property
    def cfg(self) -> RebalanceConfig:
        return self.machine.cfg

    @cfg.setter
    def cfg(self, cfg: RebalanceConfig) -> None:
        self.machine.cfg = cfg

    @property
    def placement(self) -> Placement:
        return self.machine.placement

    @property
    def busy(self) -> bool:
        return self.machine.busy

    def after_step(self, step_id: int, results: Sequence) -> None:
        """Sum the ranks' counts; report (and ask for a plan) when the machine says so."""
        loads = [r for r in results if r.expert_load is not None]
        if loads:
            slot_load = torch.stack([r.slot_load for r in loads]).sum(0)
            expert_load = torch.stack([r.expert_load for r in loads]).sum(0)
            self._expert_loads.append(expert_load)
            self._expert_total += expert_load
            self._slot_loads.append(slot_load)
            s = self.placement.slots_per_worker
            self.tokens_per_worker += slot_load.view(slot_load.shape[0], -1, s).sum((0, 2))
        action = self.machine.after_step()
        if not action.report:
            return
        self.service.record.remote(self._expert_loads, self._slot_loads)
        self._expert_loads, self._slot_loads = [], []
        if action.ask_plan:
            self._plan_ref = self.service.maybe_replan.remote(step_id)
        self._refresh_metrics()

    def before_step(self) -> Placement | None:
        """The map to switch to at this step, if staging has finished; otherwise None."""
        self._poll_plan(timeout=0)
        if not self._stage_refs:
            return None
        ready, _ = ray.wait(self._stage_refs, num_returns=len(self._stage_refs), timeout=0)
        if len(ready) < len(self._stage_refs):
            return None
        self.stage_seconds.append(max(ray.get(self._stage_refs)))
        self._stage_refs = []
        new = self.machine.staged()
        self.service.commit.remote(new)
        self._unasked = True
        return new

    def wait(self, timeout_s: float = 60.0) -> None:
        """Block until the plan asked for has come back and any staging it started has finished,
        so the next step switches (tests and benchmarks that need rearrangements at known steps;
        serving never waits)."""
        self._poll_plan(timeout=timeout_s)
        if self._stage_refs:
            ray.wait(self._stage_refs, num_returns=len(self._stage_refs), timeout=timeout_s)

    def _poll_plan(self, timeout: float) -> None:
        """Take the service's plan if it has come back (within `timeout`) and start staging it."""
        if self._plan_ref is None or not ray.wait([self._plan_ref], timeout=timeout)[0]:
            return
        changes = self.machine.planned(ray.get(self._plan_ref))
        self._plan_ref = None
        if changes is not None:
            version = self.machine.staging.version
            self._stage_refs = [
                w.stage.remote(version, c) for w, c in zip(self.experts, changes, strict=True)
            ]

    def reset(self, placement: Placement, experts: list, node_of_worker: list | None = None) -> None:
        """After a change of members: a plan or staging in flight is void, the window restarts."""
        self.machine = Rebalancing(self.machine.cfg, placement)
        self.experts = experts
        self._plan_ref, self._stage_refs, self._metrics_ref = None, [], None
        self._unasked = True
        self._expert_loads, self._slot_loads = [], []
        self.tokens_per_worker = torch.zeros(placement.num_workers, dtype=torch.long)
        self.service.reset.remote(placement, node_of_worker)

    def expert_load(self) -> torch.Tensor | None:
        """Tokens per logical expert [L, E] since the engine started (or None before any step):
        what a re-plan after a failure weighs, known here without a call to the service."""
        return self._expert_total.double() if bool(self._expert_total.any()) else None

    def _refresh_metrics(self) -> None:
        """After a report the figures the service last sent are behind: ask again (once the last
        ask has been answered; `current_metrics` takes the answer)."""
        self._unasked = True
        self.current_metrics()

    def current_metrics(self) -> dict:
        """The newest figures the service has sent, never waiting. It takes an answer that came in
        since the last step, and asks again if the service's state changed after that question
        (a report, a commit). So an engine gone idle shows the figures of its last step within a
        read or two, not those of a report from before its last burst of steps."""
        ref = self._metrics_ref  # after_step may swap it meanwhile: either answer is a whole dict
        if ref is not None:
            if not ray.wait([ref], timeout=0)[0]:
                return self.latest_metrics
            self._metrics_ref = None
            try:
                self.latest_metrics = ray.get(ref)
            except RayError as e:  # a gauge read must not fail the caller: keep the last figures
                log.warning("the router service did not answer for its figures: %s", str(e).splitlines()[0])
        if self._unasked:
            self._metrics_ref, self._unasked = self.service.metrics.remote(), False
        return self.latest_metrics

    def metrics(self) -> dict:
        figures = ray.get(self.service.metrics.remote())
        figures["stage_seconds"] = list(self.stage_seconds)
        return figures
