"""The disaggregated engine: M attention workers and N expert workers on Ray.

The driver holds no model state. Each step it writes the step's header to its store (expert
workers wait on it) and makes one Ray call per attention worker (new requests, cancellations),
then gathers the token ids they sampled. Requests go to the attention rank with the fewest
unfinished requests.

Workers are expected to die. A step that loses a worker (or finds one hung) does not fail its
requests: `cluster.recovery` forms a new membership epoch over the survivors (re-planning the
experts over the live expert workers, re-admitting a lost attention rank's requests elsewhere)
and the step runs again. Only when no attention or no expert worker is left does `step` raise
`ClusterUnavailable`.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import signal
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import RayActorError
from ray.util.placement_group import PlacementGroup, remove_placement_group

from cluster.attention_worker import AttentionWorker, StepInput, StepResult
from cluster.config import ClusterConfig
from cluster.expert_worker import ExpertWorker
from cluster.membership import Command, HeaderBoard
from cluster.placement_groups import attention_threads, bundles_in, node_cpus, reserve
from cluster.rebalancer import Rebalancer
from cluster.recovery import ClusterUnavailable, Recovery, StepOutcome, await_step
from cluster.rendezvous import CONCURRENCY_GROUPS
from cluster.resize import Bundle, Resizer
from cluster.vision_worker import VisionTier, VisionWorker
from engine.autoscale import AutoscalerConfig, Decision, TierAutoscaler
from engine.core import EngineConfig, RequestOutput, check_fits
from engine.data_parallel import RequestBook
from engine.protocol import Completion, FaultStats, generate
from engine.request import FinishReason, SamplingParams
from model.config import ModelConfig
from model.image_processing import ProcessedImage
from router.layout import RankLayout
from router.nodes import spread_over_nodes
from router.placement import Placement

log = logging.getLogger(__name__)
__all__ = ["ClusterEngine", "ClusterUnavailable", "generate_on_cluster"]

# The workers' actor classes, made once: each runs its work on one thread and its control calls on
# another (`cluster.rendezvous.CONTROL`); a vision worker is restarted by Ray (`_start_vision`).
ATTENTION_ACTOR = ray.remote(concurrency_groups=CONCURRENCY_GROUPS)(AttentionWorker)
EXPERT_ACTOR = ray.remote(concurrency_groups=CONCURRENCY_GROUPS)(ExpertWorker)
VISION_ACTOR = ray.remote(max_restarts=3, max_task_retries=2, concurrency_groups=CONCURRENCY_GROUPS)(
    VisionWorker
)


class ClusterEngine:
    """The `engine.protocol.Engine` verbs over Ray workers: add, abort, step, has_unfinished,
    metrics, stats, close."""

    def __init__(
        self,
        model_dir: str | Path,
        cluster: ClusterConfig,
        engine_cfg: EngineConfig | None = None,
        address: str | None = None,
        placement_group: PlacementGroup | None = None,
        bundle_offset: int = 0,
    ) -> None:
        """`placement_group`: reserve the workers in an existing group (bundles `bundle_offset`,
        `bundle_offset + 1`, ...: attention ranks first, then expert workers), e.g. a Ray Serve
        replica's own group whose bundle 0 holds the replica. The group stays its owner's. Without
        it the engine makes (and later removes) a group of its own."""
        self.model_dir = str(model_dir)
        self.cluster = cluster
        self.engine_cfg = engine_cfg or EngineConfig()
        self.model_cfg = ModelConfig.from_file(self.model_dir)
        self.layout, self.placement = cluster.plan(self.model_cfg)
        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
        self._pg = None  # the group this engine made (and removes)
        self._given_pg = placement_group
        self._bundle_offset = bundle_offset
        self.loops: list[ray.ObjectRef] = []
        self.attention: list = []
        self.experts: list = []
        self._ids = itertools.count()
        self._step_ids = itertools.count()
        self.book = RequestBook(cluster.num_attention_workers)
        self.last_results: list[StepResult] = []
        self.rebalancer: Rebalancer | None = None
        self.faults = FaultStats()
        self.board: HeaderBoard | None = None
        self.vision: VisionTier | None = None  # None: attention workers encode their own images
        self.autoscaler = TierAutoscaler(AutoscalerConfig())  # off until `configure` turns it on
        self.last_decision = ""
        try:
            self._start()
        except BaseException:
            self.close()
            raise

    def _reserve(self) -> tuple[PlacementGroup, int, list[dict[str, float]]]:
        """The group, the index of the first worker's bundle, and the workers' bundle specs."""
        if self._given_pg is not None:
            specs = bundles_in(self._given_pg, self._bundle_offset, self.cluster.num_workers)
            return self._given_pg, self._bundle_offset, specs
        self._pg, specs = reserve(self.cluster)
        return self._pg, 0, specs

    def _start(self) -> None:
        c = self.cluster
        pg, offset, specs = self._reserve()
        m = c.num_attention_workers
        bundle_nodes = ray.util.placement_group_table(pg)["bundles_to_node_id"]
        self.expert_nodes = [bundle_nodes[offset + m + w] for w in range(c.num_expert_workers)]
        # replicas of one expert on different nodes where there are several (a node's loss then
        # leaves each replicated expert served)
        self.placement = spread_over_nodes(self.placement, self.expert_nodes)
        placed = [Bundle(pg, offset + i, dict(spec)) for i, spec in enumerate(specs)]
        self.worker_bundle = dict(specs[0])  # what a worker added later reserves
        self.attention = [
            self.start_attention(placed[r], r, self.layout, self.placement, bundle_nodes[offset + r])
            for r in range(m)
        ]
        self.experts = [
            self.start_expert(placed[m + w], w, self.layout, self.placement)
            for w in range(c.num_expert_workers)
        ]
        workers = self.attention + self.experts
        self._where = {}
        ray.get(self.track(workers))
        # what the driver checks a request against: the smallest pool (each sized from its memory)
        self.kv_blocks = min(ray.get([w.kv_blocks.remote() for w in self.attention]))
        self.resizer = Resizer(
            self, {self.key(w): b for w, b in zip(workers, placed[: len(workers)], strict=True)}
        )
        self.board = HeaderBoard(ray.util.get_node_ip_address())
        self.recovery = Recovery(self)
        self.recovery.join(self.board.new_epoch())
        self.rebalancer = Rebalancer(self.placement, c.rebalance, self.experts, self.expert_nodes)
        self._start_vision(placed[m + c.num_expert_workers :])

    def _start_vision(self, bundles: list[Bundle]) -> None:
        """The vision-encoder tier, in the bundles after the expert workers'. A vision worker holds
        no request state, so Ray restarts one that dies and retries its calls."""
        if not bundles:
            return
        workers = [
            VISION_ACTOR.options(**b.options()).remote(
                self.model_dir, v, self.engine_cfg.dtype, self.cluster.device
            )
            for v, b in enumerate(bundles)
        ]
        ray.get([w.stats.remote() for w in workers])  # loaded (a checkpoint without a tower fails here)
        self.vision = VisionTier(workers)

    def start_attention(self, bundle: Bundle, rank: int, layout: RankLayout, placement: Placement, node: str):
        """An attention worker in `bundle` on `node`, at start or added by a resize: the same
        settings either way (its threads share the node among the layout's attention ranks)."""
        c = self.cluster
        threads = attention_threads(c, layout.num_attention, node_cpus(node))
        return ATTENTION_ACTOR.options(**bundle.options()).remote(
            self.model_dir,
            rank,
            layout,
            placement,
            self.engine_cfg,
            c.device,
            load_vision=c.num_vision_workers == 0,
            threads=threads,
        )

    def start_expert(self, bundle: Bundle, idx: int, layout: RankLayout, placement: Placement):
        """Expert worker `idx` in `bundle`, at start or added by a resize."""
        return EXPERT_ACTOR.options(**bundle.options()).remote(
            self.model_dir, idx, layout, placement, self.engine_cfg.dtype, self.cluster.device
        )

    def track(self, workers: list) -> list[ray.ObjectRef]:
        """Learn where workers run (refs that complete once each worker is constructed): a hung
        process on this node is then killed at once (ray.kill waits a few seconds for a process
        that cannot answer)."""
        refs = [w.where.remote() for w in workers]
        for w, ref in zip(workers, refs, strict=True):
            self._where[self.key(w)] = ref
        return refs

    def where_of(self, worker) -> tuple[str, int] | None:
        """(node id, pid) of a worker; None while it is still being constructed (or never was)."""
        where = self._where.get(self.key(worker))
        if isinstance(where, ray.ObjectRef):
            if not ray.wait([where], timeout=0)[0]:
                return None
            try:
                where = self._where[self.key(worker)] = ray.get(where)
            except RayActorError:
                return None
        return where

    @staticmethod
    def key(actor) -> str:
        return actor._actor_id.hex()

    # -- requests -------------------------------------------------------------------------

    def add(
        self,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        request_id: str | None = None,
        images: Sequence[ProcessedImage] = (),
    ) -> str:
        """Queue a request; one that can never run (too long for the context or for one attention
        worker's KV cache) raises ValueError with the numbers. `images`: encoded by the vision
        tier (its request reaches its rank once they are), or by its attention rank without one."""
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self.book:
            raise ValueError(f"request id {request_id!r} is already in use")
        if not prompt_token_ids:
            raise ValueError(f"request {request_id!r}: prompt must hold at least one token")
        check_fits(self.model_cfg, self.engine_cfg, len(prompt_token_ids), params.max_tokens, self.kv_blocks)
        hold = bool(images) and self.vision is not None
        rank = self.book.add(request_id, prompt_token_ids, params, images, hold=hold)
        if hold:
            self.vision.add(self.book.request(request_id), rank)
        return request_id

    def abort(self, request_id: str) -> None:
        """Forget the request now; its rank frees its blocks at the next step."""
        self.book.abort(request_id)
        if self.vision is not None:
            self.vision.discard(request_id)

    @property
    def has_unfinished(self) -> bool:
        """Requests to serve, or a resize to finish (it advances between steps)."""
        return self.book.has_work or self.resizer.busy

    def resize(self, num_attention: int, num_expert: int, drain: bool = True) -> None:
        """Grow or shrink the tiers while serving (`cluster.resize`). Returns at once; the new size
        serves from a step a little later. A size below one worker per tier, above one expert
        worker per expert, or beyond the free resources raises ValueError and changes nothing."""
        busy_before = self.resizer.busy
        self.resizer.request(num_attention, num_expert, drain)
        if self.resizer.busy and not busy_before and self.rebalancer is not None:
            # a rearrangement in flight would switch maps under the resize: drop it, resume after
            ray.get([x.discard_staged.remote() for x in self.experts])
            self.rebalancer.reset(self.placement, self.experts, self.expert_nodes)

    def step(self) -> list[RequestOutput]:
        """One lock-step over all attention workers (and, through them, the expert workers). A
        step that loses a worker is recovered and run again; what completed is kept. A resize in
        flight advances first (and switches the members here, between two steps)."""
        if self.resizer.busy:
            self.resizer.poll(timeout_s=0.0 if self.book.has_work else 0.05)
        if not self.book.has_work:
            return []
        if self.vision is not None and not self._take_encoded():
            return []
        outputs: list[RequestOutput] = []
        for attempt in range(self.cluster.faults.max_recoveries_per_step + 1):
            outcome = self._step_once()
            outputs += self._accept(outcome.results)
            if not outcome.failed:
                return outputs
            if attempt == self.cluster.faults.max_recoveries_per_step:
                break
            self.recovery.recover(outcome)
        raise ClusterUnavailable(
            f"a step failed {self.cluster.faults.max_recoveries_per_step + 1} times in a row; giving up"
        )

    def _take_encoded(self) -> bool:
        """Send new images to the vision tier and release the requests whose features are ready;
        False when nothing but encodings is in flight (then it waits a moment for one)."""
        self.vision.submit()
        for request, _ in self.vision.ready():
            self.book.release(request.request_id, request.image_features)
        if len(self.book) == self.book.num_held and not self.book.has_aborts:
            self.vision.wait(timeout_s=0.05)
            return False
        return True

    def _step_once(self) -> StepOutcome:
        step_id = next(self._step_ids)
        rebalancing = self.rebalancer is not None and not self.resizer.busy
        placement = self.rebalancer.before_step() if rebalancing else None
        if placement is not None:
            self.placement = placement
        inputs = [StepInput(step_id, r.new_requests, r.aborts, placement) for r in self.book.take_inputs()]
        self.board.publish(step_id, self.placement.version)
        refs = [w.step.remote(i) for w, i in zip(self.attention, inputs, strict=True)]
        outcome = await_step(self, refs)
        if not outcome.failed and rebalancing:
            self.rebalancer.after_step(step_id, outcome.results)
        if not outcome.failed:
            self._measure(outcome.results)
        return outcome

    def _measure(self, results: list[StepResult]) -> None:
        routed = sum(int(r.slot_load.sum()) for r in results if r.slot_load is not None)
        kv = max((r.kv_blocks_used / max(r.kv_blocks_total, 1) for r in results), default=0.0)
        self.autoscaler.window.add_step(
            routed, len(self.model_cfg.moe_layers), kv, sum(r.num_waiting for r in results)
        )

    # -- tiers ------------------------------------------------------------------------------

    def configure(
        self,
        num_attention: int | None = None,
        num_expert: int | None = None,
        drain: bool = True,
        autoscaler: AutoscalerConfig | None = None,
    ) -> None:
        """Operators' control (Serve's `reconfigure`): tier sizes to resize to, and the tier
        autoscaler's settings. Bad values raise ValueError and change nothing."""
        if autoscaler is not None and autoscaler.enabled:
            top = self.model_cfg.num_local_experts
            if autoscaler.expert.max_workers > top:
                raise ValueError(
                    f"autoscaler: max expert workers {autoscaler.expert.max_workers} exceeds the "
                    f"{top} experts"
                )
        if num_attention is not None or num_expert is not None:
            self.resize(num_attention or len(self.attention), num_expert or len(self.experts), drain)
        if autoscaler is not None:
            self.autoscaler = TierAutoscaler(autoscaler)

    def autoscale(self, now_s: float) -> Decision | None:
        """Measure the interval since the last call and let the tier autoscaler decide; resize
        when it asks for other sizes. The decision made, or None (off, or a resize in flight);
        `autoscaler.history` keeps what it saw."""
        if not self.autoscaler.cfg.enabled:
            return None
        busy = self.resizer.busy
        decision = self.autoscaler.tick(now_s, len(self.attention), len(self.experts), resizing=busy)
        if decision is not None:
            self.last_decision = decision.reason
            log.warning("tier autoscaler: %s", decision.reason)
            try:
                self.resize(decision.num_attention, decision.num_expert)
            except ValueError as e:  # e.g. no resources for another worker now: try again later
                log.warning("tier autoscaler cannot resize: %s", e)
        return None if busy else self.autoscaler.history[-1].decision

    def _accept(self, results: list[StepResult]) -> list[RequestOutput]:
        """The outputs of the ranks whose step completed (a failed rank replays its step)."""
        self.last_results = [r for r in results if not r.failed] or self.last_results
        outputs = []
        for result in results:
            for request_id, reason in result.rejected:
                if request_id in self.book:
                    self.book.finish(request_id)
                    outputs.append(RequestOutput(request_id, (), True, FinishReason.ABORT, 0, 0))
                    log.warning("request %s rejected: %s", request_id, reason)
            outputs += self.book.record(result.outputs)
        if self.vision is not None:
            for out in outputs:
                if out.finished:
                    self.vision.forget(out.request_id)
        return outputs

    def metrics(self) -> dict[str, Any]:
        """Gauges summed over attention ranks, as of the last step, and the fault counters."""
        r = self.last_results
        figures = {
            "num_running": sum(x.num_running for x in r),
            "num_waiting": sum(x.num_waiting for x in r),
            "kv_blocks_used": sum(x.kv_blocks_used for x in r),
            "kv_blocks_total": sum(x.kv_blocks_total for x in r),
            "num_preemptions": sum(x.num_preemptions for x in r),
            "layer_threads": {x.dp_rank: x.layer_threads for x in r},
            "faults": self.faults.figures(self.board.epoch if self.board else 0),
            "workers": {"attention": len(self.attention), "expert": len(self.experts)},
            "workers_desired": dict(self.resizer.stats.desired)
            or {"attention": len(self.attention), "expert": len(self.experts)},
            "resize_seconds": list(self.resizer.stats.seconds),
        }
        if self.rebalancer is not None:
            figures["tokens_per_expert_worker"] = self.rebalancer.tokens_per_worker.tolist()
            figures["balancing"] = self.rebalancer.current_metrics()
        return figures

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams],
        images: Sequence[Sequence[ProcessedImage]] | None = None,
    ) -> list[Completion]:
        return generate(self, prompts, params, images)

    def load_routers(self, model_dir: str | Path) -> None:
        """Every attention rank swaps in another checkpoint's router weights between two steps
        (experiments: move the hot experts mid-run). Expert weights stay as they are."""
        ray.get([w.load_routers.remote(str(model_dir)) for w in self.attention])

    # -- inspection and shutdown -----------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        return {
            "attention": ray.get([w.stats.remote() for w in self.attention]),
            "experts": ray.get([w.stats.remote() for w in self.experts]),
            "vision": self.vision.stats() if self.vision is not None else [],
        }

    def kill(self, worker) -> None:
        """Kill a worker now: SIGKILL if it runs on this node, and through Ray either way."""
        node, pid = self.where_of(worker) or (None, None)
        if node == ray.get_runtime_context().get_node_id() and pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        ray.kill(worker)

    def worker_pids(self) -> dict[str, list[int]]:
        """The process of each live worker, by role."""
        pids = ray.get([w.pid.remote() for w in self.attention + self.experts], timeout=30)
        return {"attention": pids[: len(self.attention)], "expert": pids[len(self.attention) :]}

    def close(self) -> None:
        """Stop the expert loops, kill every actor, free the placement group (and Ray, if we started it)."""
        try:
            if self.loops and self.board is not None:
                self.board.publish(-1, self.placement.version, Command.STOP)
                ray.get(self.loops, timeout=20)
        except Exception as e:  # a dead worker must not keep the rest alive
            log.warning("clean stop failed (%s); killing the workers", e)
        self.loops = []
        for actor in self.attention + self.experts + (self.vision.workers if self.vision else []):
            ray.kill(actor)
        self.vision = None
        if getattr(self, "resizer", None) is not None:
            self.resizer.release_all()
        if self.rebalancer is not None:
            ray.kill(self.rebalancer.service)
            self.rebalancer = None
        self.attention, self.experts = [], []
        if self._pg is not None:
            remove_placement_group(self._pg)
            self._pg = None
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()

    def __enter__(self) -> ClusterEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def generate_on_cluster(
    model_dir: Path,
    prompts: list[list[int]],
    params: SamplingParams,
    engine_cfg: EngineConfig,
    cluster: ClusterConfig,
    address: str | None,
    images: Sequence[Sequence[ProcessedImage]] | None = None,
) -> list[Completion]:
    with ClusterEngine(model_dir, cluster, engine_cfg, address) as engine:
        return engine.generate(prompts, params, images)
