"""Lost workers, real kills: every request finishes with exactly its tokens, the same tokens as a
fault-free run, nothing duplicated; the row-count invariant holds in the new epoch; nothing is
left behind."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import ray

from cluster.config import ClusterConfig, FaultTolerance
from cluster.engine import ClusterEngine, ClusterUnavailable
from engine.core import EngineConfig
from engine.llm_engine import LLMEngine
from engine.request import SamplingParams
from tests.helpers import random_prompts

ENGINE = EngineConfig(num_kv_blocks=1024, block_size=4, token_budget=64)
PARAMS = SamplingParams(max_tokens=14, ignore_eos=True)
PROMPTS = random_prompts([12, 30, 7, 21, 16, 9, 25, 14], seed=51)


@pytest.fixture(scope="module")
def reference(tiny_maverick) -> list[list[int]]:
    return [c.token_ids for c in LLMEngine.from_checkpoint(tiny_maverick, ENGINE).generate(PROMPTS, PARAMS)]


def kill(actor) -> int:
    pid = ray.get(actor.pid.remote())
    os.kill(pid, signal.SIGKILL)
    return pid


def run(engine: ClusterEngine, kills: dict[int, callable]) -> list[list[int]]:
    """All prompts at once; before step k, kills[k](engine) runs."""
    ids = [engine.add(p, PARAMS) for p in PROMPTS]
    tokens: dict[str, list[int]] = {i: [] for i in ids}
    step = 0
    while engine.has_unfinished:
        if step in kills:
            kills[step](engine)
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
        step += 1
    return [tokens[i] for i in ids]


def check_rows(engine: ClusterEngine) -> None:
    """Every routed row of this epoch was computed exactly once and came back."""
    stats = engine.stats()
    sent, returned, computed = {}, {}, {}
    for a in stats["attention"]:
        for layer, n in a["rows_sent_per_layer"].items():
            sent[layer] = sent.get(layer, 0) + n
        for layer, n in a["rows_returned_per_layer"].items():
            returned[layer] = returned.get(layer, 0) + n
    for x in stats["experts"]:
        for layer, n in x["rows_computed_per_layer"].items():
            computed[layer] = computed.get(layer, 0) + n
    assert sent and sent == returned == computed
    assert {s["epoch"] for s in stats["attention"] + stats["experts"]} == {engine.board.epoch}


def pids_of(engine: ClusterEngine) -> list[int]:
    return ray.get([w.pid.remote() for w in engine.attention + engine.experts])


def assert_gone(pids: list[int]) -> None:
    deadline = time.monotonic() + 30
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [p for p in pids if _alive(p)]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize(("attention", "experts", "redundant"), [(1, 3, 0), (2, 3, 1)])
def test_an_expert_worker_killed_between_steps(
    ray_session, tiny_maverick, reference, attention, experts, redundant
):
    engine = ClusterEngine(tiny_maverick, ClusterConfig(attention, experts, redundant), ENGINE)
    pids = pids_of(engine)
    got = run(engine, {3: lambda e: kill(e.experts[1])})
    assert got == reference and all(len(t) == PARAMS.max_tokens for t in got)
    faults = engine.metrics()["faults"]
    assert faults["worker_failures"] == {"attention": 0, "expert": 1} and faults["recoveries"] == 1
    assert len(engine.experts) == experts - 1
    # every logical expert is still served, by the survivors
    p = engine.placement
    assert p.num_workers == experts - 1 and bool((p.logcnt >= 1).all())
    check_rows(engine)
    engine.close()
    assert_gone(pids)


def test_an_attention_worker_killed_mid_step(ray_session, tiny_maverick, reference):
    """The kill lands while a step runs; the lost rank's requests continue on the other rank
    from their prompt and the tokens already streamed."""
    engine = ClusterEngine(tiny_maverick, ClusterConfig(2, 2), ENGINE)
    pids = pids_of(engine)
    victim = engine.attention[1]

    def kill_soon(e: ClusterEngine) -> None:
        threading.Timer(0.05, kill, args=(victim,)).start()

    got = run(engine, {4: kill_soon})
    assert got == reference and all(len(t) == PARAMS.max_tokens for t in got)
    faults = engine.metrics()["faults"]
    assert faults["worker_failures"]["attention"] == 1 and faults["requests_replayed"] >= 1
    assert len(engine.attention) == 1
    check_rows(engine)
    engine.close()
    assert_gone(pids)


def test_two_failures_in_a_row_and_seeded_sampling_survives(ray_session, tiny_maverick):
    params = SamplingParams(max_tokens=14, temperature=1.0, top_k=20, seed=5, ignore_eos=True)
    expected = [
        c.token_ids for c in LLMEngine.from_checkpoint(tiny_maverick, ENGINE).generate(PROMPTS, params)
    ]
    engine = ClusterEngine(tiny_maverick, ClusterConfig(2, 3, 1), ENGINE)
    ids = [engine.add(p, params) for p in PROMPTS]
    tokens: dict[str, list[int]] = {i: [] for i in ids}
    step = 0
    while engine.has_unfinished:
        if step == 2:
            kill(engine.experts[0])
        if step == 5:
            kill(engine.attention[0])
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
        step += 1
    assert [tokens[i] for i in ids] == expected
    faults = engine.metrics()["faults"]
    assert faults["recoveries"] == 2 and faults["epoch"] == 3
    check_rows(engine)
    engine.close()


def test_losing_every_expert_worker_is_unavailable_not_a_hang(ray_session, tiny_maverick):
    engine = ClusterEngine(tiny_maverick, ClusterConfig(1, 1), ENGINE)
    engine.add(PROMPTS[0], PARAMS)
    engine.step()
    kill(engine.experts[0])
    with pytest.raises(ClusterUnavailable, match="all 1 expert workers are lost"):
        engine.step()
    engine.close()


def test_a_prompt_too_long_for_the_kv_cache_is_refused_at_admission(ray_session, tiny_maverick):
    small = EngineConfig(num_kv_blocks=64, block_size=4, token_budget=64)
    with ClusterEngine(tiny_maverick, ClusterConfig(1, 1), small) as engine:
        ok = engine.add(PROMPTS[0], PARAMS)
        with pytest.raises(ValueError, match=r"needs up to \d+ KV blocks .* holds 64"):
            engine.add(list(range(200)), PARAMS)
        done = {c.request_id: c for c in engine.generate([PROMPTS[1]], PARAMS)}
        assert len(next(iter(done.values())).token_ids) == PARAMS.max_tokens
        assert ok not in engine.book


def test_a_hung_expert_worker_is_found_by_ping_and_replaced_by_the_survivors(
    ray_session, tiny_maverick, reference
):
    """SIGSTOP: the process lives, its sockets stay open, so collectives would wait for their
    timeout; the driver's ping finds it unresponsive, kills it, and the step recovers."""
    faults = FaultTolerance(stall_check_s=1.0, ping_timeout_s=2.0)
    engine = ClusterEngine(tiny_maverick, ClusterConfig(1, 3, faults=faults), ENGINE)
    ids = [engine.add(p, PARAMS) for p in PROMPTS]
    tokens: dict[str, list[int]] = {i: [] for i in ids}
    step, stalled_step_s = 0, None
    while engine.has_unfinished:
        if step == 2:
            pid = ray.get(engine.experts[2].pid.remote())
            os.kill(pid, signal.SIGSTOP)
        t0 = time.monotonic()
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
        if step == 2:
            stalled_step_s = time.monotonic() - t0
        step += 1
    assert [tokens[i] for i in ids] == reference
    assert engine.metrics()["faults"]["worker_failures"]["expert"] >= 1
    assert_gone([pid])  # killed, not left stopped
    assert stalled_step_s < faults.collective_timeout_s  # found by the ping, not by a timeout
    engine.close()
