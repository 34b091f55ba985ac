"""Skewed routers: popularity over ordinary prompts follows roughly a Zipf law."""

from __future__ import annotations

import pytest
import torch

from model.skew import fitted_exponent, popularity, skew_router, zipf


def test_zipf_shares_sum_to_one_and_fall():
    p = zipf(128, 1.2)
    assert torch.isclose(p.sum(), torch.tensor(1.0)) and (p[:-1] >= p[1:]).all()


def test_rescaled_router_routes_by_the_ranking():
    g = torch.Generator().manual_seed(0)
    router = torch.randn(64, 32, generator=g)
    ranking = torch.randperm(64, generator=g)
    skewed = skew_router(router, 1.2, ranking)
    # directions are unchanged; only norms move
    torch.testing.assert_close(
        skewed / skewed.norm(dim=1, keepdim=True), router / router.norm(dim=1, keepdim=True)
    )
    x = torch.randn(20000, 32, generator=g)
    idx = (x @ skewed.T).argmax(-1)
    shares = popularity(idx, 64)
    assert torch.bincount(idx, minlength=64).argmax() == ranking[0]
    assert 0.9 < fitted_exponent(shares) < 1.5
    assert 0.15 < shares[0] < 0.40  # Zipf(1.2) over 64 gives the top expert ~0.25


def test_zero_skew_keeps_the_router_and_negative_is_refused():
    router = torch.randn(8, 4)
    assert torch.equal(skew_router(router, 0.0, torch.arange(8)), router)
    with pytest.raises(ValueError, match="expert-skew"):
        skew_router(router, -1.0, torch.arange(8))
