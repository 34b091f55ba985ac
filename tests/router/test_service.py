"""The router service: windowed load, when it re-plans, the figures it reports."""

from __future__ import annotations

import pytest
import torch

from router.placement import static_placement
from router.rebalancing import RebalanceConfig
from router.service import LoadWindow, RouterService


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
