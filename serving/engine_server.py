"""The engine deployment: each Ray Serve replica owns one engine and streams token ids.

A replica builds either the disaggregated `ClusterEngine` (its attention and expert workers are
reserved in the replica's own placement group: bundle 0 holds the replica, bundles 1.. the
workers, attention ranks first) or, with no expert workers, the single-process `LLMEngine`.
The single-process engine steps in a child process of the replica (`ProcessEngine`, unless
`engine_process` is off), where its Python does not share the replica's GIL with the event loop,
the HTTP and gRPC handlers and Ray's threads, and which is replaced if it dies, its requests going
on where they stopped (`engine_restarts` times in 10 minutes). The cluster engine, whose step is
mostly waiting on its workers, runs its step loop on a thread (`AsyncEngine`). Text never reaches
this deployment: the ingress tokenizes and detokenizes, so a replica's work is token ids in, token
ids out.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

import torch
from ray import serve
from ray.util import get_current_placement_group

from cluster.config import ClusterConfig
from cluster.engine import ClusterEngine
from engine.async_engine import AsyncEngine, EngineDeadError, QueueFullError
from engine.core import EngineConfig, RequestOutput
from engine.llm_engine import LLMEngine
from engine.process_engine import ProcessEngine
from engine.protocol import Engine
from engine.request import SamplingParams
from model.image_processing import ProcessedImage
from serving.tiers import TierControl

log = logging.getLogger(__name__)

WORKER_BUNDLE_OFFSET = 1  # bundle 0 of a replica's placement group holds the replica itself


@dataclass(frozen=True)
class EngineSpec:
    """What a replica needs to build its engine. `cluster` None: the single-process engine."""

    model_dir: str
    engine: EngineConfig
    cluster: ClusterConfig | None
    max_pending: int
    stream_interval: int = 1  # tokens a stream holds before it sends them (`AsyncEngine`)
    # intra-op threads of the single-process engine's math; None: what Ray set (OMP_NUM_THREADS is
    # the replica's reserved CPUs, rounded down, at least 1)
    threads: int | None = None
    stats_interval_s: float = 5.0  # how stale the per-expert-worker token counts may be
    # the single-process engine steps in a child process (`ProcessEngine`); False: on a thread of
    # the replica (`AsyncEngine`), sharing its GIL
    engine_process: bool = True
    # times in 10 minutes the engine process is replaced, its requests resumed (`ProcessEngine`)
    engine_restarts: int = 3


@dataclass(frozen=True)
class EngineFailure:
    """Why a request did not run, streamed instead of raised so the ingress can answer it."""

    kind: str  # "invalid_request", "queue_full" or "engine_dead"
    message: str


def build_engine(spec: EngineSpec) -> Engine:
    """The engine a replica owns; the cluster engine reserves its workers in this replica's group."""
    if spec.cluster is None:
        return LLMEngine.from_checkpoint(spec.model_dir, spec.engine)
    group = get_current_placement_group()
    if group is None:
        raise ValueError("the cluster engine needs the replica's placement group (placement_group_bundles)")
    return ClusterEngine(
        spec.model_dir,
        spec.cluster,
        spec.engine,
        placement_group=group,
        bundle_offset=WORKER_BUNDLE_OFFSET,
    )


class EngineServer:
    """One engine per replica. `generate` streams `RequestOutput`s, or one `EngineFailure`."""

    def __init__(self, spec: EngineSpec) -> None:
        self.spec = spec
        self.engine = start_engine(spec)
        self._replica = _replica_tag()
        self._expert_tokens: list[int] = []
        self._expert_tokens_at = 0.0
        self._autoscale_task: asyncio.Task | None = None

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Serve's in-place update of the deployment's user_config (`serving.tiers.TierControl`):
        resize the tiers and set the tier autoscaler, without a restart. A bad config raises
        (Serve reports the failed update) and changes nothing."""
        control = TierControl.model_validate(user_config or {})
        is_cluster = self.spec.cluster is not None
        if not is_cluster and (
            control.attention_workers or control.expert_workers or control.autoscaler.enabled
        ):
            raise ValueError("the single-process engine (expert_workers 0) has no tiers to size")
        if not is_cluster:
            return
        autoscaler = control.autoscaler.to_config()

        def apply(engine: ClusterEngine) -> None:
            engine.configure(control.attention_workers, control.expert_workers, control.drain, autoscaler)

        await asyncio.wrap_future(self.engine.call(apply))
        if self._autoscale_task is not None:
            self._autoscale_task.cancel()
            self._autoscale_task = None
        if autoscaler.enabled:
            self._autoscale_task = asyncio.get_running_loop().create_task(
                self._autoscale(autoscaler.interval_s)
            )

    async def _autoscale(self, interval_s: float) -> None:
        """Every interval, on the loop thread: measure, decide, resize."""
        while self.engine.alive:
            await asyncio.sleep(interval_s)
            try:
                await asyncio.wrap_future(self.engine.call(lambda e: e.autoscale(time.monotonic())))
            except Exception as e:  # one bad interval must not stop the autoscaler
                log.warning("tier autoscaler: %s", e)

    async def generate(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        request_id: str,
        images: list[ProcessedImage] | None = None,
    ) -> AsyncIterator[RequestOutput | EngineFailure]:
        """Outputs as the engine produces them. A consumer that goes away (the client
        disconnected, the call was cancelled) aborts the request and frees its KV blocks.
        `images`: the prompt's images, already expanded in it."""
        # closing this generator must close the engine's at once (that is what aborts the request),
        # not whenever the garbage collector gets to it
        outputs = self.engine.generate(prompt_token_ids, params, request_id, images=images or ())
        try:
            async with aclosing(outputs):
                async for out in outputs:
                    yield out
        except QueueFullError as e:
            yield EngineFailure("queue_full", str(e))
        except EngineDeadError as e:
            yield EngineFailure("engine_dead", str(e))
        except ValueError as e:
            yield EngineFailure("invalid_request", str(e))

    async def worker_pids(self) -> dict[str, list[int]]:
        """The processes of this replica's workers, by role (operators, fault tests); "engine":
        the single-process engine's own process, if it has one."""
        if self.spec.cluster is None:
            own = [self.engine.pid] if isinstance(self.engine, ProcessEngine) else []
            return {"attention": [], "expert": [], "engine": own}
        return {**await asyncio.to_thread(self.engine.engine.worker_pids), "engine": []}

    def is_alive(self) -> bool:
        return self.engine.alive

    def check_health(self) -> None:
        """Serve's health check: a dead step loop gets the replica replaced."""
        if not self.engine.alive:
            raise RuntimeError(f"the engine stopped: {self.engine.error!r}")

    async def metrics(self) -> dict[str, Any]:
        """This replica's gauges, and the tokens each expert worker has computed (at most
        `stats_interval_s` old: reading them costs a Ray call to every worker)."""
        gauges = self.engine.gauges()
        if (
            self.spec.cluster is not None
            and time.monotonic() - self._expert_tokens_at > self.spec.stats_interval_s
        ):
            self._expert_tokens_at = time.monotonic()
            self._expert_tokens = await asyncio.to_thread(self._read_expert_tokens)
        return {
            "replica": self._replica,
            "alive": self.engine.alive,
            "num_running": gauges.get("num_running", 0),
            "num_waiting": gauges.get("num_waiting", 0),
            "kv_blocks_used": gauges.get("kv_blocks_used", 0),
            "kv_blocks_total": gauges.get("kv_blocks_total") or self.spec.engine.num_kv_blocks,
            "num_steps": self.engine.num_steps,
            "step_seconds": self.engine.step_times.snapshot(),
            "num_preemptions": gauges.get("num_preemptions", 0),
            "layer_threads": dict(gauges.get("layer_threads") or {}),
            "expert_worker_tokens": list(self._expert_tokens),
            "balancing": dict(gauges.get("balancing") or {}),
            "faults": dict(gauges.get("faults") or {}),
            "workers": dict(gauges.get("workers") or {}),
            "workers_desired": dict(gauges.get("workers_desired") or {}),
            "resize_seconds": list(gauges.get("resize_seconds") or []),
        }

    def _read_expert_tokens(self) -> list[int]:
        """Rows each expert worker computed, summed over MoE layers (one row per token per MoE
        layer: top-1 routing sends each token to exactly one expert of a layer)."""
        try:
            stats = self.engine.engine.stats()
        except Exception as e:  # a scrape must not fail because a worker is busy or gone
            log.warning("could not read expert worker stats: %s", e)
            return self._expert_tokens
        return [
            s.get("rows_computed_total", sum(s["rows_computed_per_layer"].values())) for s in stats["experts"]
        ]

    async def vision_stats(self) -> list[dict[str, Any]]:
        """Per vision worker: calls, images and tiles encoded, seconds encoding (empty without a
        vision tier: the engine encodes in its attention workers or in-process)."""
        if self.spec.cluster is None:  # encodes in-process
            return []
        stats = await asyncio.to_thread(self.engine.engine.stats)
        return list(stats.get("vision", []))

    def close(self) -> None:
        """Stop the step loop and release the engine's workers."""
        if self._autoscale_task is not None:
            self._autoscale_task.cancel()
        self.engine.close()

    def __del__(self) -> None:
        # Ray Serve's shutdown hook for a replica is `__del__`; a replica whose constructor failed
        # has no engine to close
        if hasattr(self, "engine"):
            self.close()


def start_engine(spec: EngineSpec) -> AsyncEngine | ProcessEngine:
    """The replica's engine behind its asyncio front: the single-process engine in a child
    process (or on a thread, without `engine_process`), the cluster engine on a thread."""
    if spec.cluster is None and spec.engine_process:
        factory = functools.partial(LLMEngine.from_checkpoint, spec.model_dir, spec.engine)
        return ProcessEngine(
            factory, spec.threads, spec.max_pending, spec.stream_interval, restarts=spec.engine_restarts
        )
    if spec.threads is not None:  # no more than the cores this process may run on
        torch.set_num_threads(min(spec.threads, len(os.sched_getaffinity(0))))
    return AsyncEngine(build_engine(spec), spec.max_pending, stream_interval=spec.stream_interval)


def _replica_tag() -> str:
    try:
        return serve.get_replica_context().replica_tag
    except Exception:  # outside a Serve replica (tests that build the class directly)
        return "local"
