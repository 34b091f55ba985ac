"""Block allocator and KV cache manager: accounting invariants over chunked and global layers."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.kv_cache import FREED_BLOCK, BlockAllocator, KVCacheManager, OutOfBlocksError

# Llama 4's pattern, shortened: three chunked (RoPE) layers, then one global (NoPE) layer.
LAYERS = (True, True, True, False)


def live_blocks(kv: KVCacheManager, request_ids: list[str]) -> list[int]:
    return [
        b
        for rid in request_ids
        if kv.num_blocks_of(rid)
        for layer_idx in range(kv.num_layers)
        for b in kv.block_table(rid, layer_idx)
        if b != FREED_BLOCK
    ]


def snapshot(kv: KVCacheManager, request_ids: list[str]) -> tuple:
    tables = {
        rid: [kv.block_table(rid, i) for i in range(kv.num_layers)]
        for rid in request_ids
        if kv.num_blocks_of(rid)
    }
    return kv.usage(), tables


def test_allocator_hands_out_every_block_once_then_raises() -> None:
    allocator = BlockAllocator(3)
    ids = [allocator.allocate() for _ in range(3)]
    assert sorted(ids) == [0, 1, 2]
    assert (allocator.num_free, allocator.num_used) == (0, 3)
    with pytest.raises(OutOfBlocksError, match="all 3 are in use"):
        allocator.allocate()


def test_allocator_free_is_all_or_nothing() -> None:
    allocator = BlockAllocator(4)
    a, b = allocator.allocate(), allocator.allocate()
    with pytest.raises(ValueError, match="not in use"):
        allocator.free([a, 3])
    with pytest.raises(ValueError, match="twice"):
        allocator.free([a, a])
    assert allocator.num_used == 2
    allocator.free([a, b])
    assert (allocator.num_free, allocator.num_used, allocator.num_blocks) == (4, 0, 4)


def test_allocator_rejects_empty_pool() -> None:
    with pytest.raises(ValueError, match="num_blocks must be >= 1"):
        BlockAllocator(0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(block_size=0), "block_size"),
        (dict(chunked_layers=()), "at least one layer"),
        (dict(chunk_size=0), "chunk_size"),
        (dict(bytes_per_block=-1), "bytes_per_block"),
    ],
)
def test_manager_rejects_bad_config(kwargs: dict, match: str) -> None:
    args = dict(num_blocks=8, block_size=4, chunked_layers=LAYERS, chunk_size=8) | kwargs
    with pytest.raises(ValueError, match=match):
        KVCacheManager(**args)


def test_tables_cover_positions_with_distinct_blocks() -> None:
    kv = KVCacheManager(num_blocks=64, block_size=4, chunked_layers=LAYERS, chunk_size=8)
    assert kv.allocate("a", 0, 10)
    assert kv.allocate("b", 0, 3)
    for layer_idx in range(4):
        assert len(kv.block_table("a", layer_idx)) == 3
        assert len(kv.block_table("b", layer_idx)) == 1
    blocks = live_blocks(kv, ["a", "b"])
    assert len(blocks) == len(set(blocks)) == 4 * 3 + 4 * 1
    assert kv.num_blocks_of("a") == 12


def test_chunked_layers_release_blocks_before_the_query_chunk() -> None:
    kv = KVCacheManager(num_blocks=64, block_size=4, chunked_layers=(True, False), chunk_size=8)
    assert kv.allocate("a", 0, 8)
    assert kv.allocate("a", 8, 9)  # the query at 8 opens chunk [8, 16): blocks 0 and 1 go
    chunked, global_ = kv.block_table("a", 0), kv.block_table("a", 1)
    assert chunked[:2] == [FREED_BLOCK, FREED_BLOCK] and chunked[2] != FREED_BLOCK
    assert FREED_BLOCK not in global_ and len(global_) == 3
    assert kv.num_blocks_of("a") == 1 + 3


def test_chunk_boundary_inside_a_block_keeps_that_block() -> None:
    kv = KVCacheManager(num_blocks=64, block_size=4, chunked_layers=(True,), chunk_size=6)
    assert kv.allocate("a", 0, 6)
    assert kv.allocate("a", 6, 7)  # block 1 holds positions 4..7 and straddles the boundary 6
    assert kv.block_table("a", 0)[0] == FREED_BLOCK
    assert kv.block_table("a", 0)[1] != FREED_BLOCK


def test_no_chunk_size_keeps_every_block_in_every_layer() -> None:
    kv = KVCacheManager(num_blocks=64, block_size=4, chunked_layers=LAYERS, chunk_size=None)
    for pos in range(40):
        assert kv.allocate("a", pos, pos + 1)
    assert kv.num_blocks_of("a") == 4 * 10


def test_long_decode_bounds_chunked_layers_and_grows_global_ones() -> None:
    block_size, chunk_size, step = 4, 16, 3
    kv = KVCacheManager(num_blocks=512, block_size=block_size, chunked_layers=LAYERS, chunk_size=chunk_size)
    bound = math.ceil((chunk_size + step) / block_size) + 1
    for start in range(0, 300, step):
        assert kv.allocate("a", start, start + step)
        for layer_idx, chunked in enumerate(LAYERS):
            table = kv.block_table("a", layer_idx)
            held = sum(b != FREED_BLOCK for b in table)
            if chunked:
                assert held <= bound
            else:
                assert held == math.ceil((start + step) / block_size)


def test_failed_allocate_changes_nothing() -> None:
    kv = KVCacheManager(num_blocks=10, block_size=4, chunked_layers=(True, False), chunk_size=8)
    assert kv.allocate("a", 0, 8)  # 4 blocks
    assert kv.allocate("b", 0, 8)  # 4 blocks, 2 left
    before = snapshot(kv, ["a", "b"])
    assert kv.blocks_needed("a", 8, 20) > kv.num_free_blocks
    assert not kv.allocate("a", 8, 20)
    assert not kv.allocate("c", 0, 12)
    assert snapshot(kv, ["a", "b"]) == before
    assert kv.num_blocks_of("c") == 0


def test_release_counts_toward_a_tight_allocation() -> None:
    kv = KVCacheManager(num_blocks=4, block_size=4, chunked_layers=(False, True), chunk_size=8)
    assert kv.allocate("a", 0, 8)  # the pool is full
    # [8, 12) takes one block per layer, and the chunked layer releases two first, even though
    # the global layer comes before it.
    assert kv.blocks_needed("a", 8, 12) == 0
    assert kv.allocate("a", 8, 12)
    assert kv.usage().blocks_used == 4


def test_free_returns_every_block() -> None:
    kv = KVCacheManager(num_blocks=64, block_size=4, chunked_layers=LAYERS, chunk_size=8)
    for start in range(0, 30, 5):
        assert kv.allocate("a", start, start + 5)
    assert kv.allocate("b", 0, 9)
    kv.free("a")
    kv.free("b")
    kv.free("never-seen")
    usage = kv.usage()
    assert (usage.blocks_used, usage.blocks_free, usage.num_requests) == (0, 64, 0)
    with pytest.raises(KeyError, match="holds no KV blocks"):
        kv.block_table("a", 0)


def test_reading_released_positions_again_is_an_error() -> None:
    kv = KVCacheManager(num_blocks=64, block_size=4, chunked_layers=LAYERS, chunk_size=8)
    assert kv.allocate("a", 0, 16)
    assert kv.allocate("a", 16, 17)
    with pytest.raises(ValueError, match="already released"):
        kv.allocate("a", 3, 17)


def test_bad_positions_and_layer_are_rejected() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=4, chunked_layers=LAYERS, chunk_size=8)
    with pytest.raises(ValueError, match="start_pos <= end_pos"):
        kv.allocate("a", 5, 4)
    assert kv.allocate("a", 0, 1)
    with pytest.raises(ValueError, match="layer_idx"):
        kv.block_table("a", 4)


def test_usage_reports_bytes_and_fraction() -> None:
    kv = KVCacheManager(
        num_blocks=8, block_size=4, chunked_layers=(False, False), chunk_size=None, bytes_per_block=1024
    )
    assert kv.allocate("a", 0, 8)
    usage = kv.usage()
    assert (usage.blocks_used, usage.blocks_free, usage.blocks_total) == (4, 4, 8)
    assert (usage.bytes_used, usage.bytes_total, usage.used_fraction) == (4096, 8192, 0.5)
    assert (usage.block_size, usage.num_requests) == (4, 1)


# One op: (request index, tokens to compute next) or (request index, None) = free the request.
ops_strategy = st.lists(
    st.tuples(st.integers(0, 3), st.one_of(st.none(), st.integers(0, 12))), min_size=1, max_size=60
)


@settings(max_examples=200, deadline=None)
@given(
    ops=ops_strategy,
    num_blocks=st.integers(1, 40),
    block_size=st.integers(1, 5),
    chunk_size=st.one_of(st.none(), st.integers(1, 12)),
    chunked_layers=st.lists(st.booleans(), min_size=1, max_size=4),
)
def test_random_allocate_and_free_keep_the_pool_consistent(
    ops: list[tuple[int, int | None]],
    num_blocks: int,
    block_size: int,
    chunk_size: int | None,
    chunked_layers: list[bool],
) -> None:
    kv = KVCacheManager(num_blocks, block_size, chunked_layers, chunk_size)
    request_ids = [f"r{i}" for i in range(4)]
    computed = dict.fromkeys(request_ids, 0)
    for request_idx, num_new in ops:
        rid = request_ids[request_idx]
        if num_new is None:
            kv.free(rid)
            computed[rid] = 0
        else:
            start = computed[rid]
            fits = kv.blocks_needed(rid, start, start + num_new) <= kv.num_free_blocks
            before = snapshot(kv, request_ids)
            assert kv.allocate(rid, start, start + num_new) == fits
            if fits:
                computed[rid] += num_new
                window_start = 0 if chunk_size is None else start // chunk_size * chunk_size
                if num_new:
                    check_window(kv, rid, start + num_new, chunked_layers, window_start)
                if chunk_size is not None:
                    bound = math.ceil((chunk_size + num_new) / block_size) + 1
                    for layer_idx in (i for i, chunked in enumerate(chunked_layers) if chunked):
                        held = kv.block_table(rid, layer_idx)
                        assert sum(b != FREED_BLOCK for b in held) <= bound
            else:
                assert snapshot(kv, request_ids) == before
        usage = kv.usage()
        assert usage.blocks_used + usage.blocks_free == usage.blocks_total == num_blocks
        blocks = live_blocks(kv, request_ids)
        assert len(blocks) == len(set(blocks)) == usage.blocks_used
        assert sum(kv.num_blocks_of(rid) for rid in request_ids) == usage.blocks_used
    for rid in request_ids:
        kv.free(rid)
    assert kv.usage().blocks_used == 0


def check_window(
    kv: KVCacheManager, rid: str, end: int, chunked_layers: list[bool], window_start: int
) -> None:
    """Every position a query in [start, end) reads is backed by a live block: chunked layers from
    the query chunk's start, global layers from 0."""
    for layer_idx, chunked in enumerate(chunked_layers):
        table = kv.block_table(rid, layer_idx)
        assert len(table) >= math.ceil(end / kv.block_size)
        for pos in range(window_start if chunked else 0, end):
            assert table[pos // kv.block_size] != FREED_BLOCK


@settings(max_examples=40, deadline=None)
@given(
    st.integers(1, 6),
    st.integers(1, 8),
    st.sampled_from([None, 4, 8, 16]),
    st.integers(1, 40),
    st.integers(1, 90),
    st.integers(0, 2**16),
)
def test_max_blocks_alone_is_the_worst_step_of_any_chunking(num_layers, block_size, chunk, budget, end, seed):
    """Against brute force: every step [s, e) with e - s <= budget, through `allocate` itself."""
    chunked = [bool((seed >> i) & 1) for i in range(num_layers)]
    worst = 0
    for s in range(end):
        e = min(s + budget, end)
        kv = KVCacheManager(10_000, block_size, chunked, chunk)
        if s > 0:  # the request computed [0, s) before (in whatever steps): blocks before the window went
            assert kv.allocate("r", s - 1, s)
        assert kv.allocate("r", s, e)
        worst = max(worst, kv.usage().blocks_used)
    assert KVCacheManager(1, block_size, chunked, chunk).max_blocks_alone(end, budget) == worst
