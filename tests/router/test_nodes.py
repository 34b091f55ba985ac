"""Node-aware placement: replicas of one expert spread over nodes, nothing else changed."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from router.nodes import same_node_replicas, spread_over_nodes
from router.placement import rebalance, static_placement


def test_redundant_replicas_leave_their_twin_s_node():
    # 3 workers x 3 slots for 6 experts: the redundant slots (worker 2) hold experts 0, 1, 2, whose
    # first replicas are on worker 0, the same node as worker 2
    p = static_placement(1, 6, num_workers=3, slots_per_worker=3)
    nodes = ["a", "b", "a"]
    assert same_node_replicas(p, nodes) == 3
    spread = spread_over_nodes(p, nodes)
    assert same_node_replicas(spread, nodes) == 0
    assert torch.equal(spread.logcnt, p.logcnt) and spread.version == p.version


def test_one_node_or_no_conflict_is_left_alone():
    p = static_placement(2, 6, num_workers=3, slots_per_worker=3)
    assert spread_over_nodes(p, ["n", "n", "n"]) is p
    q = static_placement(1, 6, num_workers=3, slots_per_worker=2)
    assert spread_over_nodes(q, ["a", "b", "c"]) is q


@settings(max_examples=50, deadline=None)
@given(
    st.integers(4, 20),
    st.integers(2, 5),
    st.integers(1, 3),
    st.lists(st.integers(0, 2), min_size=5, max_size=5),
    st.integers(0, 2**31),
)
def test_spreading_never_adds_a_conflict_and_keeps_the_replicas(
    num_experts, num_workers, extra, node_ids, seed
):
    slots = -(-num_experts // num_workers) + extra
    g = torch.Generator().manual_seed(seed)
    load = torch.randint(0, 100, (2, num_experts), generator=g).double()
    p = rebalance(load, num_workers, slots)
    nodes = node_ids[:num_workers]
    spread = spread_over_nodes(p, nodes, load)
    assert same_node_replicas(spread, nodes) <= same_node_replicas(p, nodes)
    assert torch.equal(spread.logcnt, p.logcnt)
    assert torch.equal(spread.phy2log.sort(dim=1).values, p.phy2log.sort(dim=1).values)
