"""The rebalancing state machine: when it reports, plans, stages and switches."""

from __future__ import annotations

import pytest

from router.placement import rebalance, static_placement
from router.rebalancing import Phase, RebalanceConfig, Rebalancing, slot_changes


def test_slot_changes_name_only_moved_slots():
    old = static_placement(2, 4, num_workers=2, slots_per_worker=3)
    load = old.phy2log.new_zeros((2, 4)).double()
    load[1, 3] = 100.0
    new = rebalance(load, 2, 3, previous=old, min_gain=0.0)
    changes = slot_changes(old, new)
    moved = {
        (layer, worker * 3 + slot) for worker, c in enumerate(changes) for layer, d in c.items() for slot in d
    }
    assert moved == {(int(a), int(b)) for a, b in (old.phy2log != new.phy2log).nonzero()}
    for worker, c in enumerate(changes):
        for layer, d in c.items():
            for slot, expert in d.items():
                assert new.phy2log[layer, worker * 3 + slot] == expert


def test_reports_every_report_every_steps_and_asks_for_a_plan_only_when_enabled():
    placement = static_placement(2, 4, num_workers=2, slots_per_worker=3)
    off = Rebalancing(RebalanceConfig(enabled=False, report_every=3), placement)
    actions = [off.after_step() for _ in range(6)]
    assert [a.report for a in actions] == [False, False, True, False, False, True]
    assert not any(a.ask_plan for a in actions) and off.phase is Phase.COLLECTING
    on = Rebalancing(RebalanceConfig(report_every=2), placement)
    assert [on.after_step().ask_plan for _ in range(2)] == [False, True]
    assert on.phase is Phase.PLANNING and on.busy


def test_one_plan_at_a_time_then_stage_then_switch():
    old = static_placement(2, 4, num_workers=2, slots_per_worker=3)
    load = old.phy2log.new_zeros((2, 4)).double()
    load[0, 1] = 50.0
    new = rebalance(load, 2, 3, previous=old, min_gain=0.0)
    m = Rebalancing(RebalanceConfig(report_every=1), old)
    assert m.after_step().ask_plan
    assert m.after_step().report and not m.after_step().ask_plan  # still planning: no second plan
    changes = m.planned(new)
    assert changes == slot_changes(old, new) and m.phase is Phase.STAGING
    assert not m.after_step().ask_plan  # no plan while staging either
    assert m.placement is old  # steps keep the old map until every worker has staged
    assert m.staged() is new and m.placement is new and m.phase is Phase.COLLECTING
    assert m.after_step().ask_plan


def test_a_plan_that_moves_nothing_goes_back_to_collecting():
    m = Rebalancing(RebalanceConfig(report_every=1), static_placement(1, 4, 2, 2))
    m.after_step()
    assert m.planned(None) is None and m.phase is Phase.COLLECTING


def test_out_of_order_answers_are_refused():
    m = Rebalancing(RebalanceConfig(), static_placement(1, 4, 2, 2))
    with pytest.raises(RuntimeError, match="not planning"):
        m.planned(None)
    with pytest.raises(RuntimeError, match="nothing is staging"):
        m.staged()
