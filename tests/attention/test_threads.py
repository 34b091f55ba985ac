"""The layer stack's thread policies: a fixed threshold, and "auto", which times both counts."""

from __future__ import annotations

import logging
import threading

import pytest
import torch

from attention.threads import (
    FixedThreads,
    MeasuredThreads,
    bound_name,
    check_parallel_min_tokens,
    compute_threads,
    size_bound,
    thread_policy,
)


def run_steps(policy: MeasuredThreads, num_tokens: int, seconds: dict[int, float], steps: int) -> list[int]:
    """`steps` steps of `num_tokens` tokens whose layers take `seconds[threads]`; the counts used."""
    used = []
    for _ in range(steps):
        threads = policy.threads(num_tokens)
        policy.record(num_tokens, threads, seconds[threads])
        used.append(threads)
    return used


def test_a_measurement_alternates_the_counts_then_keeps_the_faster():
    policy = MeasuredThreads(max_threads=2, trials=3, remeasure_every=10)
    used = run_steps(policy, 32, {1: 0.045, 2: 0.130}, 8)  # a warm-up and 3 timed runs each
    assert used == [1, 2] * 4
    assert policy.chosen() == {32: 1}
    assert run_steps(policy, 32, {1: 0.045, 2: 0.130}, 10) == [1] * 10


def test_it_measures_again_and_follows_a_change_of_load():
    policy = MeasuredThreads(max_threads=2, trials=3, remeasure_every=10)
    run_steps(policy, 32, {1: 0.045, 2: 0.130}, 8 + 10)  # busy cores: one thread
    used = run_steps(policy, 32, {1: 0.034, 2: 0.028}, 8)  # the cores are free now
    assert used == [1, 2] * 4
    assert policy.chosen() == {32: 2}
    assert run_steps(policy, 32, {1: 0.034, 2: 0.028}, 10) == [2] * 10


def test_sizes_of_step_are_measured_apart():
    policy = MeasuredThreads(max_threads=4, trials=2, remeasure_every=100)
    run_steps(policy, 1, {1: 0.006, 4: 0.009}, 6)
    run_steps(policy, 20, {1: 0.034, 4: 0.020}, 6)  # 17-32 tokens
    run_steps(policy, 30, {1: 0.034, 4: 0.020}, 3)  # the same size: already chosen
    assert policy.chosen() == {1: 1, 32: 4}
    assert policy.threads(3) == 1 and policy.sizes[4].choice is None  # not measured yet: starts at 1


def test_the_fastest_run_decides_and_a_tie_goes_to_one_thread():
    policy = MeasuredThreads(max_threads=2, trials=3, remeasure_every=100)
    # two of one thread's runs land in busy spells; its fastest is still the faster
    times = iter([0, 0, 0.010, 0.011, 0.500, 0.012, 0.400, 0.013])
    for _ in range(8):
        threads = policy.threads(8)
        policy.record(8, threads, next(times))
    assert policy.chosen() == {8: 1}  # fastest 0.010 against 0.011 (medians 0.400 against 0.012)
    tie = MeasuredThreads(max_threads=2, trials=1, remeasure_every=100)
    run_steps(tie, 8, {1: 0.01, 2: 0.01}, 4)
    assert tie.chosen() == {8: 1}


def test_a_choice_is_logged_when_it_changes(caplog):
    policy = MeasuredThreads(max_threads=2, trials=1, remeasure_every=2)
    with caplog.at_level(logging.INFO, logger="attention.threads"):
        run_steps(policy, 5, {1: 0.002, 2: 0.001}, 4 + 2 + 4)  # chosen, kept, measured again
    assert [r.getMessage() for r in caplog.records] == [
        "steps of 5-8 tokens: layers on 2 thread(s) (1 thread(s) 2.00 ms, 2 thread(s) 1.00 ms)"
    ]


def test_one_thread_only_measures_nothing():
    policy = MeasuredThreads(max_threads=1)
    assert run_steps(policy, 32, {1: 0.01}, 5) == [1] * 5
    assert policy.chosen() == {} and policy.sizes == {}


def test_fixed_threshold():
    policy = FixedThreads(parallel_min_tokens=128, max_threads=2)
    assert [policy.threads(n) for n in (1, 127, 128, 512)] == [1, 1, 2, 2]


def test_sizes_and_settings():
    assert [size_bound(n) for n in (1, 2, 3, 4, 5, 32, 33)] == [1, 2, 4, 4, 8, 32, 64]
    assert [bound_name(n) for n in (1, 2, 3, 20)] == ["1", "2", "3-4", "17-32"]
    assert isinstance(thread_policy("auto", 2), MeasuredThreads)
    assert thread_policy(16, 2) == FixedThreads(16, 2)
    assert check_parallel_min_tokens("auto") == "auto" and check_parallel_min_tokens(1) == 1
    for bad in (0, -3, "fast", "8", True, 2.5, None):
        with pytest.raises(ValueError, match='parallel_min_tokens must be "auto" or a whole number >= 1'):
            check_parallel_min_tokens(bad)


def test_compute_threads_sets_the_calling_thread_alone():
    """The engine's stepping thread gets its intra-op threads; a thread that had its own count
    (the one that loaded the model on one thread) keeps it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    seen = {}

    def stepping_thread():
        compute_threads(2)
        seen["first"] = torch.get_num_threads()
        compute_threads(2)  # again on the same thread: nothing changes
        seen["again"] = torch.get_num_threads()

    try:
        worker = threading.Thread(target=stepping_thread)
        worker.start()
        worker.join()
        assert seen == {"first": 2, "again": 2}
        assert torch.get_num_threads() == 1  # this thread's own count did not follow
    finally:
        torch.set_num_threads(before)
