"""Balancedness: the one definition, per layer, overall and per step."""

from __future__ import annotations

import pytest
import torch

from router.balance import (
    balance_figures,
    balancedness,
    balancedness_per_layer,
    imbalance_per_layer,
    measured_worker_load,
)


def test_balancedness_and_imbalance_values():
    per_worker = torch.tensor([[1.0, 1.0], [2.0, 0.0], [0.0, 0.0], [3.0, 1.0]])
    assert balancedness_per_layer(per_worker).tolist() == [1.0, 0.5, 1.0, 2.0 / 3.0]
    assert imbalance_per_layer(per_worker).tolist() == [0.0, 1.0, 0.0, 0.5]


def test_balance_figures():
    figures = balance_figures(torch.tensor([[10, 10], [30, 10]]))
    assert figures["balancedness_per_layer"] == pytest.approx([1.0, 20 / 30])
    assert figures["balancedness"] == pytest.approx((10 + 20) / (10 + 30))
    assert figures["imbalance"] == pytest.approx(40 / 30 - 1)


def test_measured_worker_load_sums_each_workers_slots():
    assert measured_worker_load(torch.tensor([[1, 2, 3, 4]]), 2).tolist() == [[3, 7]]


def test_overall_is_sum_of_means_over_sum_of_maxes_and_batches_over_steps():
    steps = torch.tensor([[[10.0, 10.0], [30.0, 10.0]], [[0.0, 0.0], [0.0, 0.0]]])  # [steps, L, W]
    assert balancedness(steps).tolist() == [pytest.approx(30 / 40), 1.0]  # an idle step is perfect
    assert float(balancedness(steps[0])) == pytest.approx(30 / 40)


def test_bad_shape_is_refused():
    with pytest.raises(ValueError, match="worker loads must be"):
        balancedness_per_layer(torch.ones(3))
