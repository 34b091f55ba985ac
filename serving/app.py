"""The Ray Serve application: its validated arguments, the two deployments, and the builder.

`build_app` is the `import_path` target of `serve_config.yaml` (`serve run`, `serve deploy`,
KubeRay): Serve validates the `args:` block into `ServeAppConfig` before calling it. The engine
deployment's replicas each own one engine; in the disaggregated layout a replica's placement
group holds the replica (bundle 0) and its workers (bundles 1..M+N).
"""

# No `from __future__ import annotations` here: Serve reads the builder's parameter annotation
# at run time to validate its arguments, and needs the class, not a string.

import math
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from ray import serve
from ray.serve import Application
from starlette.requests import Request
from starlette.responses import Response

from attention.threads import PARALLEL_MIN_TOKENS, check_parallel_min_tokens
from cluster.config import ClusterConfig
from cluster.placement_groups import bundles
from engine.core import EngineConfig
from engine.kv_sizing import parse_kv_cache_memory
from model.synthetic import default_checkpoint
from router.rebalancing import RebalanceConfig
from serving.engine_server import EngineServer, EngineSpec
from serving.frontend import EngineCalls, Frontend, HandleCalls, IngressSpec, LocalCalls
from serving.grpc_service import GrpcService
from serving.http_routes import OpenAIRoutes
from serving.media import MediaConfig
from serving.tiers import TierControl

REPLICA_CPUS = 0.01  # the engine replica only drives its workers (disaggregated layout)
API_KEY_ENV = "LLAMA4_EP_API_KEY"  # the API key when the config gives none


class EngineArgs(BaseModel):
    """Per-replica engine settings (see `engine.core.EngineConfig`)."""

    model_config = ConfigDict(extra="forbid")
    num_kv_blocks: int = Field(4096, ge=1)
    block_size: int = Field(16, ge=1)
    max_num_seqs: int = Field(64, ge=1)
    token_budget: int = Field(512, ge=1)
    dtype: str = Field("auto", description="auto: bfloat16 on GPUs, float32 on CPUs")
    kv_cache_memory: float | str | None = Field(
        None,
        description="KV cache per attention worker: a fraction in (0, 1] of the device memory free "
        "after the weights, or a size (40GiB); sizes the pool instead of num_kv_blocks",
    )
    parallel_min_tokens: int | Literal["auto"] = Field(
        PARALLEL_MIN_TOKENS,
        description="on CPUs, whether a step's layers run on one thread or on every thread: auto "
        "measures which is faster per size of step; N runs steps of at least N tokens on every "
        "thread, smaller ones on one",
    )

    @field_validator("parallel_min_tokens")
    @classmethod
    def _threads(cls, value: int | str) -> int | str:
        return check_parallel_min_tokens(value)

    @field_validator("kv_cache_memory")
    @classmethod
    def _kv_memory(cls, value: float | str | None) -> float | None:
        return None if value is None else parse_kv_cache_memory(value)

    def to_config(self, device: str = "cpu") -> EngineConfig:
        return EngineConfig(**self.model_dump(), device=device)


class AutoscalingArgs(BaseModel):
    """Engine replicas: a fixed count when min == max, else Serve autoscaling on ongoing requests."""

    model_config = ConfigDict(extra="forbid")
    min_replicas: int = Field(1, ge=1)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(32.0, gt=0)
    # None: Serve's own defaults (upscale 30 s, downscale 600 s, metrics every 10 s over 30 s)
    initial_replicas: int | None = Field(None, ge=1)
    upscale_delay_s: float | None = Field(None, ge=0)
    downscale_delay_s: float | None = Field(None, ge=0)
    metrics_interval_s: float | None = Field(None, gt=0)
    look_back_period_s: float | None = Field(None, gt=0)

    def describe(self) -> str:
        """`1 engine replica` or `1-2 engine replicas (target 4 ongoing requests)`."""
        if self.min_replicas == self.max_replicas:
            return f"{self.min_replicas} engine replica" + ("s" if self.min_replicas > 1 else "")
        return (
            f"{self.min_replicas}-{self.max_replicas} engine replicas "
            f"(target {self.target_ongoing_requests:g} ongoing requests)"
        )

    @model_validator(mode="after")
    def _order(self) -> "AutoscalingArgs":
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) < min_replicas ({self.min_replicas})")
        if self.initial_replicas is not None and not (
            self.min_replicas <= self.initial_replicas <= self.max_replicas
        ):
            raise ValueError(
                f"initial_replicas ({self.initial_replicas}) must be within "
                f"[min_replicas, max_replicas] = [{self.min_replicas}, {self.max_replicas}]"
            )
        return self


class RebalanceArgs(BaseModel):
    """Dynamic replication of hot experts (see `router.rebalancing.RebalanceConfig`). Load statistics
    are collected either way; `enabled: false` keeps the initial placement."""

    model_config = ConfigDict(extra="forbid")
    enabled: bool = False
    window_steps: int = Field(64, ge=1)
    interval_steps: int = Field(32, ge=1)
    imbalance_threshold: float = Field(0.25, ge=0)
    min_gain: float = Field(0.05, ge=0)
    report_every: int = Field(8, ge=1)
    shift_steps: int = Field(8, ge=1, description="newest steps tested for a change of the hot experts")
    shift_threshold: float | None = Field(
        3.0,
        gt=0,
        allow_inf_nan=False,
        description="how many times sampling noise counts as a change; null: off",
    )

    def to_config(self) -> RebalanceConfig:
        return RebalanceConfig(**self.model_dump())


class MediaArgs(BaseModel):
    """Where a request's images may come from, how many and how large (see `serving.media`)."""

    model_config = ConfigDict(extra="forbid")
    max_images_per_prompt: int = Field(8, ge=1)
    max_image_bytes: int = Field(20 * 2**20, ge=1, description="encoded size of one image")
    max_image_pixels: int = Field(40_000_000, ge=1, description="decoded width x height of one image")
    fetch_timeout_s: float = Field(10.0, gt=0, description="fetching one http(s) image URL")
    allow_http: bool = Field(True, description="fetch http(s) image URLs (data: URLs are always taken)")
    allowed_media_domains: list[str] | None = Field(
        None, description="hosts images are fetched from; None: any"
    )
    allowed_local_media_path: str | None = Field(
        None, description="file:// image URLs below this folder only; None: no local files"
    )

    def to_config(self) -> MediaConfig:
        fields = self.model_dump()
        domains = fields.pop("allowed_media_domains")
        return MediaConfig(**fields, allowed_media_domains=None if domains is None else tuple(domains))


class ServeAppConfig(BaseModel):
    """The application's arguments (the `args:` block of serve_config.yaml)."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = Field(None, description="checkpoint directory; None: the tiny-maverick default")
    served_model_name: str | None = Field(None, description="the `model` clients send; default: dir name")
    attention_workers: int = Field(1, ge=1)
    expert_workers: int = Field(2, ge=0, description="0: the single-process (colocated) engine")
    colocate_ingress: bool = Field(
        False,
        description="the single-process engine and the ingress in one replica: no Ray hop between "
        "them, one message per token fewer (expert_workers 0 only)",
    )
    redundant_slots: int = Field(0, ge=0, description="expert slots per worker beyond experts / workers")
    vision_workers: int = Field(
        0, ge=0, description="vision-encoder actors per engine replica; 0: the attention workers encode"
    )
    media: MediaArgs = Field(default_factory=MediaArgs)
    rebalance: RebalanceArgs = Field(default_factory=RebalanceArgs)
    device: Literal["cpu", "cuda"] = "cpu"
    transport: Literal["auto", "sockets", "collective"] = Field(
        "auto",
        description="how the dispatcher's rows travel between workers: auto is sockets on CPUs (Unix on "
        "one host, TCP across hosts) and NCCL on GPUs; collective is torch.distributed's (gloo on CPUs)",
    )
    cpus_per_worker: float | None = Field(None, gt=0, description="None: share the cluster's CPUs")
    engine: EngineArgs = Field(default_factory=EngineArgs)
    autoscaling: AutoscalingArgs = Field(default_factory=AutoscalingArgs)
    max_pending: int = Field(
        256, ge=1, description="requests one engine holds (running + waiting); more: 429 / RESOURCE_EXHAUSTED"
    )
    threads: int | None = Field(
        None,
        ge=1,
        description="intra-op threads of the single-process engine (expert_workers 0); None: its "
        "replica's share of the cluster's CPUs (cluster workers: LLAMA4_EP_WORKER_THREADS)",
    )
    engine_process: bool = Field(
        True,
        description="the single-process engine (expert_workers 0) steps in a child process of its "
        "replica, with a GIL of its own; False: on a thread of the replica",
    )
    engine_restarts: int = Field(
        3,
        ge=0,
        description="the engine process (engine_process) is replaced this many times in 10 minutes, "
        "its requests going on where they stopped; past that, Serve replaces the replica",
    )
    stream_interval: int = Field(
        1,
        ge=1,
        description="tokens a stream holds before it sends them (its first token and its end go at once)",
    )
    max_ongoing_requests: int | None = Field(
        None,
        ge=1,
        description="Serve's cap per engine replica; None: max_pending + 32, so the engine answers",
    )
    max_queued_requests: int = Field(1024, ge=-1, description="waiting in Serve for a replica; -1: no limit")
    ingress_max_ongoing_requests: int = Field(1024, ge=1)
    api_key: str | None = Field(
        None,
        description=f"clients must send it (HTTP bearer, gRPC authorization); None: ${API_KEY_ENV} or none",
    )
    strict_requests: bool = Field(False, description="unknown request fields: 400 instead of a warning")
    allowed_origins: list[str] = Field(default_factory=list, description="CORS origins; [] off, ['*'] any")
    tiers: TierControl = Field(
        default_factory=TierControl,
        description="the engine deployment's initial user_config: tier sizes and the tier autoscaler",
    )

    @model_validator(mode="after")
    def _check(self) -> "ServeAppConfig":
        if self.max_queued_requests == 0:
            raise ValueError("max_queued_requests must be -1 (no limit) or >= 1")
        if self.expert_workers == 0 and (self.redundant_slots or self.rebalance.enabled):
            raise ValueError("redundant_slots and rebalance need expert workers (expert_workers >= 1)")
        t = self.tiers
        if self.expert_workers == 0 and (t.attention_workers or t.expert_workers or t.autoscaler.enabled):
            raise ValueError("tiers need the cluster engine (expert_workers >= 1)")
        if self.expert_workers and self.colocate_ingress:
            raise ValueError("colocate_ingress needs the single-process engine (expert_workers 0)")
        if self.expert_workers and self.threads is not None:
            raise ValueError(
                "threads sizes the single-process engine (expert_workers 0); cluster workers take "
                "LLAMA4_EP_WORKER_THREADS"
            )
        if self.expert_workers and not self.engine_process:
            raise ValueError(
                "engine_process places the single-process engine (expert_workers 0); the cluster "
                "engine steps on a thread of its replica"
            )
        if self.expert_workers == 0 and self.vision_workers:
            raise ValueError(
                "vision_workers need the disaggregated engine (expert_workers >= 1); "
                "the single-process engine encodes images in-process"
            )
        self.engine.to_config(self.device)  # EngineConfig's own checks (dtype, ...)
        self.media.to_config()
        self.cluster_config()
        return self

    def layout(self) -> str:
        """One engine replica's workers, in words (what `serve` and `experiment` print)."""
        if self.expert_workers == 0:
            on_thread = "" if self.engine_process else ", stepped on a thread of its replica"
            ingress = ", ingress in its replica" if self.colocate_ingress else ""
            return f"single-process engine{on_thread}{ingress}"
        n = self.vision_workers
        vision = f" + {n} vision worker{'s' if n > 1 else ''}" if n else ""
        return (
            f"{self.attention_workers} attention + {self.expert_workers} expert workers{vision}, "
            f"{self.redundant_slots} redundant slots per worker, "
            f"rebalancing {'on' if self.rebalance.enabled else 'off'}"
        )

    @property
    def model_name(self) -> str:
        """What clients put in `model` (needs `model` resolved: see `resolve_model`)."""
        return self.served_model_name or Path(self.model or "").name

    def tier_control(self) -> dict[str, Any] | None:
        """The engine deployment's initial user_config (`tiers`). Replicas start with
        `attention_workers` and `expert_workers`; to resize them in place, override the
        EngineServer deployment's user_config in the Serve config (`deployments:`): Serve then
        calls `reconfigure` on the running replicas. Editing the args restarts them."""
        return self.tiers.model_dump() if self.expert_workers else None

    def cluster_config(self) -> ClusterConfig | None:
        if self.expert_workers == 0:
            return None
        return ClusterConfig(
            self.attention_workers,
            self.expert_workers,
            redundant_slots_per_worker=self.redundant_slots,
            device=self.device,
            cpus_per_worker=self.cpus_per_worker,
            transport=self.transport,
            rebalance=self.rebalance.to_config(),
            num_vision_workers=self.vision_workers,
        )


def replica_resources(cfg: ServeAppConfig, cpus_available: float, gpus_available: float) -> dict[str, Any]:
    """Deployment options that reserve one replica's resources (pure; CPU-tested).

    Disaggregated: a placement group per replica, bundle 0 for the replica, then one bundle per
    worker (attention ranks first). The cluster's CPUs are shared by `max_replicas` replicas
    unless `cpus_per_worker` is given. Colocated: the replica itself runs the model."""
    cluster = cfg.cluster_config()
    replicas = cfg.autoscaling.max_replicas
    if cluster is None:
        gpus = 1.0 if cfg.device == "cuda" else 0.0
        cpus = cfg.cpus_per_worker or max(0.01, min(1.0, math.floor(cpus_available / replicas * 100) / 100))
        return {"ray_actor_options": {"num_cpus": cpus, "num_gpus": gpus}}
    share = (cpus_available - REPLICA_CPUS * replicas) / replicas
    workers = bundles(cluster, share, gpus_available / replicas)
    return {
        "ray_actor_options": {"num_cpus": REPLICA_CPUS},
        "placement_group_bundles": [{"CPU": REPLICA_CPUS}, *workers],
        "placement_group_strategy": cluster.placement_strategy,
    }


def engine_threads(cfg: ServeAppConfig, cpus_available: float) -> int | None:
    """Intra-op threads of a single-process engine replica: `threads`, else its share of the
    cluster's CPUs (at least 1). The replica reserves at most 1 CPU so that other deployments
    still fit, and Ray then sets OMP_NUM_THREADS=1, which left the lm_head, most of a decode
    step here, on one of the machine's cores. The cluster engine computes in its workers: None."""
    if cfg.expert_workers:
        return None
    return cfg.threads or max(1, math.floor(cpus_available / cfg.autoscaling.max_replicas))


def scaling_options(cfg: ServeAppConfig) -> dict[str, Any]:
    a = cfg.autoscaling
    if a.min_replicas == a.max_replicas:
        return {"num_replicas": a.min_replicas}
    return {"autoscaling_config": a.model_dump(exclude_none=True)}


class Ingress:
    """HTTP (OpenAI-compatible, through `__call__`) and gRPC (methods named as the RPCs)."""

    def __init__(self, engine: Any, spec: IngressSpec) -> None:
        """`engine`: the engine deployment's handle."""
        self._serve(HandleCalls(engine), spec)

    def _serve(self, engine: EngineCalls, spec: IngressSpec) -> None:
        frontend = Frontend(engine, spec)
        self.http = OpenAIRoutes(frontend)
        self.grpc = GrpcService(frontend)

    async def __call__(self, request: Request) -> Response:
        return await self.http.handle(request)

    async def Generate(self, request: Any, grpc_context: Any) -> Any:  # noqa: N802 - the RPC's name
        return await self.grpc.generate(request, grpc_context)

    async def GenerateStream(self, request: Any, grpc_context: Any) -> AsyncIterator[Any]:  # noqa: N802
        async for message in self.grpc.generate_stream(request, grpc_context):
            yield message

    async def Check(self, request: Any, grpc_context: Any) -> Any:  # noqa: N802 - grpc.health.v1
        return await self.grpc.health_check(request, grpc_context)

    async def Watch(self, request: Any, grpc_context: Any) -> AsyncIterator[Any]:  # noqa: N802
        async for message in self.grpc.health_watch(request, grpc_context):
            yield message

    async def List(self, request: Any, grpc_context: Any) -> Any:  # noqa: N802 - grpc.health.v1
        return await self.grpc.health_list(request, grpc_context)


class ColocatedServer(Ingress):
    """The ingress and a single-process engine in one replica (`colocate_ingress`): a token goes
    from the engine's loop thread to the HTTP or gRPC response in-process, where the two-deployment
    layout sends it from one replica to the other through Ray. Each replica holds its own engine,
    so /metrics and /health answer for the replica that serves them."""

    def __init__(self, engine: EngineSpec, spec: IngressSpec) -> None:
        self.engine_server = EngineServer(engine)
        self._serve(LocalCalls(self.engine_server), spec)

    def check_health(self) -> None:
        self.engine_server.check_health()

    async def worker_pids(self) -> dict[str, list[int]]:
        return await self.engine_server.worker_pids()

    def __del__(self) -> None:
        if hasattr(self, "engine_server"):
            self.engine_server.close()


EngineDeployment = serve.deployment(name="EngineServer", health_check_period_s=5)(EngineServer)
IngressDeployment = serve.deployment(name="Ingress", ray_actor_options={"num_cpus": 0})(Ingress)
ColocatedDeployment = serve.deployment(name="ColocatedServer", health_check_period_s=5)(ColocatedServer)


def build_app(config: ServeAppConfig) -> Application:
    """The application for `serve.run`, `serve run` and `serve deploy`."""
    import ray

    if isinstance(config, dict):
        config = ServeAppConfig.model_validate(config)
    model_dir = resolve_model(config.model)
    resources = ray.cluster_resources() if ray.is_initialized() else {"CPU": 1.0}
    # the single-process engine (expert_workers 0) computes on the replica's own GPU
    engine_cfg = config.engine.to_config(config.device)
    spec = EngineSpec(
        model_dir,
        engine_cfg,
        config.cluster_config(),
        config.max_pending,
        config.stream_interval,
        engine_threads(config, resources.get("CPU", 0.0)),
        engine_process=config.engine_process,
        engine_restarts=config.engine_restarts,
    )
    options = {
        "max_ongoing_requests": config.max_ongoing_requests or config.max_pending + 32,
        "max_queued_requests": config.max_queued_requests,
        **scaling_options(config),
        **replica_resources(config, resources.get("CPU", 0.0), resources.get("GPU", 0.0)),
    }
    name = config.model_copy(update={"model": model_dir}).model_name
    api_key = config.api_key or os.environ.get(API_KEY_ENV) or None
    ingress_spec = IngressSpec(
        model_dir,
        name,
        api_key,
        config.strict_requests,
        tuple(config.allowed_origins),
        config.media.to_config(),
    )
    if config.colocate_ingress:
        return ColocatedDeployment.options(**options).bind(spec, ingress_spec)
    engine = EngineDeployment.options(user_config=config.tier_control(), **options).bind(spec)
    ingress = IngressDeployment.options(max_ongoing_requests=config.ingress_max_ongoing_requests)
    return ingress.bind(engine, ingress_spec)


def resolve_model(model: str | None) -> str:
    """The checkpoint directory, absolute; None: the tiny-maverick default (made once, cached)."""
    path = Path(model).expanduser().resolve() if model else default_checkpoint()
    if not (path / "config.json").exists():
        raise ValueError(f"model {str(path)!r}: no config.json there")
    return str(path)
