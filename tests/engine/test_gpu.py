"""The engine on a real GPU (`-m gpu`; skipped, saying why, without CUDA). The same path on a fake
GPU, with every tensor and host sync checked: tests/engine/test_device.py."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from engine.core import EngineConfig
from engine.llm_engine import LLMEngine
from engine.request import SamplingParams
from experts.swiglu import _grouped, _per_slot, grouped_mm_works
from model.hf_reference import load_hf_causal_lm
from tests.helpers import random_prompts

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda", 0)


def test_greedy_tokens_on_the_gpu_equal_transformers_on_the_gpu(tiny_checkpoint):
    hf = load_hf_causal_lm(tiny_checkpoint).to(CUDA)
    engine = LLMEngine.from_checkpoint(tiny_checkpoint, EngineConfig(device="cuda", dtype="float32"))
    assert engine.core.pool.k.device == CUDA and engine.core.decoder.weights.embed.device == CUDA
    prompts = random_prompts([37, 5, 21], seed=11)
    results = engine.generate(prompts, SamplingParams(max_tokens=16, ignore_eos=True))
    for prompt, result in zip(prompts, results, strict=True):
        with torch.no_grad():
            out = hf.generate(
                torch.tensor([prompt]).to(CUDA),
                max_new_tokens=16,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )
        assert result.token_ids == out[0, len(prompt) :].tolist()


def test_bf16_on_the_gpu_uses_the_grouped_gemm_and_matches_the_loop():
    assert grouped_mm_works(CUDA, torch.bfloat16), "torch's grouped GEMM should run bf16 on this GPU"
    g = torch.Generator(device=CUDA).manual_seed(0)
    x = torch.randn(300, 256, device=CUDA, generator=g, dtype=torch.bfloat16)
    gate_up = torch.randn(16, 256, 512, device=CUDA, generator=g, dtype=torch.bfloat16) / 16
    down = torch.randn(16, 256, 256, device=CUDA, generator=g, dtype=torch.bfloat16) / 16
    slot = torch.randint(0, 15, (300,), device=CUDA, generator=g)  # slot 15 gets no rows
    torch.testing.assert_close(
        _grouped(x, slot, gate_up, down), _per_slot(x, slot, gate_up, down), atol=2e-2, rtol=2e-2
    )


def test_kv_cache_takes_its_share_of_the_free_gpu_memory(tiny_maverick):
    torch.cuda.empty_cache()
    cfg = EngineConfig(device="cuda", kv_cache_memory=0.05)
    core = LLMEngine.from_checkpoint(tiny_maverick, cfg).core
    free_after, _ = torch.cuda.mem_get_info(CUDA)
    pool_bytes = 2 * core.pool.k.numel() * core.pool.k.element_size()
    assert pool_bytes == core.kv_capacity.bytes_total
    # 5% of what was free before the pool; what is free now is the other 95%, give or take
    assert pool_bytes == pytest.approx(0.05 / 0.95 * free_after, rel=0.05)
    engine = LLMEngine.from_checkpoint(tiny_maverick, dataclasses.replace(cfg, kv_cache_memory=None))
    assert engine.core.kv_capacity.num_blocks == cfg.num_kv_blocks
