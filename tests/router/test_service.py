"""The router service: windowed load, when it re-plans, a change of the hot experts, its figures."""

from __future__ import annotations

import math

import pytest
import torch

from router.placement import static_placement
from router.rebalancing import RebalanceConfig
from router.service import LoadWindow, RouterService, find_shift, shift_score


def test_window_keeps_only_recent_steps():
    w = LoadWindow(window_steps=2)
    for k in range(3):
        w.add(torch.full((1, 2), k), torch.full((1, 4), k))
    assert w.num_steps == 2 and w.expert_load().tolist() == [[3, 3]]


def test_replans_when_skewed_and_not_when_balanced():
    placement = static_placement(2, 8, num_workers=4, slots_per_worker=3)
    service = RouterService(placement, RebalanceConfig(interval_steps=1000, imbalance_threshold=0.2))
    balanced = torch.full((2, 8), 8, dtype=torch.long)
    slots = torch.zeros((2, 12), dtype=torch.long)
    slots[:, :8] = 8
    slots[:, 8:] = 8  # slots 8..11 replicate experts 0..3 in the static map: even per worker
    service.record([balanced.tolist()], [slots.tolist()])
    assert service.maybe_replan(step_id=1) is None
    hot = torch.zeros((2, 8), dtype=torch.long)
    hot[:, 5] = 100
    hot_slots = torch.zeros((2, 12), dtype=torch.long)
    hot_slots[:, 5] = 100  # worker 1 holds slot 5 and gets everything
    for _ in range(4):
        service.record([hot.tolist()], [hot_slots.tolist()])
    new = service.maybe_replan(step_id=2)
    assert new is not None and new.version == placement.version + 1
    assert int(new.logcnt[0, 5]) >= 3  # the hot expert got the redundant slots
    service.commit(new)
    m = service.metrics()
    assert m["rearrangements"] == 1 and m["placement_version"] == new.version


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="window_steps"):
        RebalanceConfig(window_steps=0)


# -- a change of the hot experts ----------------------------------------------------------------


def zipf_steps(num_steps: int, skew_seed: int, seed: int, tokens: int = 64) -> torch.Tensor:
    """Tokens per expert per step [T, 2, 16]: `tokens` top-1 draws per layer from Zipf(1.2) shares
    whose ranking of the experts depends on skew_seed (a shift of the hot experts is another one)."""
    gen = torch.Generator().manual_seed(skew_seed)
    shares = torch.arange(1, 17, dtype=torch.float64) ** -1.2
    rows = torch.stack([shares[torch.randperm(16, generator=gen)] for _ in range(2)])  # [2, 16]
    draws = torch.multinomial(
        rows, num_steps * tokens, replacement=True, generator=torch.Generator().manual_seed(seed)
    )
    steps = draws.view(2, num_steps, tokens).transpose(0, 1)  # [T, 2, tokens]
    return torch.nn.functional.one_hot(steps, 16).sum(2)


def test_shift_score_is_about_one_for_one_load_and_large_for_a_shift():
    same = zipf_steps(48, skew_seed=0, seed=1)
    other = zipf_steps(8, skew_seed=5, seed=2)
    for seed in range(5):  # two stretches of one load: sampling noise only
        steps = zipf_steps(48, skew_seed=0, seed=10 + seed)
        assert float(shift_score(steps[-8:].sum(0), steps[:-8].sum(0))) < 1.5
    assert float(shift_score(other.sum(0), same.sum(0))) > 4
    # batched: one score per leading index; a side without tokens scores 0
    batch = shift_score(torch.stack([other.sum(0), torch.zeros(2, 16)]), same.sum(0).expand(2, 2, 16))
    assert batch.shape == (2,) and float(batch[0]) > 4 and float(batch[1]) == 0.0


@pytest.mark.parametrize("num_new", [3, 8, 13])
def test_find_shift_says_how_many_steps_ago_the_hot_experts_changed(num_new):
    steps = torch.cat(
        [zipf_steps(60 - num_new, skew_seed=0, seed=1), zipf_steps(num_new, skew_seed=5, seed=2)]
    )
    shift = find_shift(steps, recent_steps=4, threshold=3.0)
    assert shift.num_new_steps == num_new and shift.score > 3.0


def test_find_shift_finds_nothing_in_one_load_or_a_short_window():
    for seed in range(5):
        shift = find_shift(zipf_steps(64, skew_seed=0, seed=seed), recent_steps=8, threshold=3.0)
        assert shift.num_new_steps is None and 0 < shift.score < 1.5
    shifted = torch.cat([zipf_steps(7, skew_seed=0, seed=1), zipf_steps(8, skew_seed=5, seed=2)])
    assert find_shift(shifted, recent_steps=8, threshold=3.0) == (0.0, None)  # 15 < 2 * 8 steps
    with pytest.raises(ValueError, match="recent_steps"):
        find_shift(shifted, recent_steps=0, threshold=3.0)


def feed(service: RouterService, steps: torch.Tensor, first_step: int) -> list:
    """Record `steps` 8 at a time (the engine's reports), asking for a plan after each report the
    way the rebalancer does; committing each plan at once. Returns the plans, None where none."""
    plans = []
    for k in range(0, steps.shape[0], 8):
        batch = steps[k : k + 8]
        service.record(list(batch), [service_slot_load(service, e) for e in batch])
        new = service.maybe_replan(first_step + k + batch.shape[0])
        if new is not None:
            service.commit(new)
        plans.append(new)
    return plans


def service_slot_load(service: RouterService, expert_load: torch.Tensor) -> torch.Tensor:
    """Each expert's tokens split evenly over its replicas in the service's current map (the
    dispatcher's replica choice, up to rounding)."""
    p = service.placement
    cnt = p.logcnt.gather(1, p.phy2log)
    return torch.gather(expert_load, 1, p.phy2log) // cnt


def test_a_shift_drops_the_old_load_and_replans_at_once():
    placement = static_placement(2, 16, num_workers=4, slots_per_worker=5)
    cfg = RebalanceConfig(window_steps=128, interval_steps=1000, imbalance_threshold=10.0, shift_steps=8)
    service = RouterService(placement, cfg)
    old, new = zipf_steps(96, skew_seed=0, seed=1), zipf_steps(16, skew_seed=5, seed=2)
    feed(service, old[:8], 0)  # the first plan (interval counted from step 0: not due, so none)
    assert service.window.num_steps == 8
    assert all(p is None for p in feed(service, old[8:], 8))  # one load: no shift, nothing due
    assert service.load_shifts == 0 and service.window.num_steps == 96
    plans = feed(service, new, 96)
    # the first report after the change sees it: the 8 steps after it stay, the 96 before go
    assert service.load_shifts == 1 and plans[0] is not None
    assert service.window.num_steps == 16 and torch.equal(service.window.expert_load(), new.sum(0))
    hottest = new.sum(0).argmax(1)  # the new hot expert of each layer got the most replicas
    assert all(
        int(plans[0].logcnt[m, e]) == int(plans[0].logcnt[m].max()) for m, e in enumerate(hottest.tolist())
    )
    m = service.metrics()
    assert m["load_shifts"] == 1 and m["load_shift_score"] < 1.5  # the last test: 8 new steps against 8


def test_no_shift_detection_when_turned_off():
    placement = static_placement(2, 16, num_workers=4, slots_per_worker=5)
    cfg = RebalanceConfig(
        window_steps=128, interval_steps=1000, imbalance_threshold=10.0, shift_threshold=None
    )
    service = RouterService(placement, cfg)
    steps = torch.cat([zipf_steps(96, skew_seed=0, seed=1), zipf_steps(16, skew_seed=5, seed=2)])
    assert all(p is None for p in feed(service, steps, 0))
    assert service.load_shifts == 0 and service.window.num_steps == 112


def test_keep_newest_forgets_older_steps():
    w = LoadWindow(window_steps=8)
    for k in range(5):
        w.add(torch.full((1, 2), k), torch.full((1, 4), k))
    w.keep_newest(2)
    assert w.num_steps == 2 and w.expert_load().tolist() == [[7, 7]] and w.slot_load().tolist() == [[7] * 4]
    assert w.expert_steps().shape == (2, 1, 2)
    w.keep_newest(5)  # more than it holds: all stay
    assert w.num_steps == 2
    w.keep_newest(0)
    assert w.num_steps == 0
    with pytest.raises(ValueError, match="num_steps"):
        w.keep_newest(-1)


@pytest.mark.parametrize(
    "bad",
    [{"shift_steps": 0}, {"shift_threshold": 0.0}, {"shift_threshold": -1.0}, {"shift_threshold": math.nan}],
)
def test_bad_shift_settings_are_refused(bad):
    with pytest.raises(ValueError, match="shift_"):
        RebalanceConfig(**bad)
