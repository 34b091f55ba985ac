"""The tier autoscaler as properties: inside its bounds, no flapping under a constant load, up
under a step, hysteresis and cooldowns."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.autoscale import (
    AutoscalerConfig,
    Decision,
    Measurements,
    State,
    TierAutoscaler,
    TierBounds,
    TierWindow,
    decide,
)

CFG = AutoscalerConfig(
    enabled=True,
    expert=TierBounds(1, 6),
    attention=TierBounds(1, 3),
    target_tokens_per_expert_worker=100,
    upscale_delay_s=2,
    downscale_delay_s=10,
    cooldown_s=5,
)


def run(cfg, loads, num_attention=1, num_expert=1, kv=0.3, waiting=0, dt=1.0):
    """Feed one measurement per second; apply every decision. Returns the sizes over time."""
    state, sizes = State(), []
    for t, tokens in enumerate(loads):
        m = Measurements(t * dt, num_attention, num_expert, tokens, kv, waiting)
        decision, state = decide(cfg, m, state)
        num_attention, num_expert = decision.num_attention, decision.num_expert
        sizes.append((num_attention, num_expert))
    return sizes


def test_a_step_up_in_load_adds_expert_workers_one_at_a_time_after_the_delay():
    sizes = run(CFG, [50] * 5 + [450] * 40)
    experts = [n for _, n in sizes]
    assert experts[:7] == [1] * 7  # the step at t=5 must hold for 2 s first
    assert experts[-1] in (4, 5)  # 450 tokens per step: 4-5 workers of 100 (within the dead band)
    assert all(b - a in (0, 1) for a, b in zip(experts, experts[1:], strict=False))
    changes = [t for t in range(1, len(experts)) if experts[t] != experts[t - 1]]
    assert all(b - a >= CFG.cooldown_s for a, b in zip(changes, changes[1:], strict=False))


def test_load_falling_away_shrinks_slower_than_it_grew():
    sizes = run(CFG, [0] * 60, num_expert=4)
    experts = [n for _, n in sizes]
    assert experts[9] == 4 and experts[-1] == 1
    assert experts.index(3) >= CFG.downscale_delay_s


@settings(max_examples=60, deadline=None)
@given(st.floats(0, 2000), st.integers(1, 6), st.floats(0, 1), st.integers(0, 20))
def test_a_constant_load_never_flaps(tokens, experts, kv, waiting):
    sizes = run(CFG, [tokens] * 80, num_expert=experts, kv=kv, waiting=waiting)
    for tier in (0, 1):
        series = [s[tier] for s in sizes]
        moves = [b - a for a, b in zip(series, series[1:], strict=False) if b != a]
        assert all(m == moves[0] for m in moves), series  # one direction only: no flapping
        bounds = CFG.attention if tier == 0 else CFG.expert
        assert all(bounds.min_workers <= n <= bounds.max_workers for n in series)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(0, 5000), min_size=1, max_size=60), st.lists(st.floats(0, 1), min_size=1, max_size=60)
)
def test_never_outside_bounds_whatever_it_sees(loads, kvs):
    state, na, ne = State(), 1, 1
    for t, (tokens, kv) in enumerate(zip(loads, kvs * len(loads), strict=False)):
        d, state = decide(CFG, Measurements(float(t), na, ne, tokens, kv, int(tokens) % 7), state)
        assert isinstance(d, Decision)
        assert 1 <= d.num_expert <= 6 and 1 <= d.num_attention <= 3
        assert abs(d.num_expert - ne) <= 1 and abs(d.num_attention - na) <= 1
        na, ne = d.num_attention, d.num_expert


def test_kv_pressure_and_waiting_requests_add_attention_workers():
    sizes = run(CFG, [100] * 20, kv=0.95)
    assert sizes[-1][0] > 1
    sizes = run(CFG, [100] * 20, kv=0.2, waiting=10)
    assert sizes[-1][0] > 1


def test_bad_configuration_is_refused():
    with pytest.raises(ValueError, match="min_workers <= max_workers"):
        TierBounds(3, 2)
    with pytest.raises(ValueError, match="target_kv_usage"):
        AutoscalerConfig(target_kv_usage=1.5)


def test_the_window_reduces_steps_to_the_measurements():
    w = TierWindow()
    w.add_step(routed_rows=400, num_moe_layers=4, kv_usage=0.2, num_waiting=3)
    w.add_step(routed_rows=800, num_moe_layers=4, kv_usage=0.5, num_waiting=1)
    m = w.take(12.0, num_attention=1, num_expert=2)
    assert m == Measurements(12.0, 1, 2, tokens_per_step=150.0, kv_usage=0.5, num_waiting=1)
    assert w.take(13.0, 1, 2).tokens_per_step == 0.0  # an idle interval


def test_the_controller_does_not_decide_while_a_resize_is_in_flight():
    """A busy interval is measured, not decided: the held direction and the cooldown stay as they
    were, and the resize comes at the first free interval once the delay has passed."""
    auto = TierAutoscaler(CFG)
    sizes, out = (1, 1), []
    for t in range(8):
        auto.window.add_step(routed_rows=450.0, num_moe_layers=1, kv_usage=0.3, num_waiting=0)
        d = auto.tick(float(t), *sizes, resizing=t in (1, 2))
        out.append(d)
        if d is not None:
            sizes = (d.num_attention, d.num_expert)
    assert out[:3] == [None] * 3  # t=0 starts the hold; t=1 and 2 busy (and within the delay)
    assert [t.decision is None for t in auto.history[:3]] == [False, True, True]
    assert out[3] is not None and sizes[1] == 2  # the hold went on through the busy intervals
    assert auto.state.expert.last_resize_s == 3.0
    assert all(d is None for d in out[4:])  # cooldown 5 s
