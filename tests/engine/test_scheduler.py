"""Continuous-batching scheduler, driven on the CPU with fabricated runner outputs."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.kv_cache import KVCacheManager
from engine.request import FinishReason, Request, RequestStatus, SamplingParams
from engine.scheduler import (
    KVCacheTooSmallError,
    ScheduledChunk,
    Scheduler,
    SchedulerConfig,
    SchedulerOutput,
)

STOP = 200001  # one of SamplingParams' default stop token ids


def make_scheduler(
    num_blocks: int = 256,
    block_size: int = 4,
    token_budget: int = 512,
    max_num_seqs: int = 64,
    chunked_layers: tuple[bool, ...] = (False,),
    chunk_size: int | None = None,
) -> Scheduler:
    kv = KVCacheManager(num_blocks, block_size, chunked_layers, chunk_size)
    return Scheduler(SchedulerConfig(max_num_seqs=max_num_seqs, token_budget=token_budget), kv)


def make_request(request_id: str, prompt_len: int, max_tokens: int = 4, **params: object) -> Request:
    prompt = [1 + (31 * i + len(request_id)) % 997 for i in range(prompt_len)]
    return Request(request_id, prompt, SamplingParams(max_tokens=max_tokens, **params))


def token_at(position: int) -> int:
    """The fabricated runner's next token: a function of the position it lands on, so a recomputed
    request samples what it would have sampled anyway."""
    return 10_000 + position


def step(scheduler: Scheduler) -> tuple[SchedulerOutput, list[Request]]:
    output = scheduler.schedule()
    sampled = {c.request_id: token_at(c.start_pos + len(c.token_ids)) for c in output.chunks if c.sample}
    return output, scheduler.update(output, sampled)


def chunk_of(output: SchedulerOutput, request_id: str) -> ScheduledChunk:
    (chunk,) = (c for c in output.chunks if c.request_id == request_id)
    return chunk


def test_config_rejects_non_positive_limits() -> None:
    with pytest.raises(ValueError, match="max_num_seqs must be >= 1"):
        SchedulerConfig(max_num_seqs=0)
    with pytest.raises(ValueError, match="token_budget must be >= 1"):
        SchedulerConfig(token_budget=0)


def test_add_rejects_a_duplicate_id() -> None:
    scheduler = make_scheduler()
    scheduler.add(make_request("a", 3))
    with pytest.raises(ValueError, match="already queued or running"):
        scheduler.add(make_request("a", 5))


def test_long_prompt_is_prefilled_in_budget_sized_chunks() -> None:
    scheduler = make_scheduler(token_budget=4)
    request = make_request("a", 10)
    scheduler.add(request)
    chunks = [chunk_of(step(scheduler)[0], "a") for _ in range(3)]
    layout = [(c.start_pos, len(c.token_ids), c.sample) for c in chunks]
    assert layout == [(0, 4, False), (4, 4, False), (8, 2, True)]
    assert sum((c.token_ids for c in chunks), ()) == tuple(request.prompt_token_ids)
    assert request.output_token_ids == [token_at(10)]
    assert request.num_computed_tokens == 10


def test_decode_and_prefill_share_a_step_under_the_budget() -> None:
    scheduler = make_scheduler(token_budget=4)
    scheduler.add(make_request("a", 3))
    step(scheduler)  # a's whole prompt
    scheduler.add(make_request("b", 6))
    output, _ = step(scheduler)
    a, b = chunk_of(output, "a"), chunk_of(output, "b")
    assert (a.start_pos, a.token_ids, a.sample) == (3, (token_at(3),), True)
    assert (b.start_pos, len(b.token_ids), b.sample) == (0, 3, False)
    assert output.num_tokens == 4
    assert [c.request_id for c in output.chunks] == ["a", "b"]  # running first


def test_requests_join_and_leave_every_step() -> None:
    scheduler = make_scheduler(token_budget=8)
    requests = [make_request(f"r{i}", prompt_len=2 + i % 3, max_tokens=1 + i % 4) for i in range(12)]
    finished: list[Request] = []
    for idx in range(100):
        if idx < len(requests):
            scheduler.add(requests[idx])
        if not scheduler.has_unfinished:
            break
        output, changed = step(scheduler)
        assert output.num_tokens <= 8
        finished += [r for r in changed if r.is_finished]
    assert {r.request_id for r in finished} == {r.request_id for r in requests}
    for request in requests:
        assert len(request.output_token_ids) == request.params.max_tokens
        assert request.finish_reason is FinishReason.LENGTH
    assert scheduler.kv.usage().blocks_used == 0


def test_preempted_request_recomputes_everything_and_finishes_intact() -> None:
    # 1 layer, 2 positions a block, 6 blocks = 12 positions; each request ends at 4 + 6 = 10.
    scheduler = make_scheduler(num_blocks=6, block_size=2)
    a, b = make_request("a", 4, max_tokens=6), make_request("b", 4, max_tokens=6)
    scheduler.add(a)
    scheduler.add(b)
    outputs = []
    while scheduler.has_unfinished:
        outputs.append(step(scheduler)[0])
        usage = scheduler.kv.usage()
        assert usage.blocks_used <= usage.blocks_total
    preempting = next(o for o in outputs if o.preempted)
    assert preempting.preempted == ("b",)  # the later arrival goes first
    assert (a.num_preemptions, b.num_preemptions) == (0, 1)
    resumed = next(chunk_of(o, "b") for o in outputs[outputs.index(preempting) + 1 :] if "b" in _ids(o))
    assert resumed.start_pos == 0 and len(resumed.token_ids) > 4  # prompt plus generated tokens
    assert list(resumed.token_ids) == b.all_token_ids[: len(resumed.token_ids)]
    for request in (a, b):
        assert request.output_token_ids == [token_at(p) for p in range(4, 10)]
        assert request.finish_reason is FinishReason.LENGTH
    assert scheduler.kv.usage().blocks_used == 0


def _ids(output: SchedulerOutput) -> set[str]:
    return {c.request_id for c in output.chunks}


def test_latest_request_is_preempted_when_blocks_run_out() -> None:
    scheduler = make_scheduler(num_blocks=3, block_size=2)
    a, b = make_request("a", 2, max_tokens=8), make_request("b", 2, max_tokens=8)
    scheduler.add(a)
    scheduler.add(b)
    step(scheduler)  # a: 1 block, b: 1 block
    output, _ = step(scheduler)  # a takes the last block for position 2; b, the latest, must go
    assert output.preempted == ("b",) and _ids(output) == {"a"}
    assert (a.num_preemptions, b.num_preemptions) == (0, 1)
    assert b.status is RequestStatus.WAITING and b.num_computed_tokens == 0
    assert b.output_token_ids == [token_at(2)]  # generated tokens are kept for the recompute
    assert scheduler.kv.num_blocks_of("b") == 0


def test_preempted_request_waits_at_the_front_of_the_queue() -> None:
    scheduler = make_scheduler(num_blocks=4, block_size=2, max_num_seqs=2)
    a, b, c = (make_request(rid, 2, max_tokens=6) for rid in "abc")
    for request in (a, b, c):
        scheduler.add(request)
    for _ in range(10):
        if b.num_preemptions:
            break
        step(scheduler)
    assert scheduler.num_waiting == 2
    while "b" not in _ids(output := step(scheduler)[0]):
        assert "c" not in _ids(output)  # c arrived later: it never overtakes b


def test_stop_token_finishes_the_request_and_frees_its_blocks() -> None:
    scheduler = make_scheduler()
    request = make_request("a", 3, max_tokens=10)
    scheduler.add(request)
    output = scheduler.schedule()
    changed = scheduler.update(output, {"a": STOP})
    assert changed == [request]
    assert request.finish_reason is FinishReason.STOP and request.is_finished
    assert request.output_token_ids == [STOP]
    assert scheduler.kv.usage().blocks_used == 0 and not scheduler.has_unfinished


def test_ignore_eos_keeps_going_past_a_stop_token() -> None:
    scheduler = make_scheduler()
    request = make_request("a", 3, max_tokens=2, ignore_eos=True)
    scheduler.add(request)
    scheduler.update(scheduler.schedule(), {"a": STOP})
    scheduler.update(scheduler.schedule(), {"a": STOP})
    assert request.output_token_ids == [STOP, STOP]
    assert request.finish_reason is FinishReason.LENGTH


def test_abort_frees_blocks_of_running_and_waiting_requests() -> None:
    scheduler = make_scheduler(max_num_seqs=1)
    scheduler.add(make_request("a", 5))
    scheduler.add(make_request("b", 5))
    step(scheduler)
    assert scheduler.kv.num_blocks_of("a") > 0 and scheduler.num_waiting == 1
    running, waiting = scheduler.abort("a"), scheduler.abort("b")
    assert running is not None and waiting is not None
    assert running.finish_reason is waiting.finish_reason is FinishReason.ABORT
    assert scheduler.kv.usage().blocks_used == 0
    assert (scheduler.num_running, scheduler.num_waiting, scheduler.has_unfinished) == (0, 0, False)
    assert scheduler.abort("a") is None


def test_abort_during_a_step_drops_that_request_from_the_update() -> None:
    scheduler = make_scheduler()
    scheduler.add(make_request("a", 3))
    scheduler.add(make_request("b", 3))
    output = scheduler.schedule()
    scheduler.abort("a")
    changed = scheduler.update(output, {"a": 1, "b": 2})
    assert [r.request_id for r in changed] == ["b"]


def test_finish_from_outside_ends_a_request() -> None:
    scheduler = make_scheduler()
    request = make_request("a", 3, max_tokens=10)
    scheduler.add(request)
    step(scheduler)
    scheduler.finish("a", FinishReason.STOP)  # a stop string matched in the detokenized text
    scheduler.finish("a", FinishReason.STOP)  # already finished: no-op
    assert request.finish_reason is FinishReason.STOP
    assert scheduler.kv.usage().blocks_used == 0


def test_max_num_seqs_caps_the_running_set() -> None:
    scheduler = make_scheduler(max_num_seqs=2)
    for i in range(4):
        scheduler.add(make_request(f"r{i}", 2))
    output, _ = step(scheduler)
    assert _ids(output) == {"r0", "r1"}
    assert (scheduler.num_running, scheduler.num_waiting) == (2, 2)


def test_a_request_too_big_for_the_cache_raises_and_is_aborted() -> None:
    scheduler = make_scheduler(num_blocks=2, block_size=2)
    scheduler.add(make_request("big", 3, max_tokens=4))  # needs a 3rd block at position 4
    step(scheduler)
    step(scheduler)
    with pytest.raises(KVCacheTooSmallError, match="KV cache too small for request 'big'") as info:
        scheduler.schedule()
    assert info.value.request_id == "big"
    assert not scheduler.has_unfinished
    assert scheduler.schedule().chunks == ()


def test_step_without_work_is_empty() -> None:
    scheduler = make_scheduler()
    output = scheduler.schedule()
    assert (output.chunks, output.preempted, output.num_tokens) == ((), (), 0)
    assert scheduler.update(output, {}) == []
    assert scheduler.schedule().step_id == output.step_id + 1


def test_scheduling_twice_without_update_is_refused() -> None:
    scheduler = make_scheduler()
    scheduler.add(make_request("a", 3))
    scheduler.schedule()
    with pytest.raises(RuntimeError, match="never updated"):
        scheduler.schedule()


def test_missing_sampled_token_is_an_error() -> None:
    scheduler = make_scheduler()
    scheduler.add(make_request("a", 3))
    with pytest.raises(ValueError, match="no sampled token for request 'a'"):
        scheduler.update(scheduler.schedule(), {})


@settings(max_examples=60, deadline=None)
@given(
    prompt_lens=st.lists(st.integers(1, 20), min_size=1, max_size=8),
    max_tokens=st.integers(1, 8),
    token_budget=st.integers(1, 24),
    max_num_seqs=st.integers(1, 4),
    spare_blocks=st.integers(0, 20),
    chunk_size=st.one_of(st.none(), st.integers(1, 8)),
)
def test_random_workloads_finish_every_request_intact(
    prompt_lens: list[int],
    max_tokens: int,
    token_budget: int,
    max_num_seqs: int,
    spare_blocks: int,
    chunk_size: int | None,
) -> None:
    layers, block_size = (True, False), 2
    # Enough for the longest request with every block kept, so none is too big alone.
    num_blocks = len(layers) * -(-(max(prompt_lens) + max_tokens) // block_size) + spare_blocks
    scheduler = make_scheduler(num_blocks, block_size, token_budget, max_num_seqs, layers, chunk_size)
    requests = [make_request(f"r{i}", n, max_tokens) for i, n in enumerate(prompt_lens)]
    for request in requests:
        scheduler.add(request)
    for _ in range(2000):
        if not scheduler.has_unfinished:
            break
        output, _ = step(scheduler)
        assert output.num_tokens <= token_budget and len(output.chunks) <= max_num_seqs
        usage = scheduler.kv.usage()
        assert usage.blocks_used + usage.blocks_free == usage.blocks_total
    assert not scheduler.has_unfinished
    for request in requests:
        n = len(request.prompt_token_ids)
        assert request.output_token_ids == [token_at(p) for p in range(n, n + max_tokens)]
    assert scheduler.kv.usage().blocks_used == 0


def test_alone_a_chunk_shrinks_to_what_the_cache_holds() -> None:
    """Chunked layers free what lies behind the current chunk, so a long prompt fits a small pool
    when it is computed a chunk window at a time: the scheduler cuts the chunk, never the request."""
    scheduler = make_scheduler(num_blocks=8, block_size=4, chunked_layers=(True, True), chunk_size=8)
    scheduler.add(make_request("long", 40, max_tokens=3))  # 40 tokens at once would take 20 blocks
    lengths = []
    while scheduler.has_unfinished:
        output, _ = step(scheduler)
        lengths.append(output.num_tokens)
        assert scheduler.kv.usage().blocks_used <= 8
    assert sum(lengths) == 40 + 2 and max(lengths) < 40  # prompt, then 2 decode steps
