"""Tier sizes and the tier autoscaler as Serve settings: the engine deployment's `user_config`.

The application's `tiers` argument is the initial user_config. Serve applies a changed
`user_config` to the running replicas through `reconfigure()`, without a restart, so `serve
deploy` with the deployment's user_config edited (or the same edit in a KubeRay RayService's
serveConfigV2) resizes the tiers in place:

    applications:
      - name: llama4-ep
        import_path: serving.app:build_app
        args: {...}                      # unchanged: a change here restarts the replicas
        deployments:
          - name: EngineServer
            user_config: {attention_workers: 2, expert_workers: 4, autoscaler: {enabled: false}}

Only the cluster engine has tiers: the single-process engine accepts no sizes.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from engine.autoscale import AutoscalerConfig, TierBounds


class TierAutoscalerArgs(BaseModel):
    """The tier autoscaler (`engine.autoscale`): off by default."""

    model_config = ConfigDict(extra="forbid")
    enabled: bool = False
    min_expert_workers: int = Field(1, ge=1)
    max_expert_workers: int = Field(8, ge=1)
    min_attention_workers: int = Field(1, ge=1)
    max_attention_workers: int = Field(4, ge=1)
    target_tokens_per_expert_worker: float = Field(64.0, gt=0)
    target_kv_usage: float = Field(0.7, gt=0, le=1)
    max_waiting_per_attention_worker: float = Field(2.0, ge=0)
    tolerance: float = Field(0.25, ge=0, lt=1)
    upscale_delay_s: float = Field(5.0, ge=0)
    downscale_delay_s: float = Field(30.0, ge=0)
    cooldown_s: float = Field(15.0, ge=0)
    interval_s: float = Field(1.0, gt=0)

    @model_validator(mode="after")
    def _bounds(self) -> TierAutoscalerArgs:
        self.to_config()  # the bounds' own checks
        return self

    def to_config(self) -> AutoscalerConfig:
        return AutoscalerConfig(
            enabled=self.enabled,
            expert=TierBounds(self.min_expert_workers, self.max_expert_workers),
            attention=TierBounds(self.min_attention_workers, self.max_attention_workers),
            target_tokens_per_expert_worker=self.target_tokens_per_expert_worker,
            target_kv_usage=self.target_kv_usage,
            max_waiting_per_attention_worker=self.max_waiting_per_attention_worker,
            tolerance=self.tolerance,
            upscale_delay_s=self.upscale_delay_s,
            downscale_delay_s=self.downscale_delay_s,
            cooldown_s=self.cooldown_s,
            interval_s=self.interval_s,
        )


class TierControl(BaseModel):
    """The engine deployment's user_config. None: keep the size the replica has."""

    model_config = ConfigDict(extra="forbid")
    attention_workers: int | None = Field(None, ge=1)
    expert_workers: int | None = Field(None, ge=1)
    drain: bool = Field(True, description="a leaving attention worker finishes its requests first")
    autoscaler: TierAutoscalerArgs = Field(default_factory=TierAutoscalerArgs)
