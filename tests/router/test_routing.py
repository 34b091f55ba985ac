"""Replica choice: the dispatcher's per-layer call and the simulator's batched call agree."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from router.placement import rebalance, static_placement
from router.routing import ReplicaTable, choose_replica
from sim.routing import popularity


@pytest.mark.parametrize("step_id", [0, 11, 1001])
def test_slot_rows_is_slots_per_rank_and_layer(step_id):
    """One call over all ranks and layers picks what the dispatcher's per-layer calls pick."""
    num_layers, num_experts, num_workers, slots = 3, 16, 4, 6
    load = torch.from_numpy(popularity((1, 3, 5), num_experts, 1.2, skew_seed=2)) * 1000
    placement = rebalance(load, num_workers, slots)
    assert (placement.logcnt > 1).any() and (placement.logcnt == 1).any()
    counts = np.random.default_rng(step_id).integers(0, 9, (3, num_layers, num_experts))
    table = ReplicaTable(placement)
    got = table.slot_rows(counts, step_id)
    for rank in range(3):
        for layer in range(num_layers):
            tokens = torch.from_numpy(np.repeat(np.arange(num_experts), counts[rank, layer]))
            slot = table.slots(layer, tokens, step_id + rank)
            direct = choose_replica(tokens, placement.log2phy[layer], placement.logcnt[layer], step_id + rank)
            assert torch.equal(slot, direct)
            expected = np.bincount(slot.numpy(), minlength=placement.num_slots)
            assert (got[rank, layer] == expected).all()
            per_expert = np.bincount(placement.phy2log[layer].numpy(), weights=got[rank, layer], minlength=16)
            assert (per_expert == counts[rank, layer]).all()  # each slot got its own expert's tokens


def test_a_layer_without_replicas_is_a_lookup():
    placement = static_placement(2, 8, num_workers=2, slots_per_worker=4)
    tokens = torch.tensor([7, 0, 3, 3, 5])
    assert ReplicaTable(placement).slots(1, tokens, offset=5).tolist() == [7, 0, 3, 3, 5]
