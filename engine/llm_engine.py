"""The single-process (colocated) engine: one `EngineCore` with every expert in this process.

engine = LLMEngine.from_checkpoint(model_dir)
completions = engine.generate(prompts, SamplingParams(max_tokens=16))
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from attention.decoder import Llama4Decoder, MoEBackend, load_non_expert_weights
from attention.vision import VisionEncoder
from engine.core import EngineConfig, EngineCore, RequestOutput
from engine.protocol import Completion, generate
from engine.request import Request, SamplingParams
from experts.slots import LocalExperts
from model.checkpoint import CheckpointReader
from model.device import resolve_device, resolve_dtype
from model.image_processing import ProcessedImage
from model.tokenizer import Tokenizer


def build_local_core(
    model_dir: str | Path, engine_cfg: EngineConfig | None = None, experts: MoEBackend | None = None
) -> EngineCore:
    """A colocated engine core from a checkpoint directory (experts local unless given), every
    weight read straight to `engine_cfg.device` in its compute dtype; with a vision tower in the
    checkpoint it encodes images in-process."""
    engine_cfg = engine_cfg or EngineConfig()
    device = resolve_device(engine_cfg.device)
    dtype = resolve_dtype(engine_cfg.dtype, device)
    with CheckpointReader(model_dir) as reader:
        weights = load_non_expert_weights(reader, dtype, device)
        experts = experts or LocalExperts.from_checkpoint(reader, dtype, device)
        vision = VisionEncoder.from_checkpoint(reader, dtype, device) if reader.has_vision else None
        cfg = reader.config
    decoder = Llama4Decoder(cfg, weights, experts, engine_cfg.parallel_min_tokens)
    return EngineCore(cfg, decoder, engine_cfg, Tokenizer(model_dir), vision=vision)


class LLMEngine:
    """Single-process front: submit prompts, step until done."""

    def __init__(self, core: EngineCore) -> None:
        self.core = core
        self._ids = itertools.count()

    @classmethod
    def from_checkpoint(cls, model_dir: str | Path, engine_cfg: EngineConfig | None = None) -> LLMEngine:
        return cls(build_local_core(model_dir, engine_cfg))

    def add(
        self,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        request_id: str | None = None,
        images: Sequence[ProcessedImage] = (),
        output_token_ids: Sequence[int] = (),
    ) -> str:
        """`images`: the prompt's images, encoded here at admission (in-process).
        `output_token_ids`: what the request generated before (resumed after its engine was lost):
        it catches up on prompt and those tokens, then goes on."""
        request_id = request_id or f"req-{next(self._ids)}"
        self.core.add_request(
            Request(
                request_id,
                list(prompt_token_ids),
                params,
                output_token_ids=list(output_token_ids),
                images=tuple(images),
            )
        )
        return request_id

    def abort(self, request_id: str) -> None:
        self.core.abort(request_id)

    def step(self) -> list[RequestOutput]:
        return self.core.step()

    @property
    def has_unfinished(self) -> bool:
        return self.core.has_unfinished

    def metrics(self) -> dict[str, Any]:
        return self.core.metrics()

    def stats(self) -> dict[str, Any]:
        """The colocated layout has one attention rank and one "expert worker": this process."""
        experts = self.core.decoder.experts
        rows = dict(experts.rows_per_layer) if isinstance(experts, LocalExperts) else {}
        return {
            "attention": [{"dp_rank": 0}],
            "experts": [{"worker_idx": 0, "rows_computed_per_layer": rows}],
        }

    def close(self) -> None:
        """Nothing runs outside this process; dropping the core frees its weights and KV pool."""
        self.core = None

    def generate(
        self,
        prompts: Iterable[Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams],
        images: Sequence[Sequence[ProcessedImage]] | None = None,
    ) -> list[Completion]:
        """Run a batch of prompts to completion; results in prompt order."""
        return generate(self, prompts, params, images)
