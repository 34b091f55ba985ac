"""`llama4-ep bench kv`: KV bytes per sequence against the least its layer mix allows."""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass

from engine.kv_cache import KVCacheManager


@dataclass(frozen=True)
class KVShape:
    """Llama 4's KV layout (Scout and Maverick alike): 48 layers, every 4th NoPE with global
    attention, the rest chunked over 8192 tokens; 8 kv heads x 128, bf16."""

    num_layers: int = 48
    chunk_size: int = 8192
    num_kv_heads: int = 8
    head_dim: int = 128
    dtype_bytes: int = 2

    @property
    def chunked(self) -> tuple[bool, ...]:
        return tuple((i + 1) % 4 != 0 for i in range(self.num_layers))

    @property
    def bytes_per_token(self) -> int:
        """K and V of one position of one layer."""
        return 2 * self.num_kv_heads * self.head_dim * self.dtype_bytes

    def minimum_bytes(self, start_pos: int, end_pos: int) -> int:
        """The least a step that computes positions [start_pos, end_pos) can hold: global layers
        keep [0, end_pos); chunked layers keep [floor(start_pos / C) * C, end_pos), since the
        step's earliest query (at start_pos) attends back to the start of its chunk."""
        num_chunked = sum(self.chunked)
        window = end_pos - start_pos // self.chunk_size * self.chunk_size
        return ((self.num_layers - num_chunked) * end_pos + num_chunked * window) * self.bytes_per_token


def kv_steps(prompt_len: int, end_len: int, prefill_chunk: int) -> Iterator[tuple[int, int]]:
    """(start_pos, end_pos) of each step, as the scheduler makes them: the prompt in chunks of
    `prefill_chunk` tokens, then one decode token per step until the sequence has `end_len`."""
    for start in range(0, prompt_len, prefill_chunk):
        yield start, min(start + prefill_chunk, prompt_len)
    for n in range(prompt_len, end_len):
        yield n, n + 1


def kv_trajectory(
    shape: KVShape, block_size: int, steps: list[tuple[int, int]], targets: tuple[int, ...]
) -> dict[int, dict]:
    """Run one sequence's steps through `KVCacheManager.allocate` (accounting only: no tensors) and,
    at each target length n, report the bytes it holds, the minimum, the all-layers-full cache,
    and the worst excess over every step that ended in (n/2, n]."""
    per_block = block_size * shape.bytes_per_token
    max_len = max(end for _, end in steps)
    num_blocks = shape.num_layers * math.ceil(max_len / block_size)
    kv = KVCacheManager(num_blocks, block_size, shape.chunked, shape.chunk_size, per_block)
    worst = dict.fromkeys(targets, 0.0)
    out = {}
    for start, end in steps:
        if not kv.allocate("seq", start, end):
            raise RuntimeError(f"the pool of {num_blocks} blocks ran out at [{start}, {end})")
        held = kv.usage().bytes_used  # the only sequence in the pool
        minimum = shape.minimum_bytes(start, end)
        for n in targets:
            if n / 2 < end <= n:
                worst[n] = max(worst[n], held / minimum - 1)
        if end in targets:
            out[end] = {"bytes": held, "minimum_bytes": minimum, "excess_over_minimum": held / minimum - 1}
    for n, row in out.items():
        full = KVCacheManager(num_blocks, block_size, shape.chunked, None, per_block)  # nothing chunked
        full.allocate("seq", 0, n)
        row["full_bytes"] = full.usage().bytes_used
        row["worst_excess_in_half_to_n"] = worst[n]
    return out


def run_kv_bench(
    shape: KVShape, sizes: tuple[int, ...], block_sizes: tuple[int, ...], prefill_chunk: int
) -> list[dict]:
    """KV bytes of one sequence at each length n against the minimum its layer mix allows.

    The minimum, for a sequence being decoded at length n (the step that computes position n - 1,
    after which the cache holds n positions): every global layer keeps all n positions; every
    chunked layer keeps the positions of the query's own chunk, [floor((n - 1) / C) * C, n), that
    is n - floor((n - 1) / C) * C of them (between 1 and C; exactly C when n is a multiple of C,
    because position n - 1 still sits in the chunk that ends at n). So
    minimum(n) = bytes_per_token * (G * n + L_c * (n - floor((n - 1) / C) * C)),
    with G global and L_c chunked layers. A prefill step computing [s, n) needs its chunked layers
    from floor(s / C) * C instead (`KVShape.minimum_bytes`). Block rounding is the only slack a
    paged cache may add: the last block of every layer is partly filled.

    Two growth patterns, both through `allocate` as the scheduler calls it: `decode` (a prompt of
    one prefill chunk, then one token per step up to the largest size, measured on the way) and
    `prefill` (an n-token prompt in chunks of `prefill_chunk`, measured when it ends).
    """
    rows = []
    for block_size in block_sizes:
        for scenario in ("decode", "prefill"):
            if scenario == "decode":
                steps = list(kv_steps(min(prefill_chunk, min(sizes)), max(sizes), prefill_chunk))
                found = kv_trajectory(shape, block_size, steps, sizes)
            else:
                found = {}
                for n in sizes:
                    found.update(kv_trajectory(shape, block_size, list(kv_steps(n, n, prefill_chunk)), (n,)))
            for n in sizes:
                r = found[n]
                rows.append({"scenario": scenario, "block_size": block_size, "num_tokens": n, **r})
    for r in rows:
        r["ratio_to_full"] = r["bytes"] / r["full_bytes"]
        r["minimum_ratio_to_full"] = r["minimum_bytes"] / r["full_bytes"]
    return rows


def cmd_kv(args: argparse.Namespace) -> int:
    shape = KVShape(chunk_size=args.chunk_size)
    rows = run_kv_bench(shape, args.sizes, args.block_sizes, args.prefill_chunk)
    num_chunked = sum(shape.chunked)
    print(
        f"KV bytes per sequence: {shape.num_layers} layers ({num_chunked} chunked over {shape.chunk_size} "
        f"tokens, {shape.num_layers - num_chunked} global), {shape.num_kv_heads} kv heads x "
        f"{shape.head_dim}, {8 * shape.dtype_bytes}-bit; prefill chunk {args.prefill_chunk}"
    )
    print(
        f"{'scenario':<9} {'block':>5} {'tokens':>7} {'held MiB':>10} {'minimum MiB':>12} {'excess':>8} "
        f"{'worst (n/2,n]':>14} {'held/full':>10} {'min/full':>9}"
    )
    mib = 2**20
    for r in rows:
        print(
            f"{r['scenario']:<9} {r['block_size']:>5} {r['num_tokens']:>7} {r['bytes'] / mib:>10.1f} "
            f"{r['minimum_bytes'] / mib:>12.1f} {r['excess_over_minimum']:>8.2%} "
            f"{r['worst_excess_in_half_to_n']:>14.2%} {r['ratio_to_full']:>10.4f} "
            f"{r['minimum_ratio_to_full']:>9.4f}"
        )

    def worst(key: str, block_size: int) -> float:
        return round(max(r[key] for r in rows if r["block_size"] == block_size), 6)

    figures = {
        "num_layers": shape.num_layers,
        "chunk_size": shape.chunk_size,
        "bytes_per_token_per_layer": shape.bytes_per_token,
        "sizes": list(args.sizes),
        "block_sizes": list(args.block_sizes),
        "excess_over_minimum": max(worst("excess_over_minimum", b) for b in args.block_sizes),
        "excess_over_minimum_per_block_size": {
            str(b): worst("excess_over_minimum", b) for b in args.block_sizes
        },
        "worst_excess_in_half_to_n_per_block_size": {
            str(b): worst("worst_excess_in_half_to_n", b) for b in args.block_sizes
        },
        "ratio_to_full": {
            str(r["num_tokens"]): round(r["ratio_to_full"], 6)
            for r in rows
            if r["scenario"] == "decode" and r["block_size"] == args.block_sizes[0]
        },
        "results": [{k: round(v, 6) if isinstance(v, float) else v for k, v in r.items()} for r in rows],
    }
    print(json.dumps(figures))
    return 0
