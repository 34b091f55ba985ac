"""An engine whose process dies on a poison prompt, for `ProcessEngine`'s fault tests: a request
that kills every engine process it is added to, the way a request that trips a fatal bug would.
The child imports this module to build it (a factory must pickle)."""

from __future__ import annotations

import os
from collections.abc import Sequence

from engine.core import EngineConfig
from engine.llm_engine import LLMEngine, build_local_core
from engine.request import SamplingParams

POISON = 7  # a prompt of this one token kills the process as it is added


class CrashingEngine(LLMEngine):
    def add(self, prompt_token_ids: Sequence[int], params: SamplingParams, request_id=None, **extra) -> str:
        if list(prompt_token_ids) == [POISON]:
            os._exit(3)
        return super().add(prompt_token_ids, params, request_id, **extra)


def build(model_dir: str, engine_cfg: EngineConfig) -> CrashingEngine:
    return CrashingEngine(build_local_core(model_dir, engine_cfg))
