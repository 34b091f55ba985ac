"""How many KV blocks a rank gets, and what they hold.

The pool is sized either by a block count (`num_kv_blocks`) or from memory (`kv_cache_memory`):
a number in (0, 1] is a fraction of the device memory still free once the weights are loaded
(vLLM's `gpu_memory_utilization` idea, measured after the weights rather than of the whole
device), a larger number is bytes. What the blocks hold is stated two ways: tokens at full
depth (every layer keeps every position) and the longest single sequence, which is longer on
Llama 4 because chunked layers keep only the current attention chunk.

Pure: plain numbers in and out; the caller measures free memory.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_UNITS |= {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_kv_cache_memory(value: str | float | int) -> float:
    """'0.9' (a fraction of the free memory), '40GiB', '26GB' or '26000000000' (bytes) -> a number
    as `EngineConfig.kv_cache_memory` takes it. Raises ValueError naming what is allowed."""
    if isinstance(value, bool):
        raise ValueError(f"kv_cache_memory must be a number or a size, got {value!r}")
    if isinstance(value, int | float):
        return check_kv_cache_memory(float(value))
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*", value)
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(
            f"kv_cache_memory {value!r} is neither a fraction nor a size "
            "(examples: 0.9 for 90% of the memory free after the weights, 40GiB, 26GB, 26000000000)"
        )
    number, unit = float(m.group(1)), m.group(2).lower()
    return check_kv_cache_memory(number * _UNITS[unit] if unit else number)


def check_kv_cache_memory(value: float) -> float:
    if not value > 0 or math.isinf(value):
        raise ValueError(
            f"kv_cache_memory must be > 0: a fraction in (0, 1] of the free memory, or bytes; got {value}"
        )
    if 1 < value < 1024:
        raise ValueError(
            f"kv_cache_memory {value:g} is neither a fraction in (0, 1] nor a plausible number of "
            "bytes; write a size such as 40GiB"
        )
    return value


def kv_cache_bytes(kv_cache_memory: float, free_bytes: int) -> int:
    """Bytes for the KV pool: the fraction of `free_bytes`, or the bytes asked for, which must fit."""
    if kv_cache_memory <= 1:
        return int(kv_cache_memory * free_bytes)
    if kv_cache_memory > free_bytes:
        raise ValueError(
            f"kv_cache_memory asks for {_gib(kv_cache_memory)} but only {_gib(free_bytes)} is free "
            "after the weights; ask for less, or a fraction such as 0.9"
        )
    return int(kv_cache_memory)


@dataclass(frozen=True)
class KVCapacity:
    """One rank's pool and what it holds."""

    num_blocks: int
    block_size: int
    bytes_per_block: int  # K and V of one block of one layer
    num_layers: int
    max_sequence_tokens: int  # the longest single sequence whose KV fits (chunked layers freeing)
    source: str  # how the size was chosen, in words

    @property
    def bytes_total(self) -> int:
        return self.num_blocks * self.bytes_per_block

    @property
    def full_depth_tokens(self) -> int:
        """Token positions the pool holds when every layer keeps every position."""
        return self.num_blocks * self.block_size // self.num_layers

    def describe(self) -> str:
        return (
            f"KV cache: {self.num_blocks} blocks of {self.block_size} tokens ({_gib(self.bytes_total)}, "
            f"{self.source}): {self.full_depth_tokens} tokens at full depth over {self.num_layers} "
            f"layers; one sequence of up to {self.max_sequence_tokens} tokens"
        )


def plan_kv_cache(
    num_kv_blocks: int,
    kv_cache_memory: float | None,
    block_size: int,
    bytes_per_block: int,
    chunked_layers: Sequence[bool],
    chunk_size: int | None,
    token_budget: int,
    context_len: int,
    free_bytes: Callable[[], int],
) -> KVCapacity:
    """The pool of one rank: `num_kv_blocks` blocks, or as many as `kv_cache_memory` buys
    (`free_bytes()` is read only then). Raises ValueError when that is not one block."""
    if kv_cache_memory is None:
        num_blocks, source = num_kv_blocks, f"num_kv_blocks {num_kv_blocks}"
    else:
        free = free_bytes()
        budget = kv_cache_bytes(kv_cache_memory, free)
        num_blocks = budget // bytes_per_block
        how = f"{kv_cache_memory:g} of {_gib(free)} free" if kv_cache_memory <= 1 else _gib(budget)
        source = f"kv_cache_memory {how}"
        if num_blocks < 1:
            raise ValueError(
                f"kv_cache_memory ({how}) buys no KV block of {bytes_per_block} bytes; "
                "the weights leave too little memory"
            )
    longest = max_sequence_tokens(
        num_blocks, block_size, chunked_layers, chunk_size, token_budget, context_len
    )
    return KVCapacity(num_blocks, block_size, bytes_per_block, len(chunked_layers), longest, source)


def max_sequence_tokens(
    num_blocks: int,
    block_size: int,
    chunked_layers: Sequence[bool],
    chunk_size: int | None,
    token_budget: int,
    context_len: int,
) -> int:
    """The longest sequence, at most `context_len` tokens, that runs alone in `num_blocks`,
    prefilled in steps of `token_budget` tokens: the worst case, since a step keeps the chunked
    layers' blocks from its first token's chunk on (`engine.kv_cache.KVCacheManager`'s rule) and
    a decode step starts later than a prefill step ending at the same position."""
    blocks = _live_blocks(block_size, chunked_layers, chunk_size)
    if not any(chunked_layers) or chunk_size is None:
        num_global = len(chunked_layers)
        return min(num_blocks // max(num_global, 1) * block_size, context_len)
    start = 0
    while start < context_len:  # every longer sequence runs this step too: the first misfit ends it
        end = min(start + token_budget, context_len)
        if blocks(start, end) > num_blocks:
            lo, hi = start, end  # blocks(start, lo) fits, blocks(start, hi) does not; it grows with end
            while hi - lo > 1:
                mid = (lo + hi) // 2
                lo, hi = (mid, hi) if blocks(start, mid) <= num_blocks else (lo, mid)
            return lo
        start = end
    return context_len


def _live_blocks(
    block_size: int, chunked_layers: Sequence[bool], chunk_size: int | None
) -> Callable[[int, int], int]:
    """blocks(start, end): live blocks of one sequence while it computes [start, end), over all
    layers (`engine.kv_cache.KVCacheManager`'s rule: chunked layers keep the blocks from the
    chunk of `start` on)."""
    num_chunked = sum(bool(c) for c in chunked_layers) if chunk_size is not None else 0
    num_global = len(chunked_layers) - num_chunked

    def blocks(start: int, end: int) -> int:
        entries = -(-end // block_size)
        released = (start // chunk_size * chunk_size) // block_size if num_chunked else 0
        return num_global * entries + num_chunked * (entries - released)

    return blocks


def _gib(n: float) -> str:
    """A size in words: GiB from 1 GiB up, MiB below."""
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"
