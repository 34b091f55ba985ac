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
    peak_blocks,
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


def _peak_by_the_block_manager(prompt_len, new, block_size, chunked, chunk, budget) -> int:
    """Prefill in steps of `budget`, then decode one position per step; the most blocks in use."""
    kv = KVCacheManager(10**6, block_size, chunked, chunk)
    steps = [(s, min(s + budget, prompt_len)) for s in range(0, prompt_len, budget)]
    steps += [(p, p + 1) for p in range(prompt_len, prompt_len + new - 1)]
    peak = 0
    for start, end in steps:
        assert kv.allocate("r", start, end)
        peak = max(peak, kv.usage().blocks_used)
    return peak


@pytest.mark.parametrize(
    ("block_size", "chunked", "chunk", "budget"),
    [
        (4, [True, True, True, False], 16, 8),
        (8, [True] * 3, 12, 5),
        (16, [False, True], None, 64),
        (3, [True], 7, 4),
    ],
)
def test_peak_blocks_of_one_request_is_what_the_block_manager_uses(block_size, chunked, chunk, budget):
    for prompt_len, new in [(1, 1), (5, 1), (30, 2), (13, 40), (64, 100), (7, 3)]:
        expected = _peak_by_the_block_manager(prompt_len, new, block_size, chunked, chunk, budget)
        assert peak_blocks(prompt_len, new, block_size, chunked, chunk, budget) == expected, (prompt_len, new)


def test_a_request_the_pool_cannot_hold_is_refused_at_once(tiny_maverick):
    """Left in, it would stop the step loop with KVCacheTooSmallError when it ran."""
    engine = LLMEngine.from_checkpoint(tiny_maverick, EngineConfig(num_kv_blocks=40, block_size=4))
    with pytest.raises(ValueError, match="needs 48 KV blocks, more than this rank's 40"):
        engine.add(list(range(1, 22)), SamplingParams(max_tokens=4))  # prefill: 6 blocks x 8 layers
    engine.add(list(range(1, 18)), SamplingParams(max_tokens=2, ignore_eos=True))  # 5 x 8 = 40: fits
    while engine.has_unfinished:
        engine.step()
