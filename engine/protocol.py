"""The `Engine` protocol: the verbs both engines offer, and what the serving layer relies on.

`llm_engine.LLMEngine` (one process) and `cluster.engine.ClusterEngine` (Ray workers) implement
it in full; `AsyncEngine` drives either one from its step-loop thread.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from engine.core import RequestOutput
from engine.request import FinishReason, SamplingParams
from model.image_processing import ProcessedImage


class EngineUnavailable(RuntimeError):
    """An engine that cannot serve any more (its workers are lost); the message is written for
    clients. Requests should be retried: Serve replaces the replica."""


@dataclass
class FaultStats:
    """What /metrics shows about an engine's lost workers and its recoveries (the cluster
    engine's workers; `ProcessEngine`'s one engine process, role "engine")."""

    worker_failures: dict[str, int] = field(default_factory=lambda: {"attention": 0, "expert": 0})
    recovery_seconds: list[float] = field(default_factory=list)
    requests_replayed: int = 0

    def figures(self, epoch: int) -> dict:
        return {
            "worker_failures": dict(self.worker_failures),
            "recoveries": len(self.recovery_seconds),
            "recovery_seconds": list(self.recovery_seconds),
            "requests_replayed": self.requests_replayed,
            "epoch": epoch,
        }


@runtime_checkable
class Engine(Protocol):
    def add(
        self,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        request_id: str | None = None,
        images: Sequence[ProcessedImage] = (),
    ) -> str:
        """Queue a request; returns its id. A request that can never run raises ValueError.
        `images`: the prompt's images (its `<|image|>` placeholders already expanded)."""
        ...

    def abort(self, request_id: str) -> None:
        """Forget a request and free its KV blocks (at the next step at the latest)."""
        ...

    def step(self) -> list[RequestOutput]:
        """One step: what every request that advanced produced."""
        ...

    @property
    def has_unfinished(self) -> bool: ...

    def metrics(self) -> dict[str, Any]:
        """Cheap gauges, as of now or the last step: running, waiting, KV blocks used/total."""
        ...

    def stats(self) -> dict[str, Any]:
        """Per-worker counters (may cost a call to every worker): {"attention": [...],
        "experts": [...]}, each expert entry with `rows_computed_per_layer`."""
        ...

    def close(self) -> None:
        """Release the engine's workers and memory; the engine is unusable afterwards."""
        ...


@dataclass
class Completion:
    """One request run to completion by `generate`."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None


def generate(
    engine: Engine,
    prompts: Iterable[Sequence[int]],
    params: SamplingParams | Sequence[SamplingParams],
    images: Sequence[Sequence[ProcessedImage]] | None = None,
) -> list[Completion]:
    """Run a batch of prompts to completion on any engine; results in prompt order. `params` is
    one SamplingParams for all, or one per prompt; `images`, if given, the images of each prompt."""
    prompts = [list(p) for p in prompts]
    per = list(params) if isinstance(params, Sequence) else [params] * len(prompts)
    per_images = list(images) if images is not None else [()] * len(prompts)
    results = {}
    for prompt, p, imgs in zip(prompts, per, per_images, strict=True):
        request_id = engine.add(prompt, p, images=imgs) if imgs else engine.add(prompt, p)
        results[request_id] = Completion(request_id, prompt)
    while engine.has_unfinished:
        for out in engine.step():
            if out.request_id in results:
                results[out.request_id].token_ids.extend(out.new_token_ids)
                results[out.request_id].finish_reason = out.finish_reason
    return list(results.values())
