"""Scenario files: what an autoscaling experiment deploys, the load it offers, what it varies.

A scenario is YAML, validated here before anything is deployed, so a typo fails in a second and
names the field. `app:` is the Serve application's own arguments (`ServeAppConfig`, as in
`serve_config.yaml`); `load:` is the open-loop client; each entry of `variants:` overrides parts
of both (a deep merge) and runs as its own deployment, one after another. Example:

    name: autoscale-step
    checkpoint: {preset: tiny-maverick, expert_skew: 1.2}   # made once, cached
    app:
      expert_workers: 2
      autoscaling: {min_replicas: 1, max_replicas: 2, target_ongoing_requests: 4, upscale_delay_s: 2}
    load:
      duration_s: 60
      arrivals: step:1:6:20          # the simulator's syntax (sim/workload.py)
      prompt_tokens: uniform:8:48
      output_tokens: lognormal:24:0.5
      max_output_tokens: 64
    variants:
      - name: fixed-1
        app: {autoscaling: {min_replicas: 1, max_replicas: 1}}
      - name: autoscale
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from model.presets import PRESETS
from serving.app import ServeAppConfig
from sim.workload import ArrivalSpec, LengthSpec


class CheckpointArgs(BaseModel):
    """A preset checkpoint made (once, cached) when `app.model` is not given."""

    model_config = ConfigDict(extra="forbid")
    preset: str = "tiny-maverick"
    seed: int = 0
    expert_skew: float = Field(0.0, ge=0)
    skew_seed: int = 0

    @field_validator("preset")
    @classmethod
    def _known(cls, preset: str) -> str:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r} (allowed: {', '.join(sorted(PRESETS))})")
        return preset


class LoadArgs(BaseModel):
    """Open-loop arrivals for `duration_s` seconds; every request is a streamed completion of
    random token ids that runs to its drawn output length (ignore_eos), so lengths are exact."""

    model_config = ConfigDict(extra="forbid")
    duration_s: float = Field(gt=0)
    arrivals: str = Field(
        description="constant:R | poisson:R | step:R0:R1:T | ramp:R0:R1:T | bursty:... | diurnal:..."
    )
    prompt_tokens: str = "uniform:8:32"
    output_tokens: str = "uniform:8:32"
    max_prompt_tokens: int | None = Field(None, ge=1)
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(0.0, ge=0)
    request_timeout_s: float = Field(300.0, gt=0)

    @field_validator("arrivals")
    @classmethod
    def _arrivals(cls, text: str) -> str:
        ArrivalSpec.parse(text)
        return text

    @field_validator("prompt_tokens", "output_tokens")
    @classmethod
    def _lengths(cls, text: str) -> str:
        LengthSpec.parse(text)
        return text

    @property
    def arrival_spec(self) -> ArrivalSpec:
        return ArrivalSpec.parse(self.arrivals)

    @property
    def prompt_spec(self) -> LengthSpec:
        return LengthSpec.parse(self.prompt_tokens, self.max_prompt_tokens)

    @property
    def output_spec(self) -> LengthSpec:
        return LengthSpec.parse(self.output_tokens, self.max_output_tokens)


class SLO(BaseModel):
    """Goodput counts the requests that meet every target given."""

    model_config = ConfigDict(extra="forbid")
    ttft_ms: float | None = Field(None, gt=0)
    tpot_ms: float | None = Field(None, gt=0)


class VariantArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    app: dict[str, Any] = Field(default_factory=dict)
    load: dict[str, Any] = Field(default_factory=dict)


class Scenario(BaseModel):
    """A whole scenario file."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    description: str = ""
    seed: int = 0
    checkpoint: CheckpointArgs = Field(default_factory=CheckpointArgs)
    app: dict[str, Any] = Field(default_factory=dict)
    load: dict[str, Any]
    sample_interval_s: float = Field(1.0, gt=0, description="how often the deployment is read")
    cooldown_s: float = Field(0.0, ge=0, description="keep recording after the last reply (scale-down)")
    drain_timeout_s: float = Field(300.0, gt=0, description="wait this long for replies after the load")
    slo: SLO = Field(default_factory=SLO)
    variants: list[VariantArgs] = Field(default_factory=list)

    @model_validator(mode="after")
    def _variants_resolve(self) -> Scenario:
        names = [v.name for v in self.variants]
        if len(set(names)) != len(names):
            raise ValueError(f"variant names must be unique, got {names}")
        self.runs()  # every variant's merged app and load must validate now, not mid-experiment
        return self

    def runs(self) -> list[Run]:
        """One run per variant (a single run named `base` without variants), fully validated."""
        variants = self.variants or [VariantArgs(name="base")]
        out = []
        for v in variants:
            where = f"variant {v.name!r}: " if self.variants else ""
            try:
                app = ServeAppConfig.model_validate(deep_merge(self.app, v.app))
            except ValidationError as e:
                raise ValueError(f"{where}{_describe(e, 'app')}") from None
            try:
                load = LoadArgs.model_validate(deep_merge(self.load, v.load))
            except ValidationError as e:
                raise ValueError(f"{where}{_describe(e, 'load')}") from None
            out.append(Run(v.name, app, load))
        return out


@dataclass(frozen=True)
class Run:
    """One variant, ready to deploy: the application's arguments and the load."""

    name: str
    app: ServeAppConfig
    load: LoadArgs

    def describe(self) -> str:
        a = self.app.tiers.autoscaler
        tiers = (
            f"; tier autoscaler: attention {a.min_attention_workers}-{a.max_attention_workers}, "
            f"expert {a.min_expert_workers}-{a.max_expert_workers} workers"
            if a.enabled
            else ""
        )
        return f"{self.app.autoscaling.describe()}; {self.app.layout()}{tiers}"


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """`override` on top of `base`; nested mappings merge, anything else replaces."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_scenario(path: str | Path) -> Scenario:
    """Read and validate a scenario file; errors name the file and the field."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"scenario {str(path)!r}: no such file") from None
    except yaml.YAMLError as e:
        raise ValueError(f"scenario {str(path)!r}: not valid YAML ({e})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"scenario {str(path)!r}: expected a mapping at the top, got {type(raw).__name__}")
    try:
        return Scenario.model_validate(raw)
    except ValidationError as e:
        raise ValueError(f"scenario {str(path)!r}: {_describe(e)}") from None
    except ValueError as e:
        raise ValueError(f"scenario {str(path)!r}: {e}") from None


def _describe(e: ValidationError, section: str = "") -> str:
    """Pydantic's errors, `; `-joined: `load.arrivals: bad arrival spec ...`."""
    parts = []
    for err in e.errors():
        where = ".".join(str(x) for x in (section, *err["loc"]) if x != "")
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"{where}: {msg}" if where else msg)
    return "; ".join(parts)
