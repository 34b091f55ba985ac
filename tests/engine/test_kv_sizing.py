"""KV capacity from memory: parsing the knob, the blocks it buys, and what they hold (checked
against the block manager that will hand them out)."""

from __future__ import annotations

import pytest

from engine.core import EngineConfig
from engine.kv_cache import KVCacheManager
from engine.kv_sizing import (
    kv_cache_bytes,
    max_sequence_tokens,
    parse_kv_cache_memory,
    plan_kv_cache,
)
from engine.llm_engine import LLMEngine
from engine.request import SamplingParams


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("0.9", 0.9),
        (".5", 0.5),
        ("1", 1.0),
        ("40GiB", 40 * 2**30),
        ("26GB", 26e9),
        ("2000000", 2e6),
        (0.25, 0.25),
    ],
)
def test_fractions_and_sizes_parse(text, value):
    assert parse_kv_cache_memory(text) == value


@pytest.mark.parametrize("text", ["0", "-0.5", "abc", "12XB", "5", "nan", "", True])
def test_bad_values_say_what_is_allowed(text):
    with pytest.raises(ValueError, match="kv_cache_memory"):
        parse_kv_cache_memory(text)


def test_bytes_or_a_fraction_of_what_is_free():
    assert kv_cache_bytes(0.5, 1000) == 500
    assert kv_cache_bytes(4096.0, 10_000) == 4096
    with pytest.raises(ValueError, match="only 0.0 MiB is free"):
        kv_cache_bytes(20_000.0, 10_000)


def _longest_by_the_block_manager(num_blocks, block_size, chunked, chunk, budget, limit) -> int:
    """Run one sequence through a real KVCacheManager, prefilled in steps of `budget`, until a
    step does not fit; then the longest partial step that does."""
    kv = KVCacheManager(num_blocks, block_size, chunked, chunk)
    start = 0
    while start < limit:
        end = min(start + budget, limit)
        if not kv.allocate("r", start, end):
            return max((e for e in range(start, end) if kv.allocate("r", start, e)), default=start)
        start = end
    return limit


@pytest.mark.parametrize(
    ("num_blocks", "block_size", "chunked", "chunk", "budget"),
    [
        (100, 4, [True, True, True, False] * 2, 16, 8),
        (100, 4, [True, True, True, False] * 2, 16, 512),
        (37, 16, [True, False], 32, 20),
        (64, 4, [False] * 3, None, 7),
        (500, 2, [True] * 5 + [False], 12, 5),
    ],
)
def test_longest_sequence_is_what_the_block_manager_fits(num_blocks, block_size, chunked, chunk, budget):
    limit = 5000
    expected = _longest_by_the_block_manager(num_blocks, block_size, chunked, chunk, budget, limit)
    assert max_sequence_tokens(num_blocks, block_size, chunked, chunk, budget, limit) == expected
    assert 0 < expected < limit


def test_the_model_context_caps_the_longest_sequence():
    assert max_sequence_tokens(10**6, 16, [True, False], 8192, 512, context_len=4096) == 4096


def test_plan_from_blocks_or_memory():
    chunked, per_block = [True, True, True, False], 1024
    fixed = plan_kv_cache(64, None, 16, per_block, chunked, 32, 64, 4096, free_bytes=lambda: 1 / 0)
    assert (fixed.num_blocks, fixed.full_depth_tokens) == (64, 64 * 16 // 4)
    sized = plan_kv_cache(64, 0.5, 16, per_block, chunked, 32, 64, 4096, free_bytes=lambda: 1 << 20)
    assert sized.num_blocks == 512 and sized.bytes_total == 1 << 19
    assert "512 blocks of 16 tokens" in sized.describe() and "0.5 of 1.0 MiB free" in sized.describe()
    assert f"up to {sized.max_sequence_tokens} tokens" in sized.describe()
    with pytest.raises(ValueError, match="buys no KV block"):
        plan_kv_cache(64, 0.5, 16, per_block, chunked, 32, 64, 4096, free_bytes=lambda: 1000)


def test_a_request_the_pool_cannot_hold_is_refused_at_once(tiny_maverick):
    """Left in, it would stop the step loop with KVCacheTooSmallError when it ran. One that fits
    only with its prompt cut into short chunks (the chunked layers free blocks) runs."""
    engine = LLMEngine.from_checkpoint(tiny_maverick, EngineConfig(num_kv_blocks=40, block_size=4))
    with pytest.raises(ValueError, match=r"needs up to \d+ KV blocks .* holds 40"):
        engine.add(list(range(1, 61)), SamplingParams(max_tokens=4))  # the 2 global layers alone: 32
    rid = engine.add(list(range(1, 22)), SamplingParams(max_tokens=4, ignore_eos=True))  # 6 x 8 in one chunk
    done = {}
    while engine.has_unfinished:
        for out in engine.step():
            done[out.request_id] = out
    assert done[rid].num_output_tokens == 4
