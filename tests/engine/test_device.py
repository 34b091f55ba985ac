"""The single-process engine on a (fake) GPU: every tensor of a step on the device, the same
tokens as on the CPU, and what crosses between host and device per step.

`tests.fake_cuda` makes cuda:0 out of CPU memory: an op that mixes devices raises as on a GPU,
and host syncs and uploads are counted. The same checks on a real GPU: tests/engine/test_gpu.py.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from engine.core import EngineConfig
from engine.llm_engine import LLMEngine
from engine.request import SamplingParams
from experts.swiglu import grouped_mm_works
from tests.fake_cuda import CUDA, CudaTensor, FakeCuda, patch_cuda
from tests.helpers import random_prompts

PARAMS = SamplingParams(max_tokens=3, ignore_eos=True)


@pytest.fixture
def fake_gpu(monkeypatch):
    patch_cuda(monkeypatch, free_bytes=64 * 2**20)
    grouped_mm_works.cache_clear()  # its answer for cuda:0 holds only inside this test
    with FakeCuda() as gpu:
        yield gpu
    grouped_mm_works.cache_clear()


def tensors_of(obj) -> list[torch.Tensor]:
    """Every tensor reachable through dataclasses, lists, tuples and dicts."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if dataclasses.is_dataclass(obj):
        return [t for f in dataclasses.fields(obj) for t in tensors_of(getattr(obj, f.name))]
    if isinstance(obj, list | tuple):
        return [t for x in obj for t in tensors_of(x)]
    if isinstance(obj, dict):
        return [t for x in obj.values() for t in tensors_of(x)]
    return []


def run(engine: LLMEngine, prompts: list[list[int]], gpu: FakeCuda | None = None) -> tuple[list, list]:
    """Tokens per prompt, and per step (host syncs, uploads, host float ops) when on the fake GPU."""
    ids = [engine.add(p, PARAMS) for p in prompts]
    tokens: dict[str, list[int]] = {i: [] for i in ids}
    steps = []
    while engine.has_unfinished:
        if gpu is not None:
            gpu.reset()
        for out in engine.step():
            tokens[out.request_id].extend(out.new_token_ids)
        if gpu is not None:
            steps.append((list(gpu.syncs), gpu.uploads, gpu.host_float_ops()))
    return [tokens[i] for i in ids], steps


def test_every_step_tensor_is_on_the_gpu_and_tokens_equal_the_cpu(tiny_checkpoint, fake_gpu):
    prompts = random_prompts([20, 3], seed=21)  # prefill in chunks of 16, then decode
    cfg = EngineConfig(num_kv_blocks=512, block_size=4, token_budget=16, dtype="float32")
    with fake_gpu.off():
        expected, _ = run(LLMEngine.from_checkpoint(tiny_checkpoint, cfg), prompts)
    engine = LLMEngine.from_checkpoint(tiny_checkpoint, dataclasses.replace(cfg, device="cuda"))
    core = engine.core
    held = tensors_of(core.decoder.weights) + tensors_of(core.decoder.experts.slots) + [core.decoder.inv_freq]
    held += [core.pool.k, core.pool.v]
    assert held and all(isinstance(t, CudaTensor) and t.device == CUDA for t in held)
    tokens, steps = run(engine, prompts, fake_gpu)
    assert tokens == expected  # the CPU's data, computed through the device path
    assert steps[0][0] == [] and steps[-1][0] == ["tolist"]  # a prefill step that samples nothing
    for syncs, uploads, host_float in steps:
        assert host_float == []  # nothing of the forward pass or sampling ran on the host
        assert syncs in ([], ["tolist"])  # the greedy tokens, if any; grouped GEMM experts: no sync
        assert uploads == 1 + len(syncs)  # the batch metadata (one packed copy), the rows that sample
    fake_gpu.reset()
    assert core.step(run_empty=True) == []  # a lock-step rank with nothing to run joins anyway
    assert fake_gpu.syncs == [] and fake_gpu.uploads == 1 and fake_gpu.host_float_ops() == []


def test_auto_dtype_is_bfloat16_on_a_gpu(tiny_maverick, fake_gpu):
    engine = LLMEngine.from_checkpoint(tiny_maverick, EngineConfig(num_kv_blocks=64, device="cuda"))
    assert engine.core.decoder.weights.embed.dtype == torch.bfloat16
    assert engine.core.pool.k.dtype == torch.bfloat16
    assert all(t.dtype == torch.bfloat16 for t in tensors_of(engine.core.decoder.experts.slots))


def test_kv_cache_sized_from_the_gpu_memory_left_after_the_weights(tiny_maverick, fake_gpu):
    """patch_cuda reports 64 MiB free (after the weights, as the engine measures it)."""
    cfg = EngineConfig(kv_cache_memory=0.5, device="cuda", dtype="float32", block_size=16)
    core = LLMEngine.from_checkpoint(tiny_maverick, cfg).core
    per_block = 2 * 16 * core.cfg.num_key_value_heads * core.cfg.head_dim * 4
    assert core.kv_capacity.num_blocks == 32 * 2**20 // per_block
    assert core.kv.usage().blocks_total == core.pool.k.shape[0] == core.kv_capacity.num_blocks
    with pytest.raises(ValueError, match="only 64.0 MiB is free"):
        LLMEngine.from_checkpoint(tiny_maverick, dataclasses.replace(cfg, kv_cache_memory=2 * 2**30))


def test_cuda_without_a_gpu_is_a_clear_error(tiny_maverick):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ValueError, match="no CUDA GPU is visible"):
        LLMEngine.from_checkpoint(tiny_maverick, EngineConfig(device="cuda"))
