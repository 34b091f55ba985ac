"""Growing and shrinking a cluster engine's tiers while it serves: planned membership epochs.

    engine.resize(num_attention=2, num_expert=4)   # returns at once; steps go on

A resize prepares while the engine keeps stepping with the old members, and switches between two
steps once everything is ready:

1. reserve: bundles for new workers (a bundle a removed worker left in the engine's placement
   group first, else a placement group of one bundle per new worker: the part of a replica that
   grows and shrinks, which an autoscaling Ray cluster answers by adding nodes);
2. prepare: new workers load their weights (a new expert worker only its slots of the new map:
   `router.recovery.grow`, the old workers keep theirs); before expert workers leave, the ones
   that stay stage what only the leaving ones held (`router.recovery.shrink`); an attention
   worker that leaves first drains: it takes no new requests and finishes the ones it has (or,
   with `drain=False`, its requests are re-admitted elsewhere at the switch, recomputed);
3. switch: every member leaves the epoch, the new members join the next one, the leaving
   workers are killed and their bundles returned.

No request fails and no token changes: the map switches between steps, as a rearrangement does.
"""

from __future__ import annotations

import enum
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.membership import Command
from router.layout import RankLayout
from router.placement import Placement
from router.recovery import grow, shrink, survivor_changes

if TYPE_CHECKING:
    from cluster.engine import ClusterEngine

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Bundle:
    """Where a worker runs: a bundle of a placement group. `elastic`: a group of its own, made for
    this worker and removed with it."""

    group: PlacementGroup
    index: int
    spec: dict[str, float]
    elastic: bool = False

    def options(self) -> dict:
        strategy = PlacementGroupSchedulingStrategy(self.group, placement_group_bundle_index=self.index)
        # the work thread (the actor class has the control group too: `cluster.rendezvous.CONTROL`)
        return {
            "scheduling_strategy": strategy,
            "num_cpus": self.spec.get("CPU", 0),
            "num_gpus": self.spec.get("GPU", 0),
            "max_concurrency": 1,
        }


class Phase(enum.Enum):
    RESERVING = "reserving"
    PREPARING = "preparing"


@dataclass
class _Plan:
    num_attention: int
    num_expert: int
    drain: bool
    started_s: float
    phase: Phase = Phase.RESERVING
    bundles: list[Bundle] = field(default_factory=list)  # for the new workers, attention first
    new_attention: list = field(default_factory=list)
    new_experts: list = field(default_factory=list)
    reserved: list[ray.ObjectRef] = field(default_factory=list)  # the new groups' readiness
    ready: list[ray.ObjectRef] = field(default_factory=list)  # new workers' construction, stagings
    placement: Placement | None = None  # the new expert map (None: the expert tier stays)
    kept_experts: list[int] = field(default_factory=list)  # old indices, in the new order
    removed_attention: list[int] = field(default_factory=list)
    removed_experts: list[int] = field(default_factory=list)


@dataclass
class ResizeStats:
    """What /metrics shows: the sizes asked for, and each resize's seconds from request to serving."""

    desired: dict[str, int] = field(default_factory=dict)
    seconds: list[float] = field(default_factory=list)
    last: str = ""


class Resizer:
    def __init__(self, engine: ClusterEngine, bundles: dict[str, Bundle]) -> None:
        """bundles: actor key -> its bundle, for the workers the engine started with."""
        self.engine = engine
        self.bundles = bundles
        self.free: list[Bundle] = []  # bundles of the engine's group that removed workers left
        self.plan: _Plan | None = None
        self.stats = ResizeStats()

    @property
    def busy(self) -> bool:
        return self.plan is not None

    # -- asking -----------------------------------------------------------------------------

    def request(self, num_attention: int, num_expert: int, drain: bool = True) -> None:
        """Start a resize (validated first: a bad size raises ValueError and changes nothing)."""
        e = self.engine
        self._check(num_attention, num_expert)
        self.stats.desired = {"attention": num_attention, "expert": num_expert}
        if (num_attention, num_expert) == (len(e.attention), len(e.experts)):
            return
        plan = _Plan(num_attention, num_expert, drain, time.perf_counter())
        plan.removed_attention = list(range(num_attention, len(e.attention)))
        plan.removed_experts = list(range(num_expert, len(e.experts)))
        added = max(0, num_attention - len(e.attention)) + max(0, num_expert - len(e.experts))
        plan.bundles = self._reserve(added)
        plan.reserved = [b.group.ready() for b in plan.bundles if b.elastic]
        if plan.drain:
            e.book.drain(plan.removed_attention)
        self.plan = plan
        log.warning(
            "resizing from %d attention + %d expert workers to %d + %d",
            len(e.attention), len(e.experts), num_attention, num_expert,
        )  # fmt: skip

    def _check(self, num_attention: int, num_expert: int) -> None:
        e = self.engine
        if self.plan is not None:
            raise ValueError(
                f"a resize to {self.plan.num_attention} attention + {self.plan.num_expert} expert workers "
                "is in progress; ask again when it is done"
            )
        if num_attention < 1 or num_expert < 1:
            raise ValueError(
                f"a tier needs at least one worker: got {num_attention} attention and "
                f"{num_expert} expert workers"
            )
        experts = e.model_cfg.num_local_experts
        if num_expert > experts:
            raise ValueError(
                f"{num_expert} expert workers for {experts} experts: at most one worker per expert"
            )
        added = max(0, num_attention - len(e.attention)) + max(0, num_expert - len(e.experts))
        need = {k: v * max(0, added - len(self.free)) for k, v in e.worker_bundle.items()}
        have = ray.available_resources()
        short = {k: v for k, v in need.items() if v > have.get(k, 0.0) + 1e-9}
        if short:
            raise ValueError(
                f"{added} more workers need {need} beyond the {len(self.free)} free bundles; the Ray "
                f"cluster has { ({k: have.get(k, 0.0) for k in need}) } available"
            )

    def _reserve(self, n: int) -> list[Bundle]:
        reused, self.free = self.free[:n], self.free[n:]
        spec = self.engine.worker_bundle
        made = []
        for _ in range(n - len(reused)):
            group = placement_group([spec], strategy="PACK")
            made.append(Bundle(group, 0, dict(spec), elastic=True))
        return reused + made

    # -- between steps --------------------------------------------------------------------------

    def poll(self, timeout_s: float = 0.0) -> bool:
        """Advance the resize in flight (waiting at most `timeout_s`); True once it has switched."""
        plan = self.plan
        if plan is None:
            return False
        if plan.phase is Phase.RESERVING:
            groups = plan.reserved
            if groups and len(ray.wait(groups, num_returns=len(groups), timeout=timeout_s)[0]) < len(groups):
                return False
            self._prepare(plan)
            return False
        done = ray.wait(plan.ready, num_returns=len(plan.ready), timeout=timeout_s)[0] if plan.ready else []
        if len(done) < len(plan.ready):
            return False
        if plan.drain and not self.engine.book.drained(plan.removed_attention):
            return False
        try:
            ray.get(plan.ready)  # a new worker that failed to start, or a staging that failed
        except Exception as e:
            self.cancel(f"preparing it failed: {e}")
            return False
        self._switch(plan)
        return True

    def wait(self, timeout_s: float = 300.0) -> None:
        """Block until the resize in flight is ready to switch but for draining (new workers built,
        stagings done), so the switch lands at a known step (tests and benchmarks; serving never
        waits)."""
        plan = self.plan
        if plan is None:
            return
        if plan.reserved:
            ray.wait(plan.reserved, num_returns=len(plan.reserved), timeout=timeout_s)
        self.poll()
        if self.plan is plan and plan.ready:
            ray.wait(plan.ready, num_returns=len(plan.ready), timeout=timeout_s)

    def cancel(self, reason: str) -> None:
        """Give up the resize in flight (a failure changed the members under it): new workers go,
        their bundles come back, draining ranks take requests again. The old size keeps serving."""
        plan, self.plan = self.plan, None
        if plan is None:
            return
        e = self.engine
        for w in plan.new_attention + plan.new_experts:
            ray.kill(w)
            self.bundles.pop(e.key(w), None)
        for bundle in plan.bundles:
            if bundle.elastic:
                remove_placement_group(bundle.group)
            else:
                self.free.append(bundle)
        e.book.undrain(plan.removed_attention)
        self.stats.desired = {}
        log.warning("resize to %d attention + %d expert workers cancelled: %s",
                    plan.num_attention, plan.num_expert, reason)  # fmt: skip

    def _prepare(self, plan: _Plan) -> None:
        """Start the new workers and the stagings (nothing blocks: their refs are polled)."""
        e = self.engine
        plan.phase = Phase.PREPARING
        nodes = [ray.util.placement_group_table(b.group)["bundles_to_node_id"][b.index] for b in plan.bundles]
        load = e.rebalancer.expert_load() if e.rebalancer is not None else None
        num_new_experts = max(0, plan.num_expert - len(e.experts))
        expert_bundles = plan.bundles[len(plan.bundles) - num_new_experts :]
        if num_new_experts:
            expert_nodes = e.expert_nodes + nodes[len(nodes) - num_new_experts :]
            plan.placement = grow(e.placement, num_new_experts, load, expert_nodes)
            plan.kept_experts = list(range(len(e.experts)))
            # the workers there keep every slot; they only move to the new map's version
            plan.ready += [x.stage.remote(plan.placement.version, {}) for x in e.experts]
        elif plan.removed_experts:
            limit = e.cluster.faults.max_slots_per_worker
            plan.placement, plan.kept_experts = shrink(
                e.placement, plan.removed_experts, load, limit, e.expert_nodes
            )
            changes = survivor_changes(e.placement, plan.placement, plan.kept_experts)
            kept = [e.experts[w] for w in plan.kept_experts]
            ray.get([x.discard_staged.remote() for x in kept])
            plan.ready += [
                x.stage.remote(plan.placement.version, c) for x, c in zip(kept, changes, strict=True)
            ]
        placement = plan.placement or e.placement
        layout = RankLayout(plan.num_attention, plan.num_expert, placement.slots_per_worker)
        for i, bundle in enumerate(plan.bundles[: len(plan.bundles) - num_new_experts]):
            rank = len(e.attention) + i
            plan.new_attention.append(e.start_attention(bundle, rank, layout, placement, nodes[i]))
        for i, bundle in enumerate(expert_bundles):
            plan.new_experts.append(e.start_expert(bundle, len(e.experts) + i, layout, placement))
        for w, bundle in zip(plan.new_attention + plan.new_experts, plan.bundles, strict=True):
            self.bundles[e.key(w)] = bundle
        plan.ready += e.track(plan.new_attention + plan.new_experts)

    def _switch(self, plan: _Plan) -> None:
        """Between two steps: every member leaves, the new world joins the next epoch."""
        e = self.engine
        e.board.publish(-1, e.placement.version, Command.LEAVE)
        ray.get(e.loops)
        leaving = [e.attention[r] for r in plan.removed_attention] + [
            e.experts[w] for w in plan.removed_experts
        ]
        kept_attention = [r for r in range(len(e.attention)) if r not in plan.removed_attention]
        moved = e.book.renumber(plan.removed_attention, kept_attention)
        e.book.add_ranks(len(plan.new_attention))
        e.attention = [e.attention[r] for r in kept_attention] + plan.new_attention
        if plan.placement is not None:
            e.experts = [e.experts[w] for w in plan.kept_experts] + plan.new_experts
            new_nodes = [e.where_of(w)[0] for w in plan.new_experts]  # constructed: `ready` held them
            e.expert_nodes = [e.expert_nodes[w] for w in plan.kept_experts] + new_nodes
            e.placement = plan.placement
        e.layout = RankLayout(len(e.attention), len(e.experts), e.placement.slots_per_worker)
        e.recovery.join(e.board.new_epoch())
        for w in leaving:
            self._release(w)
        if e.rebalancer is not None:
            e.rebalancer.reset(e.placement, e.experts, e.expert_nodes)
        seconds = time.perf_counter() - plan.started_s
        self.stats.seconds.append(seconds)
        size = f"{len(e.attention)} attention + {len(e.experts)} expert workers"
        self.stats.last = f"{size} x {e.placement.slots_per_worker} slots in {seconds:.2f} s"
        self.plan = None
        log.warning("resized to %s (%d requests re-admitted)", self.stats.last, len(moved))

    def _release(self, worker: object) -> None:
        """Kill a worker that left; its bundle goes back (or its own group goes)."""
        e = self.engine
        e.kill(worker)
        bundle = self.bundles.pop(e.key(worker), None)
        if bundle is None:
            return
        if bundle.elastic:
            remove_placement_group(bundle.group)
        else:
            self.free.append(bundle)

    def release_all(self) -> None:
        """The engine closes: the groups made for added workers go."""
        for bundle in list(self.bundles.values()) + self.free:
            if bundle.elastic:
                remove_placement_group(bundle.group)
        if self.plan is not None:
            for w in self.plan.new_attention + self.plan.new_experts:
                ray.kill(w)
            for bundle in self.plan.bundles:
                if bundle.elastic:
                    remove_placement_group(bundle.group)
        self.bundles, self.free, self.plan = {}, [], None
