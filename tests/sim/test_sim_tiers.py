"""Elastic tiers in the simulator: a resize changes the ranks and loses nothing, the tier
autoscaler (the engine's own) scales up under a step within its bounds and decides what
`TierAutoscaler` decides on the same measurements, Serve's replica policy, the CLI's table."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from engine.autoscale import AutoscalerConfig, TierAutoscaler, TierBounds
from engine.scheduler import SchedulerConfig
from sim.cluster import SimConfig
from sim.costmodel import CPU_2CORE, Precision
from sim.elastic import ElasticCluster, ResizeCosts
from sim.models import model_config
from sim.run import main
from sim.tiers import ServePolicy, ServeState, run_serve, run_tiers, serve_decide, workload_for
from sim.workload import ArrivalSpec, LengthSpec, make_workload

FAST = ResizeCosts(worker_start_s=0.2, load_bandwidth=1e9)


def tiny_config(**kw: object) -> SimConfig:
    base = {
        "model": model_config("tiny-maverick"),
        "hardware": CPU_2CORE,
        "precision": Precision(4, 4, 4),
        "num_attention": 1,
        "num_expert_workers": 1,
        "scheduler": SchedulerConfig(max_num_seqs=4, token_budget=40),
        "block_size": 4,
        "num_kv_blocks": 1024,
        "expert_skew": 1.2,
    }
    return SimConfig(**{**base, **kw})


def step_load(n: int = 120, rate: str = "step:2:40:1.5"):
    return make_workload(
        n, ArrivalSpec.parse(rate), LengthSpec.parse("uniform:4:24"), LengthSpec.parse("const:8")
    )


def _drive(sim: ElasticCluster, prompts: list[int], output: int = 8) -> None:
    for p in prompts:
        sim.add(p, output)
    while sim.has_unfinished or sim.resizing:
        if sim.has_unfinished:
            sim.step()
        elif not sim.maybe_switch():
            sim.now = sim.pending.ready_s


def test_a_resize_changes_the_ranks_and_loses_nothing():
    """Grow both tiers while requests run, then shrink both (a rank drains): every request
    finishes once, nothing is recomputed, every routed row is computed by some worker."""
    sim = ElasticCluster(tiny_config(num_attention=2, num_expert_workers=2), FAST)
    _drive(sim, [10, 20, 5, 17])
    sim.resize(3, 5)
    assert sim.sizes == (2, 2) and sim.resizing  # steps go on with the old members
    _drive(sim, [12, 9, 30, 4, 8, 22])
    assert sim.sizes == (3, 5) and len(sim.schedulers) == 3 and sim.cost.num_workers == 5
    assert sim.placement.num_workers == 5 and sim.rows_computed.shape[1] == 5
    for p in [15, 6, 11, 19, 7]:
        sim.add(p, 12)
    sim.resize(1, 2)
    first_draining = [r for r in sim.requests.values() if r.dp_rank > 0 and r.finish_s is None]
    assert first_draining  # the leaving ranks still hold requests: they finish there
    _drive(sim, [])
    assert sim.sizes == (1, 2) and len(sim.schedulers) == 1 and sim.placement.num_workers == 2
    assert [r.after for r in sim.resizes] == [(3, 5), (1, 2)]
    assert all(r.switched_s >= r.requested_s for r in sim.resizes)
    requests = list(sim.requests.values())
    assert all(r.finish_s is not None for r in requests)
    assert all(r.tokens_scheduled == r.prompt_len + r.output_len - 1 for r in requests)  # none redone
    assert (sim.rows_computed.sum(axis=1) + sim.rows_computed_gone == sim.rows_routed).all()
    counts = [n for _, n in sim.held]
    assert counts == [4, 8, 8, 8, 3]  # held from the request (new) and up to the switch (leaving)


def test_bad_resizes_are_refused():
    sim = ElasticCluster(tiny_config(), FAST)
    with pytest.raises(ValueError, match="expert workers"):
        sim.resize(1, 129)
    sim.resize(1, 2)
    with pytest.raises(ValueError, match="in flight"):
        sim.resize(1, 3)


AUTO = AutoscalerConfig(
    enabled=True,
    expert=TierBounds(1, 3),
    attention=TierBounds(1, 2),
    target_tokens_per_expert_worker=4.0,
    max_waiting_per_attention_worker=1.0,
    upscale_delay_s=0.2,
    downscale_delay_s=0.6,
    cooldown_s=0.2,
    interval_s=0.1,
)


def test_the_tier_autoscaler_scales_up_under_a_step_within_its_bounds():
    run, sim, scaler = run_tiers(tiny_config(), AUTO, FAST, step_load())
    assert all(r.finish_s is not None for r in run.requests)
    assert max(w for _, _, w in run.sizes) > 1 and max(m for _, m, _ in run.sizes) > 1  # both tiers grew
    assert all(1 <= m <= 2 and 1 <= w <= 3 for _, m, w in run.sizes)
    first_up = next(t for t, m, w in run.sizes if (m, w) != (1, 1))
    assert first_up > 1.5  # after the step, not before
    assert run.worker_seconds() > 2 * run.end_s  # it held more than the two it started with


class _Fixed:
    """A window that reads back recorded measurements."""

    def __init__(self, m):
        self.m = m

    def take(self, *_):
        return self.m


def test_the_sims_decisions_are_the_tier_autoscalers():
    """The sim runs `TierAutoscaler` itself: replaying its measurements through a fresh one gives
    the same decisions, and every resize it made is a decision that changed the sizes."""
    _, sim, scaler = run_tiers(tiny_config(), AUTO, FAST, step_load())
    replay = TierAutoscaler(AUTO)
    for tick in scaler.history:
        replay.window = _Fixed(tick.measurements)
        replay.tick(tick.measurements.time_s, 0, 0, resizing=tick.decision is None)
    assert [t.decision for t in replay.history] == [t.decision for t in scaler.history]
    asked = [
        (t.decision.num_attention, t.decision.num_expert)
        for t in scaler.history
        if t.decision is not None and t.decision.changes(t.measurements)
    ]
    assert asked and asked == [r.after for r in sim.resizes]
    assert all(t.measurements.tokens_per_step >= 0 for t in scaler.history)


def test_serve_decide_holds_the_delay_and_jumps():
    p = ServePolicy(1, 4, target_ongoing_requests=10, upscale_delay_s=2, downscale_delay_s=5)
    n, s = serve_decide(p, 35, 1, 0.0, ServeState())
    assert n == 1  # direction noted, delay not held yet
    n, s = serve_decide(p, 35, 1, 1.0, s)
    assert n == 1
    n, s = serve_decide(p, 35, 1, 2.0, s)
    assert n == 4  # in one jump, as Serve does
    n, s = serve_decide(p, 0, 4, 3.0, s)
    n, s = serve_decide(p, 0, 4, 8.0, s)
    assert n == 1
    assert serve_decide(p, 999, 4, 9.0, ServeState(1, 0.0))[0] == 4  # never above max


def test_serve_replicas_scale_up_under_a_step_and_lose_nothing():
    policy = ServePolicy(
        1,
        3,
        target_ongoing_requests=3,
        upscale_delay_s=0.2,
        downscale_delay_s=0.5,
        look_back_s=0.3,
        interval_s=0.1,
    )
    run = run_serve(tiny_config(), policy, FAST, step_load())
    assert len(run.requests) == 120 and all(r.finish_s is not None for r in run.requests)
    assert max(n for _, n in run.held) > 2 and run.held[0] == (0.0, 2)  # 1 + 1 workers a replica
    up_only = replace(policy, max_replicas=5, target_ongoing_requests=2, downscale_delay_s=1e6)
    held = [n for _, n in run_serve(tiny_config(), up_only, FAST, step_load(150, "ramp:2:60:3")).held]
    assert held == sorted(held) and held[-1] > 4  # up in steps; none may leave on the way
    fixed = run_serve(tiny_config(), ServePolicy(2, 2), FAST, step_load())
    assert [n for _, n in fixed.held] == [2, 4] and fixed.policy == "fixed-2"


def test_diurnal_arrivals():
    spec = ArrivalSpec.parse("diurnal:2:20:100")
    assert np.allclose(spec.rate(np.array([0.0, 50.0, 100.0, 25.0])), [2, 20, 2, 11])
    t = spec.times_within(100.0, np.random.default_rng(0))
    assert 900 < t.size < 1300 and (t[(t > 25) & (t < 75)].size > 3 * t[(t < 25) | (t > 75)].size)
    with pytest.raises(ValueError, match="PERIOD"):
        ArrivalSpec.parse("diurnal:1:2:0")
    w = workload_for(spec, 10.0, LengthSpec.parse("const:4"), LengthSpec.parse("const:2"), 0)
    assert len(w) and w.arrival_s[-1] < 10


def test_cli_prints_the_table(capsys):
    args = ["tiers", "--model", "tiny-maverick", "--hardware", "cpu", "--weight-bytes", "2"]
    args += ["--attention", "1", "--experts", "1", "--max-replicas", "2", "--duration", "2"]
    args += ["--load", "step:2:20:1", "--prompt", "uniform:4:16", "--output", "const:4"]
    args += ["--worker-start", "0.1", "--upscale-delay", "0.2", "--downscale-delay", "0.5"]
    args += ["--target-ongoing", "2", "--target-tokens", "2", "--max-num-seqs", "4", "--kv-blocks", "512"]
    args += ["--policies", "fixed-min,fixed-max,serve,tiers"]
    assert main(args) == 0
    out = capsys.readouterr().out
    for policy in ("| fixed-1 |", "| fixed-2 |", "| serve |", "| tiers |"):
        assert policy in out
    assert "GPU-hours" in out and "SLO met" in out
    assert "over time" in out and "  tiers step:2:20:1: 0s 1+1" in out  # workers per tier over time
