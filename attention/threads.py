"""How many intra-op threads the decoder's layer stack uses: every thread pays only for large ops,
and only where the cores are not busy with other work.

A decode step's layer ops are small: a [T, H] block of rows times a weight of a few hundred KB
at the bench preset's hidden size 256. Each op torch runs on several threads is an OpenMP
parallel region that ends in a barrier, and on a machine whose cores are shared a barrier waits
for a descheduled thread: a [1, 256] x [256, 512] matmul measured 18 us on one thread and 1.9 ms
on two while other jobs ran, and the layers of a batch-32 step 45 ms on one thread and 130 ms on
two, where on quiet cores two threads took 28.5 ms against one's 34. Which is faster is a fact of
the machine at the time, so by default the decoder measures it (`MeasuredThreads`): per size of
step it times its layers on one thread and on all, alternating, keeps the faster, and measures
again now and then. A fixed `parallel_min_tokens` N instead runs steps of at least N tokens on
every thread and smaller ones on one (`FixedThreads`). The lm_head (a 207 MB weight at vocab
202048, where a second thread always pays) and the rest of the step use every thread torch has.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch

log = logging.getLogger(__name__)

AUTO = "auto"
PARALLEL_MIN_TOKENS: int | Literal["auto"] = AUTO  # the engine's default: measure
TRIALS = 5  # timed runs of each thread count (after one untimed warm-up) before choosing
REMEASURE_EVERY = 500  # steps of one size between measurements (other jobs come and go)


class ThreadPolicy(Protocol):
    def threads(self, num_tokens: int) -> int:
        """Intra-op threads for the layer stack of a step of `num_tokens` tokens."""
        ...

    def record(self, num_tokens: int, threads: int, seconds: float) -> None:
        """How long that step's layers took on `threads` threads."""
        ...

    def chosen(self) -> dict[int, int]:
        """The thread count measured and chosen per size of step (empty where nothing is measured)."""
        ...


@dataclass
class FixedThreads:
    """Steps of at least `parallel_min_tokens` tokens on `max_threads`, smaller ones on one."""

    parallel_min_tokens: int
    max_threads: int

    def threads(self, num_tokens: int) -> int:
        return self.max_threads if num_tokens >= self.parallel_min_tokens else 1

    def record(self, num_tokens: int, threads: int, seconds: float) -> None:
        pass

    def chosen(self) -> dict[int, int]:
        return {}


@dataclass
class _Size:
    """What was measured for one size of step (a power of two of tokens and the sizes below it)."""

    times: dict[int, list[float]]  # thread count -> seconds of its timed runs this measurement
    warm: set[int] = field(default_factory=set)  # thread counts whose untimed run is done
    choice: int | None = None
    since: int = 0  # steps since the last choice


class MeasuredThreads:
    """One thread or `max_threads` for each size of step, whichever its layers ran faster on.

    A measurement alternates the two counts, step by step, so both see the same load: an
    untimed warm-up each, then TRIALS timed runs each; the faster fastest run wins. Until the
    first choice of a size its steps are the measurement; after REMEASURE_EVERY steps of that
    size on the choice, it measures again (and keeps the old choice until the new one is made).

    Why the fastest run and five of them: another job only ever adds time to a step, so the
    fastest run is the truest figure of each count. On bench-maverick, from 120 alternating pairs
    of steps (2 cores, batch 32: layers 23.5 ms on two threads, 25.8 on one, on average), a
    choice made from any 5 consecutive pairs this way was wrong 4% of the time; by the median of
    3 (this policy's first rule) 16%, of 5 17%. At batch 8 (10.5 against 10.8 ms): 7% against
    29% and 25%."""

    def __init__(
        self, max_threads: int, trials: int = TRIALS, remeasure_every: int = REMEASURE_EVERY
    ) -> None:
        self.max_threads = max_threads
        self.trials = trials
        self.remeasure_every = remeasure_every
        self.sizes: dict[int, _Size] = {}

    def threads(self, num_tokens: int) -> int:
        if self.max_threads == 1:
            return 1
        size = self._size(num_tokens)
        if self._settled(size):
            return size.choice
        one, every = (len(size.times[n]) + (n in size.warm) for n in (1, self.max_threads))
        return 1 if one <= every else self.max_threads

    def record(self, num_tokens: int, threads: int, seconds: float) -> None:
        if self.max_threads == 1:
            return
        size = self._size(num_tokens)
        if self._settled(size):
            size.since += 1
            return
        if threads not in size.warm:
            size.warm.add(threads)
            return
        size.times[threads].append(seconds)
        if all(len(t) >= self.trials for t in size.times.values()):
            fastest = {n: min(t) for n, t in size.times.items()}
            choice = min(fastest, key=lambda n: (fastest[n], n))
            if choice != size.choice:
                times = ", ".join(f"{n} thread(s) {m * 1e3:.2f} ms" for n, m in fastest.items())
                log.info(
                    "steps of %s tokens: layers on %d thread(s) (%s)", bound_name(num_tokens), choice, times
                )
            size.choice, size.since = choice, 0
            size.times, size.warm = {n: [] for n in size.times}, set()

    def chosen(self) -> dict[int, int]:
        """Thread count chosen per size of step (the largest token count of the size)."""
        return {bound: s.choice for bound, s in sorted(self.sizes.items()) if s.choice is not None}

    def _settled(self, size: _Size) -> bool:
        """Chosen, and not yet due for another measurement."""
        return size.choice is not None and size.since < self.remeasure_every

    def _size(self, num_tokens: int) -> _Size:
        bound = size_bound(num_tokens)
        if bound not in self.sizes:
            self.sizes[bound] = _Size({1: [], self.max_threads: []})
        return self.sizes[bound]


def size_bound(num_tokens: int) -> int:
    """The size a step belongs to, named by its largest token count: 1, 2, 4, 8, ..."""
    return 1 << max(num_tokens - 1, 0).bit_length()


def bound_name(num_tokens: int) -> str:
    bound = size_bound(num_tokens)
    return f"{bound // 2 + 1}-{bound}" if bound > 2 else str(bound)


def check_parallel_min_tokens(value: object) -> int | str:
    """The setting, checked: "auto", or a whole number of tokens >= 1."""
    if value == AUTO:
        return AUTO
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f'parallel_min_tokens must be "auto" or a whole number >= 1, got {value!r}')
    return value


def thread_policy(parallel_min_tokens: int | str, max_threads: int) -> ThreadPolicy:
    """The policy a `parallel_min_tokens` setting names: "auto" measures, N is a fixed threshold."""
    if parallel_min_tokens == AUTO:
        return MeasuredThreads(max_threads)
    return FixedThreads(int(parallel_min_tokens), max_threads)


_compute = threading.local()  # the intra-op threads `compute_threads` gave the calling thread


def compute_threads(num_threads: int) -> None:
    """Make the calling thread the process's one thread that runs torch ops on `num_threads`
    intra-op threads (a no-op once done on that thread).

    Every thread that runs torch ops on several threads has an OpenMP team of its own, and GNU
    OpenMP (torch's, on Linux) counts the threads of all teams: once they outnumber the cores,
    the threads of every team stop spinning between parallel regions and sleep, so each small op
    pays a wake-up. A process that loads its model on one thread and steps on another (a Ray
    actor's work thread) therefore loads on one intra-op thread and gives the threads to the
    stepping thread alone. Measured in a Ray actor on 2 cores, 40 [1, 256] x [256, 512] products
    then the bench-maverick lm_head for one row, on the actor's work thread: 6.0 + 6.4 ms after a
    load on two threads on the main thread, 1.3 + 6.0 ms after a load on one (1.2 + 5.8 ms for
    both on the main thread). The cluster's batch-1 step (1 + 2 workers, `bench overhead`): 19.0
    ms against 26.1, the attention rank's own 15.1 against 22.1.

    The serving replica's single-process engine does not use it: there the OpenMP threads that
    spin between ops take the cores from the HTTP path, and serving measured 3% fewer requests/s
    with it (7.90 and 8.02 against 8.17 and 8.24 req/s, 32 prompts at concurrency 8)."""
    if getattr(_compute, "threads", None) != num_threads:
        torch.set_num_threads(num_threads)
        _compute.threads = num_threads


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
