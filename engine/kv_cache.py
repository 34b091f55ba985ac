"""Paged KV cache accounting: which block of the shared pool holds which positions of which layer.

Only bookkeeping lives here (plain ints); the K/V tensors live in the attention worker, indexed by
the block ids handed out below. A block holds `block_size` consecutive positions of K and V for one
layer. One pool serves every layer, and each sequence has one block table per layer.

Llama 4 interleaves two kinds of layers:
- global (NoPE) layers attend causally over everything, so they keep every block;
- chunked (RoPE) layers attend only within the query's chunk (`k // C == q // C`, `k <= q`), so
  once no query of a step starts before chunk boundary `b`, every block wholly before `b` can go
  back to the pool. Their table keeps its indexing; released entries read -1.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

FREED_BLOCK = -1  # a block table entry whose block went back to the pool


class OutOfBlocksError(RuntimeError):
    """Raised when a block is requested from an empty pool."""


class BlockAllocator:
    """A pool of `num_blocks` block ids, 0..num_blocks-1. Ids are handed out oldest-freed first."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self._num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._used: set[int] = set()

    def allocate(self) -> int:
        if not self._free:
            raise OutOfBlocksError(f"no free KV blocks: all {self._num_blocks} are in use")
        block_id = self._free.popleft()
        self._used.add(block_id)
        return block_id

    def free(self, block_ids: Iterable[int]) -> None:
        """Return blocks to the pool. All-or-nothing: an id that is not in use raises ValueError and
        frees nothing."""
        block_ids = list(block_ids)
        if len(set(block_ids)) != len(block_ids):
            raise ValueError(f"block ids freed twice in one call: {sorted(block_ids)}")
        not_used = [b for b in block_ids if b not in self._used]
        if not_used:
            raise ValueError(f"cannot free blocks that are not in use: {not_used}")
        self._used.difference_update(block_ids)
        self._free.extend(block_ids)

    @property
    def num_blocks(self) -> int:
        return self._num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return len(self._used)


@dataclass(frozen=True)
class KVUsage:
    """A snapshot of the pool, as a /metrics endpoint shows it."""

    blocks_used: int
    blocks_free: int
    blocks_total: int
    block_size: int  # token positions per block (one layer)
    bytes_per_block: int  # K and V of one block of one layer; 0 when unknown
    num_requests: int  # requests holding at least one table

    @property
    def bytes_used(self) -> int:
        return self.blocks_used * self.bytes_per_block

    @property
    def bytes_total(self) -> int:
        return self.blocks_total * self.bytes_per_block

    @property
    def used_fraction(self) -> float:
        return self.blocks_used / self.blocks_total


@dataclass
class _SeqTables:
    """One request's block tables. All layers' tables have the same length; in chunked layers the
    first `num_released` entries are FREED_BLOCK and the rest are live."""

    tables: list[list[int]]
    num_released: int = 0


@dataclass(frozen=True)
class _Plan:
    """What `allocate` would do: entries to add and blocks to release, per layer kind."""

    num_entries: int  # table length after the call
    release_to: int  # chunked-layer entries [num_released, release_to) go back to the pool
    num_new: int  # blocks taken from the pool, over all layers
    num_release: int  # blocks returned to the pool, over all layers


class KVCacheManager:
    """Block tables of every request over one shared pool.

    `chunked_layers[i]` is True when layer i is a chunked (local attention) layer. With
    `chunk_size` None nothing is chunked and every layer keeps every block.
    """

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        chunked_layers: Sequence[bool],
        chunk_size: int | None,
        bytes_per_block: int = 0,
    ) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        if not chunked_layers:
            raise ValueError("chunked_layers must name at least one layer")
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1 or None (no chunking), got {chunk_size}")
        if bytes_per_block < 0:
            raise ValueError(f"bytes_per_block must be >= 0, got {bytes_per_block}")
        self._allocator = BlockAllocator(num_blocks)
        self.block_size = block_size
        self.chunk_size = chunk_size
        self.bytes_per_block = bytes_per_block
        self._chunked = tuple(bool(c) and chunk_size is not None for c in chunked_layers)
        self._seqs: dict[str, _SeqTables] = {}

    @property
    def num_layers(self) -> int:
        return len(self._chunked)

    @property
    def num_free_blocks(self) -> int:
        return self._allocator.num_free

    def blocks_needed(self, request_id: str, start_pos: int, end_pos: int) -> int:
        """Free blocks that `allocate(request_id, start_pos, end_pos)` needs from the pool, over all
        layers, net of the chunked-layer blocks it releases first: `allocate` succeeds exactly when
        this is <= `num_free_blocks`."""
        plan = self._plan(request_id, start_pos, end_pos)
        return max(0, plan.num_new - plan.num_release)

    def allocate(self, request_id: str, start_pos: int, end_pos: int) -> bool:
        """Make every layer's table cover positions [0, end_pos) for computing [start_pos, end_pos).

        Chunked layers first release the blocks lying wholly before floor(start_pos / C) * C: no
        query from start_pos on looks further back. Returns False, changing nothing, when the pool
        cannot supply the blocks.
        """
        plan = self._plan(request_id, start_pos, end_pos)
        if plan.num_new - plan.num_release > self._allocator.num_free:
            return False
        seq = self._seqs.setdefault(request_id, _SeqTables([[] for _ in self._chunked]))
        layers = list(zip(seq.tables, self._chunked, strict=True))
        for table, chunked in layers:  # release everywhere first: allocation may reuse those blocks
            if chunked:
                released = table[seq.num_released : plan.release_to]
                self._allocator.free(released)
                table[seq.num_released : plan.release_to] = [FREED_BLOCK] * len(released)
        for table, chunked in layers:
            for j in range(len(table), plan.num_entries):
                live = not chunked or j >= plan.release_to
                table.append(self._allocator.allocate() if live else FREED_BLOCK)
        seq.num_released = max(seq.num_released, plan.release_to)
        return True

    def free(self, request_id: str) -> None:
        """Release every block of a request (finish, abort, preemption). Unknown ids are a no-op."""
        seq = self._seqs.pop(request_id, None)
        if seq is not None:
            self._allocator.free(b for table in seq.tables for b in table if b != FREED_BLOCK)

    def max_blocks_alone(self, end_pos: int, token_budget: int) -> int:
        """The most blocks one request ever holds at once on its way to computing positions
        [0, end_pos), running alone with chunks of up to `token_budget` tokens starting anywhere
        (preempted requests recompute from 0, partial chunks leave any start). A request needing
        more than the pool holds can never finish.

        A step computing [s, e) holds ceil(e / bs) entries in a global layer and, in a chunked
        one, those from the block of the chunk start floor(s / C) * C on. Within one chunk window
        both grow with s, so the worst steps start at the last position of each window."""
        if end_pos < 1 or token_budget < 1:
            raise ValueError(f"need end_pos >= 1 and token_budget >= 1, got {end_pos}, {token_budget}")
        bs, num_chunked = self.block_size, sum(self._chunked)
        num_global = self.num_layers - num_chunked
        chunk = self.chunk_size or end_pos
        worst = 0
        for window in range(0, end_pos, chunk):
            start = min(window + chunk, end_pos) - 1
            entries = math.ceil(min(start + token_budget, end_pos) / bs)
            released = window // bs if self.chunk_size is not None else 0
            worst = max(worst, num_global * entries + num_chunked * (entries - released))
        return worst

    def block_table(self, request_id: str, layer_idx: int) -> list[int]:
        """Entry j holds positions [j * block_size, (j + 1) * block_size) of layer `layer_idx`;
        released entries of chunked layers are -1. A copy."""
        if not 0 <= layer_idx < self.num_layers:
            raise ValueError(f"layer_idx must be in [0, {self.num_layers}), got {layer_idx}")
        seq = self._seqs.get(request_id)
        if seq is None:
            raise KeyError(f"request {request_id!r} holds no KV blocks")
        return list(seq.tables[layer_idx])

    def num_blocks_of(self, request_id: str) -> int:
        """Live blocks the request holds, over all layers."""
        seq = self._seqs.get(request_id)
        if seq is None:
            return 0
        return sum(b != FREED_BLOCK for table in seq.tables for b in table)

    def usage(self) -> KVUsage:
        return KVUsage(
            blocks_used=self._allocator.num_used,
            blocks_free=self._allocator.num_free,
            blocks_total=self._allocator.num_blocks,
            block_size=self.block_size,
            bytes_per_block=self.bytes_per_block,
            num_requests=len(self._seqs),
        )

    def _plan(self, request_id: str, start_pos: int, end_pos: int) -> _Plan:
        if not 0 <= start_pos <= end_pos:
            raise ValueError(f"need 0 <= start_pos <= end_pos, got [{start_pos}, {end_pos})")
        seq = self._seqs.get(request_id)
        num_now = len(seq.tables[0]) if seq else 0
        num_released = seq.num_released if seq else 0
        num_entries = max(num_now, math.ceil(end_pos / self.block_size))
        release_to = num_released
        if self.chunk_size is not None:
            window_start = start_pos // self.chunk_size * self.chunk_size
            if window_start // self.block_size < num_released:
                raise ValueError(
                    f"request {request_id!r}: positions from {window_start} are needed by a query at "
                    f"{start_pos} but their chunked-layer blocks were already released"
                )
            release_to = window_start // self.block_size
        num_chunked = sum(self._chunked)
        num_global = self.num_layers - num_chunked
        num_new = num_global * (num_entries - num_now)
        num_new += num_chunked * max(0, num_entries - max(num_now, release_to))
        num_release = num_chunked * max(0, min(release_to, num_now) - num_released)
        return _Plan(num_entries, release_to, num_new, num_release)
