"""The survivors' map after expert workers are lost: every expert kept, survivors' replicas
untouched where possible, the fewest slots reloaded."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from router.placement import rebalance, static_placement
from router.recovery import grow, shrink, survivor_changes

PROPERTY = settings(max_examples=60, deadline=None)


@st.composite
def failures(draw):
    num_experts = draw(st.integers(2, 24))
    num_workers = draw(st.integers(2, min(6, num_experts)))
    slots = math.ceil(num_experts / num_workers) + draw(st.integers(0, 3))
    num_layers = draw(st.integers(1, 3))
    lost = draw(st.sets(st.integers(0, num_workers - 1), min_size=1, max_size=num_workers - 1))
    load = torch.tensor(
        draw(st.lists(st.lists(st.integers(0, 50), min_size=num_experts, max_size=num_experts),
                      min_size=num_layers, max_size=num_layers)),
        dtype=torch.float64,
    )  # fmt: skip
    placement = (
        rebalance(load, num_workers, slots)
        if draw(st.booleans())
        else static_placement(num_layers, num_experts, num_workers, slots)
    )
    return placement, sorted(lost), load


@PROPERTY
@given(failures())
def test_every_expert_survives_and_survivors_keep_what_they_can(problem):
    old, lost, load = problem
    new, survivors = shrink(old, lost, load)
    assert survivors == [w for w in range(old.num_workers) if w not in lost]
    assert new.num_workers == len(survivors) and new.version == old.version + 1
    assert new.slots_per_worker == max(old.slots_per_worker, math.ceil(old.num_experts / len(survivors)))
    assert bool((new.logcnt >= 1).all())  # every logical expert has a replica
    changes = survivor_changes(old, new, survivors)
    for m in range(old.num_layers):
        missing = {x for x in range(old.num_experts) if all(w in lost for w in old.workers_of(m, x))}
        reloaded = [(j, slot, x) for j, c in enumerate(changes) for slot, x in c.get(m, {}).items()]
        assert missing <= {x for _, _, x in reloaded}
        grown = sum(max(0, new.slots_per_worker - old.slots_per_worker) for _ in survivors)
        # only grown slots and reclaimed second replicas change: never more than needed
        assert len(reloaded) <= max(grown, len(missing))
        for j, slot, _ in reloaded:
            if slot < old.slots_per_worker:  # a reclaimed slot held a replica that had a twin
                held = old.experts_on_worker(m, survivors[j])[slot]
                assert new.logcnt[m, held] >= 1


def test_a_lost_replica_of_a_replicated_expert_costs_nothing():
    old = static_placement(1, 4, num_workers=3, slots_per_worker=2)  # 6 slots: 0 1 | 2 3 | 0 1
    new, survivors = shrink(old, [2])
    assert survivors == [0, 1] and new.slots_per_worker == 2
    assert survivor_changes(old, new, survivors) == [{}, {}]  # worker 2 held only second replicas


def test_new_replicas_prefer_nodes_that_do_not_hold_the_expert():
    old = static_placement(1, 4, num_workers=4, slots_per_worker=2)  # 0 1 | 2 3 | 0 1 | 2 3
    # worker 1 lost: experts 2 and 3 keep one replica each (worker 3, node "b"); the survivors need
    # 2 slots each for 4 experts, so nothing grows and nothing is reloaded
    new, survivors = shrink(old, [1], node_of_worker=["a", "a", "b", "b"])
    assert survivors == [0, 2, 3] and survivor_changes(old, new, survivors) == [{}, {}, {}]
    # lose both replicas of 2 and 3 at once: they come back on survivors, on the emptiest workers
    new, survivors = shrink(old, [1, 3], node_of_worker=["a", "a", "b", "b"])
    assert new.slots_per_worker == 2 and bool((new.logcnt >= 1).all())


def test_all_lost_or_too_many_slots_is_refused():
    old = static_placement(1, 8, num_workers=4, slots_per_worker=2)
    with pytest.raises(ValueError, match="all 4 expert workers are lost"):
        shrink(old, [0, 1, 2, 3])
    with pytest.raises(ValueError, match="need 4 slots each for 8 experts; at most 3 fit"):
        shrink(old, [0, 1], max_slots_per_worker=3)
    with pytest.raises(ValueError, match=r"lost expert workers \[7\]"):
        shrink(old, [7])


@PROPERTY
@given(failures(), st.integers(1, 3))
def test_growing_keeps_every_old_slot_and_fills_the_new_workers_with_hot_replicas(problem, num_new):
    old, _, load = problem
    new = grow(old, num_new, load)
    w, s = old.num_workers, old.slots_per_worker
    assert new.num_workers == w + num_new and new.slots_per_worker == s and new.version == old.version + 1
    assert torch.equal(new.phy2log[:, : w * s], old.phy2log)  # nothing of the old workers moves
    for m in range(old.num_layers):
        for j in range(w, w + num_new):
            row = new.experts_on_worker(m, j)
            assert len(set(row)) == min(s, old.num_experts)  # no expert twice on one new worker


def test_grown_replicas_go_to_the_hottest_experts():
    old = static_placement(1, 4, num_workers=2, slots_per_worker=2)
    load = torch.tensor([[10.0, 0.0, 90.0, 0.0]])
    new = grow(old, 1, load)
    assert new.experts_on_worker(0, 2) == [2, 0]  # 90 per replica, then 10
    with pytest.raises(ValueError, match="num_new must be >= 1"):
        grow(old, 0)
