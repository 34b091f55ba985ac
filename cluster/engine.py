"""The disaggregated engine: M attention workers and N expert workers on Ray.

The driver holds no model state. Each step it makes one Ray call per attention worker (new
requests, cancellations) and gathers the token ids they sampled; expert workers run their own
loop driven by the header attention rank 0 broadcasts, so they get no Ray call per step.
Requests go to the attention rank with the fewest unfinished requests.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.attention_worker import AttentionWorker, StepInput, StepResult
from cluster.config import ClusterConfig
from cluster.expert_worker import ExpertWorker
from cluster.placement_groups import bundles_in, reserve
from cluster.rebalancer import Rebalancer
from cluster.vision_worker import VisionTier, VisionWorker
from engine.core import EngineConfig, RequestOutput
from engine.data_parallel import least_loaded_rank
from engine.protocol import Completion, generate
from engine.request import FinishReason, Request, SamplingParams
from model.config import ModelConfig
from model.image_processing import ProcessedImage

log = logging.getLogger(__name__)


class RequestRejected(ValueError):
    def __init__(self, request_id: str, reason: str) -> None:
        super().__init__(reason)
        self.request_id = request_id


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
        self._loops: list[ray.ObjectRef] = []
        self.attention: list = []
        self.experts: list = []
        self._ids = itertools.count()
        self._step_ids = itertools.count()
        self._pending: list[list[Request]] = [[] for _ in range(cluster.num_attention_workers)]
        self._aborts: list[list[str]] = [[] for _ in range(cluster.num_attention_workers)]
        self._owner: dict[str, int] = {}
        self.last_results: list[StepResult] = []
        self.rebalancer: Rebalancer | None = None
        self.vision: VisionTier | None = None  # None: attention workers encode their own images
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

        def options(i: int) -> dict:
            strategy = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=offset + i)
            return {
                "scheduling_strategy": strategy,
                "num_cpus": specs[i].get("CPU", 0),
                "num_gpus": specs[i].get("GPU", 0),
            }

        attn_cls, expert_cls = ray.remote(AttentionWorker), ray.remote(ExpertWorker)
        m = c.num_attention_workers
        self.attention = [
            attn_cls.options(**options(r)).remote(
                self.model_dir,
                r,
                self.layout,
                self.placement,
                self.engine_cfg,
                c.device,
                load_vision=c.num_vision_workers == 0,
            )
            for r in range(m)
        ]
        self.experts = [
            # two threads: the step loop blocks one; stats and control calls use the other
            expert_cls.options(max_concurrency=2, **options(m + w)).remote(
                self.model_dir, w, self.layout, self.placement, self.engine_cfg.dtype, c.device
            )
            for w in range(c.num_expert_workers)
        ]
        workers = self.attention + self.experts
        master = ray.get(self.attention[0].address.remote())
        ray.get([w.join.remote(master, self.layout.world_size) for w in workers])
        self._loops = [e.run_loop.remote() for e in self.experts]
        self.rebalancer = Rebalancer(self.placement, c.rebalance, self.experts)
        self._start_vision(options, m + c.num_expert_workers)

    def _start_vision(self, options: Callable[[int], dict], first_bundle: int) -> None:
        """The vision-encoder tier, in the bundles after the expert workers'. A vision worker holds
        no request state, so Ray restarts one that dies and retries its calls."""
        n = self.cluster.num_vision_workers
        if n == 0:
            return
        vision_cls = ray.remote(max_restarts=3, max_task_retries=2)(VisionWorker)
        workers = [
            vision_cls.options(**options(first_bundle + v)).remote(
                self.model_dir, v, self.engine_cfg.dtype, self.cluster.device
            )
            for v in range(n)
        ]
        ray.get([w.stats.remote() for w in workers])  # loaded (a checkpoint without a tower fails here)
        self.vision = VisionTier(workers)

    # -- requests -------------------------------------------------------------------------

    def add(
        self,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        request_id: str | None = None,
        images: Sequence[ProcessedImage] = (),
    ) -> str:
        """`images`: encoded by the vision tier (or, without one, by the request's attention rank)."""
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self._owner:
            raise ValueError(f"request id {request_id!r} is already in use")
        request = Request(request_id, list(prompt_token_ids), params, images=tuple(images))
        limit = self.model_cfg.max_position_embeddings
        if request.num_tokens + params.max_tokens > limit:
            raise ValueError(
                f"prompt ({request.num_tokens} tokens) plus max_tokens ({params.max_tokens}) "
                f"exceeds the context length {limit}"
            )
        counts = [0] * len(self.attention)
        for owner in self._owner.values():
            counts[owner] += 1
        rank = least_loaded_rank(counts)
        self._owner[request_id] = rank
        if images and self.vision is not None:
            self.vision.add(request, rank)  # to its rank once its features exist
        else:
            self._pending[rank].append(request)
        return request_id

    def abort(self, request_id: str) -> None:
        """Forget the request now; its rank frees its blocks at the next step."""
        rank = self._owner.pop(request_id, None)
        if rank is None:
            return
        if self.vision is not None and self.vision.discard(request_id):
            return  # its images were still being encoded: no rank has it
        pending = self._pending[rank]
        kept = [r for r in pending if r.request_id != request_id]
        if len(kept) == len(pending):
            self._aborts[rank].append(request_id)  # already on the worker
        else:
            self._pending[rank] = kept

    @property
    def has_unfinished(self) -> bool:
        return bool(self._owner) or any(self._aborts)

    def step(self) -> list[RequestOutput]:
        """One lock-step over all attention workers (and, through them, the expert workers)."""
        if not self._owner and not any(self._aborts):
            return []
        if self.vision is not None and not self._take_encoded():
            return []
        step_id = next(self._step_ids)
        placement = self.rebalancer.before_step() if self.rebalancer else None
        if placement is not None:
            self.placement = placement
        inputs = [
            StepInput(step_id, tuple(self._pending[r]), tuple(self._aborts[r]), placement)
            for r in range(len(self.attention))
        ]
        self._pending = [[] for _ in self.attention]
        self._aborts = [[] for _ in self.attention]
        self.last_results = self._gather(
            [w.step.remote(i) for w, i in zip(self.attention, inputs, strict=True)]
        )
        if self.rebalancer is not None:
            self.rebalancer.after_step(step_id, self.last_results)
        outputs = []
        for result in self.last_results:
            for request_id, reason in result.rejected:
                self._owner.pop(request_id, None)
                outputs.append(RequestOutput(request_id, (), True, FinishReason.ABORT, 0, 0))
                log.warning("request %s rejected: %s", request_id, reason)
            for out in result.outputs:
                if out.request_id not in self._owner:
                    continue  # aborted while this step ran
                outputs.append(out)
                if out.finished:
                    self._owner.pop(out.request_id, None)
        if self.vision is not None:
            for out in outputs:
                if out.finished:
                    self.vision.forget(out.request_id)
        return outputs

    def _take_encoded(self) -> bool:
        """Send new images to the vision tier and queue the requests whose features are ready;
        False when nothing but encodings is in flight (then it waits a moment for one)."""
        self.vision.submit()
        for request, rank in self.vision.ready():
            self._pending[rank].append(request)
        on_workers = len(self._owner) - self.vision.num_waiting
        if on_workers == 0 and not any(self._aborts):
            self.vision.wait(timeout_s=0.05)
            return False
        return True

    def metrics(self) -> dict[str, Any]:
        """Gauges summed over attention ranks, as of the last step."""
        r = self.last_results
        figures = {
            "num_running": sum(x.num_running for x in r),
            "num_waiting": sum(x.num_waiting for x in r),
            "kv_blocks_used": sum(x.kv_blocks_used for x in r),
            "kv_blocks_total": sum(x.kv_blocks_total for x in r),
        }
        if self.rebalancer is not None:
            figures["tokens_per_expert_worker"] = self.rebalancer.tokens_per_worker.tolist()
            figures["balancing"] = self.rebalancer.latest_metrics
        return figures

    def _gather(self, refs: list[ray.ObjectRef]) -> list:
        """The step's results; if an expert loop ends meanwhile (a dead worker), raise instead of
        waiting forever on a collective that can no longer complete."""
        while True:
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=1.0)
            if len(ready) == len(refs):
                return ray.get(refs)
            ended, _ = ray.wait(self._loops, timeout=0)
            if ended:
                ray.get(ended)  # raises the worker's error, if it died
                raise RuntimeError("an expert worker left its step loop; the cluster cannot step")

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

    def close(self) -> None:
        """Stop the expert loops, kill every actor, free the placement group (and Ray, if we started it)."""
        try:
            if self._loops:
                ray.get([w.stop_experts.remote() for w in self.attention], timeout=20)
                ray.get(self._loops, timeout=20)
        except Exception as e:  # a dead worker must not keep the rest alive
            log.warning("clean stop failed (%s); killing the workers", e)
        self._loops = []
        for actor in self.attention + self.experts + (self.vision.workers if self.vision else []):
            ray.kill(actor)
        self.vision = None
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
