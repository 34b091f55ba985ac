"""The simulator: conservation laws, agreement with the real engine's steps, scale, rebalancing."""

from __future__ import annotations

import time

import numpy as np
import pytest

from engine.core import EngineConfig
from engine.llm_engine import LLMEngine
from engine.request import SamplingParams
from engine.scheduler import SchedulerConfig
from router.rebalancing import RebalanceConfig
from sim.cluster import SimCluster, SimConfig
from sim.costmodel import CPU_2CORE, H100_SXM, CostModel, Precision, RankBatch, memory_plan
from sim.models import Shape, model_config
from sim.routing import Router, popularity
from sim.run import main, simulate
from sim.workload import ArrivalSpec, LengthSpec, Workload, make_workload

TINY = model_config("tiny-maverick")
MAVERICK = model_config("maverick")


def tiny_config(**kw: object) -> SimConfig:
    base = {
        "model": TINY,
        "hardware": CPU_2CORE,
        "precision": Precision(4, 4, 4),
        "num_attention": 1,
        "num_expert_workers": 2,
        "scheduler": SchedulerConfig(max_num_seqs=8, token_budget=40),
        "block_size": 4,
        "num_kv_blocks": 1024,
        "expert_skew": 0.0,
    }
    return SimConfig(**{**base, **kw})


# -- conservation ---------------------------------------------------------------------------


@pytest.mark.parametrize("num_kv_blocks", [4096, 300], ids=["roomy", "preempting"])
def test_conservation_laws(num_kv_blocks):
    """3 ranks, replicated experts, placement switches mid-run, preemption when KV is short."""
    policy = RebalanceConfig(window_steps=16, interval_steps=8, report_every=4, min_gain=0.0)
    cfg = tiny_config(
        num_attention=3,
        num_expert_workers=8,
        redundant_slots_per_worker=2,
        num_kv_blocks=num_kv_blocks,
        scheduler=SchedulerConfig(max_num_seqs=6, token_budget=48),
        expert_skew=1.2,
        rebalance=policy,
        hardware=H100_SXM,
        reshuffle_every_s=0.02,  # the hot experts move while requests run
    )
    workload = make_workload(
        60,
        ArrivalSpec.parse("poisson:2000"),
        LengthSpec.parse("uniform:1:90"),
        LengthSpec.parse("uniform:1:30"),
    )
    sim = SimCluster(cfg)
    i = 0
    while i < len(workload) or sim.has_unfinished:
        while i < len(workload) and workload.arrival_s[i] <= sim.now:
            sim.add(int(workload.prompt_len[i]), int(workload.output_len[i]), float(workload.arrival_s[i]))
            i += 1
        sim.step()
    requests = list(sim.requests.values())
    assert all(r.finish_s is not None and r.first_token_s is not None for r in requests)  # all finish
    for r in requests:  # prompt + generated add up: the last token is sampled, never computed
        assert r.tokens_scheduled == r.prompt_len + r.output_len - 1 + r.tokens_recomputed
        assert r.arrival_s <= r.first_token_s <= r.finish_s
    scheduled = sum(n for step in sim.steps for _, n in step.chunks)
    assert scheduled == sum(int(step.tokens_per_rank.sum()) for step in sim.steps)
    assert (sim.rows_routed == scheduled).all()  # every token routed once per MoE layer ...
    assert (sim.rows_computed.sum(axis=1) == sim.rows_routed).all()  # ... and computed once
    for scheduler in sim.schedulers:  # no KV leak
        usage = scheduler.kv.usage()
        assert usage.blocks_used == 0 and usage.num_requests == 0 and not scheduler.has_unfinished
    assert len(sim.rearrangements) >= 1  # the switches happened while requests ran
    assert sim.reshuffles >= 1
    if num_kv_blocks == 300:
        assert sim.num_preemptions > 0 and sum(r.tokens_recomputed for r in requests) > 0


def test_router_draws_the_zipf_shares():
    shares = popularity(TINY.moe_layers, 128, 1.2, skew_seed=3)
    counts = Router(shares, seed=0).sample(np.array([40000, 40000])).sum(axis=0)  # [L, E]
    assert np.abs(counts / 80000 - shares).max() < 0.01
    assert counts.sum() == 80000 * len(TINY.moe_layers)


# -- agreement with the real engine ----------------------------------------------------------


@pytest.mark.parametrize("num_kv_blocks", [1024, 150], ids=["roomy", "preempting"])
def test_same_steps_as_the_single_process_engine(tiny_maverick, num_kv_blocks):
    """Same SchedulerConfig and arrivals: same number of steps, same chunks in every step, same
    tokens, also when the KV cache is small enough to preempt."""
    rng = np.random.default_rng(0)
    num = 12
    arrival = np.sort(rng.integers(0, 30, num))
    prompt, output = rng.integers(3, 90, num), rng.integers(2, 30, num)
    engine = LLMEngine.from_checkpoint(
        tiny_maverick,
        EngineConfig(num_kv_blocks=num_kv_blocks, block_size=4, token_budget=40, max_num_seqs=8),
    )
    real_steps = []
    schedule = engine.core.scheduler.schedule

    def recording_schedule():
        out = schedule()
        real_steps.append(tuple((c.request_id, len(c.token_ids)) for c in out.chunks))
        return out

    engine.core.scheduler.schedule = recording_schedule
    sim = SimCluster(tiny_config(num_kv_blocks=num_kv_blocks))
    sim_steps, real_tokens, step, i = [], 0, 0, 0
    while i < num or engine.has_unfinished:
        while i < num and arrival[i] <= step:
            engine.add(
                [7] * int(prompt[i]), SamplingParams(max_tokens=int(output[i]), ignore_eos=True), f"r{i}"
            )
            sim.add(int(prompt[i]), int(output[i]), request_id=f"r{i}")
            i += 1
        real_tokens += sum(len(o.new_token_ids) for o in engine.step())
        sim_steps.append(sim.step().chunks)
        step += 1
    assert not sim.has_unfinished
    assert len(sim_steps) == len(real_steps) == step
    assert sim_steps == real_steps
    assert real_tokens == sum(r.output_len for r in sim.requests.values()) == int(output.sum())
    if num_kv_blocks == 150:
        assert sim.num_preemptions > 0


# -- scale and rebalancing -------------------------------------------------------------------


def test_maverick_scale_run_is_quick():
    """Maverick (128 experts) on 16 H100s, 1000 requests."""
    cfg = SimConfig(num_attention=4, num_expert_workers=12, block_size=64, seed=1)
    workload = make_workload(
        1000,
        ArrivalSpec.parse("poisson:20"),
        LengthSpec.parse("lognormal:512:0.5", 4096),
        LengthSpec.parse("lognormal:64:0.5", 1024),
    )
    t0 = time.perf_counter()
    result = simulate(cfg, workload)
    elapsed = time.perf_counter() - t0
    summary = result.summary()
    assert summary["finished"] == 1000
    assert elapsed < 20, f"took {elapsed:.1f} s"
    assert 5 < summary["tpot_ms"]["p50"] < 500  # decode steps of a 400B MoE on H100s: tens of ms
    assert summary["simulated_s"] > workload.arrival_s[-1]


def test_rebalancing_raises_balancedness_under_zipf():
    base = tiny_config(
        hardware=H100_SXM,
        num_expert_workers=8,
        redundant_slots_per_worker=2,
        expert_skew=1.2,
        scheduler=SchedulerConfig(max_num_seqs=64, token_budget=512),
        num_kv_blocks=20000,
    )
    workload = make_workload(
        200, ArrivalSpec.parse("poisson:400"), LengthSpec.parse("const:32"), LengthSpec.parse("const:64")
    )
    static = simulate(base, workload)
    policy = RebalanceConfig(window_steps=32, interval_steps=32, report_every=8)
    balanced = simulate(SimConfig(**{**base.__dict__, "rebalance": policy}), workload)
    # the last quarter of the run, loads summed over its steps (one step's few tokens are noisy)
    before = np.mean([b for _, b in static.balancedness_over_time(4)[-1:]])
    after = np.mean([b for _, b in balanced.balancedness_over_time(4)[-1:]])
    assert before < 0.5 and after > 0.8
    assert balanced.rearrangements and all(r.switched_s > r.planned_s for r in balanced.rearrangements)


# -- cost model and workloads -----------------------------------------------------------------


def _decode_batch(num_seqs: int, context: int) -> RankBatch:
    return RankBatch.from_chunks(
        1,
        np.zeros(num_seqs, dtype=np.int64),
        np.full(num_seqs, context),
        np.ones(num_seqs, dtype=np.int64),
        np.ones(num_seqs, dtype=np.int64),
        8192,
    )


def test_small_decode_batches_pay_for_the_weights():
    shape = Shape.of(MAVERICK)
    cost = CostModel(shape, H100_SXM, Precision(), 1, 16, 8)
    layers, shared = cost.attention_layers(_decode_batch(1, 100))
    weights = (shape.non_expert_params - 2 * shape.head_params) * 2  # bf16, the embedding is a gather
    assert layers.sum() + len(shape.moe_layers) * shared.sum() == pytest.approx(
        weights / H100_SXM.bandwidth + shape.num_layers * H100_SXM.layer_overhead_s, rel=0.02
    )
    wide = cost.attention_layers(_decode_batch(4096, 100))[0].sum()
    assert wide > 2 * layers.sum()  # compute-bound at 4096 tokens


def test_crossing_nodes_costs_more_than_nvlink():
    cost_one = CostModel(Shape.of(MAVERICK), H100_SXM, Precision(), 2, 6, 22)  # 8 GPUs: one node
    cost_two = CostModel(Shape.of(MAVERICK), H100_SXM, Precision(), 4, 12, 11)  # 16 GPUs: two nodes
    rows_one = np.full((2, 24, 6), 512)
    rows_two = np.full((4, 24, 12), 256)
    assert (cost_two.exchange(rows_two, 10240) > 2 * cost_one.exchange(rows_one, 10240)).all()


def test_memory_plan_rejects_experts_that_do_not_fit():
    shape = Shape.of(MAVERICK)
    with pytest.raises(ValueError, match="fp8 weights"):
        memory_plan(shape, H100_SXM, Precision(), slots_per_worker=16, block_size=16)  # bf16 on 8 GPUs
    plan = memory_plan(shape, H100_SXM, Precision(weight_bytes=1), slots_per_worker=16, block_size=16)
    assert plan.num_kv_blocks > 100_000


def test_arrival_shapes():
    rng = np.random.default_rng(0)
    assert np.allclose(np.diff(ArrivalSpec.parse("constant:4").times(9, rng)), 0.25)
    t = ArrivalSpec.parse("step:10:100:20").times(3000, rng)
    assert ((t < 20).sum() / 20) == pytest.approx(10, rel=0.2)
    assert ((t >= 20) & (t < 40)).sum() / 20 == pytest.approx(100, rel=0.2)
    t = ArrivalSpec.parse("bursty:5:200:1:10").times(5000, rng)
    in_burst = np.mod(t, 10) < 1
    assert in_burst.mean() == pytest.approx(200 / (200 + 9 * 5), abs=0.05)
    t = ArrivalSpec.parse("ramp:0:100:50").times(2000, rng)
    assert (t < 25).sum() < (t > 25).sum()
    assert np.all(np.diff(t) >= 0)


def test_lengths_and_bad_specs():
    rng = np.random.default_rng(0)
    x = LengthSpec.parse("lognormal:1000:0.5", 1500).sample(20000, rng)
    assert x.min() >= 1 and x.max() == 1500 and 850 < x.mean() < 1050
    u = LengthSpec.parse("uniform:3:5").sample(1000, rng)
    assert set(u.tolist()) == {3, 4, 5}
    for bad in ("gamma:3", "poisson", "poisson:-1", "bursty:1:2:5:3"):
        with pytest.raises(ValueError):
            ArrivalSpec.parse(bad)
    with pytest.raises(ValueError, match="A <= B"):
        LengthSpec.parse("uniform:9:3")
    with pytest.raises(ValueError, match="ascending"):
        Workload(np.array([1.0, 0.5]), np.array([1, 1]), np.array([1, 1]))


def test_cli_prints_a_summary(capsys, tmp_path):
    out = tmp_path / "summary.json"
    args = [
        "run",
        "--model",
        "tiny-maverick",
        "--attention",
        "2",
        "--experts",
        "4",
        "--requests",
        "40",
        "--arrival",
        "poisson:50",
        "--prompt",
        "uniform:8:64",
        "--output",
        "const:16",
        "--json",
        str(out),
    ]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "40/40 finished" in text and "TPOT" in text and "balancedness" in text
    assert out.exists()


def test_arrivals_within_a_duration():
    rng = np.random.default_rng(0)
    assert np.allclose(ArrivalSpec.parse("constant:4").times_within(2.0, rng), np.arange(8) / 4)
    t = ArrivalSpec.parse("step:10:100:20").times_within(40.0, rng)
    assert (np.diff(t) >= 0).all() and t[0] >= 0 and t[-1] < 40
    assert 150 < (t < 20).sum() < 250 and 1800 < (t >= 20).sum() < 2200
    assert ArrivalSpec.parse("poisson:0.001").times_within(1.0, rng).size <= 1


def _decode_under_a_reshuffle(shift_threshold: float | None, reshuffle_every_s: float | None):
    """32 long requests decoding on 8 expert workers; the hot experts move every
    `reshuffle_every_s` simulated seconds. Returns the simulator after 200 steps and, per step,
    the service's count of detected shifts and its window's length."""
    policy = RebalanceConfig(
        window_steps=128, interval_steps=32, report_every=8, shift_threshold=shift_threshold
    )
    cfg = tiny_config(
        hardware=H100_SXM,
        num_expert_workers=8,
        redundant_slots_per_worker=2,
        expert_skew=1.2,
        scheduler=SchedulerConfig(max_num_seqs=32, token_budget=512),
        num_kv_blocks=20000,
        rebalance=policy,
        reshuffle_every_s=reshuffle_every_s,
        plan_seconds=0.002,  # about one decode step
    )
    sim = SimCluster(cfg)
    for _ in range(32):
        sim.add(8, 400)
    seen = []
    for _ in range(200):
        sim.step()
        seen.append((sim.reshuffles, sim.service.load_shifts, sim.service.window.num_steps))
    return sim, seen


def test_the_simulator_sees_a_reshuffle_through_the_engines_own_policy():
    sim, seen = _decode_under_a_reshuffle(3.0, reshuffle_every_s=0.15)
    moved = next(t for t, (reshuffles, _, _) in enumerate(seen) if reshuffles)  # new shares from this step
    detected = next(t for t, (_, shifts, _) in enumerate(seen) if shifts)
    assert 60 < moved < detected <= moved + 16  # at the first or second report after the move
    assert abs(seen[detected][2] - (detected - moved + 1)) <= 1  # the window kept the new steps only
    assert sim.service.load_shifts == sim.reshuffles  # each move seen once, nothing else taken for one
    # without detection the window mixes old and new load: the same steps balance worse
    plain, _ = _decode_under_a_reshuffle(None, reshuffle_every_s=0.15)

    def balancedness(s: SimCluster) -> float:
        rows = sum(step.worker_rows for step in s.steps[detected + 8 : detected + 40]).astype(float)
        return float((rows.mean(axis=1) / rows.max(axis=1)).mean())

    assert balancedness(sim) > balancedness(plain) + 0.05


def test_a_constant_load_is_never_taken_for_a_shift():
    sim, seen = _decode_under_a_reshuffle(3.0, reshuffle_every_s=None)
    assert sim.service.load_shifts == 0 and seen[-1][2] == 128  # the window filled and stayed full
