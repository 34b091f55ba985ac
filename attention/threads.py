"""How many intra-op threads the decoder's math uses: every thread pays only for large ops.

A decode step's layer ops are small: a [T, H] block of rows times a weight of a few hundred KB
at the bench preset's hidden size 256. Each op torch runs on several threads is an OpenMP
parallel region that ends in a barrier, and on a machine whose cores are shared a barrier waits
for a descheduled thread: a [1, 256] x [256, 512] matmul measured 18 us on one thread and 1.9 ms
on two while other jobs ran. So a step with fewer than `parallel_min_tokens` tokens runs the
layer stack on one thread, while the lm_head (a 207 MB weight at vocab 202048, where a second
thread does pay) and large prefill steps use every thread torch has.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

PARALLEL_MIN_TOKENS = 128  # steps this large run their layers on every thread


def layer_threads(num_tokens: int, parallel_min_tokens: int, max_threads: int) -> int:
    """Intra-op threads for the layer stack of a step of `num_tokens` tokens."""
    return max_threads if num_tokens >= parallel_min_tokens else 1


@contextmanager
def intra_op_threads(num_threads: int) -> Iterator[None]:
    """Run the block with torch's intra-op thread count set to `num_threads` (then restored)."""
    before = torch.get_num_threads()
    if num_threads == before:
        yield
        return
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
