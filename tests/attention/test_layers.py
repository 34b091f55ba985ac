"""rms_norm: torch's fused op on fp32, the Llama-order formula on other dtypes; the same numbers."""

from __future__ import annotations

import pytest
import torch

from attention.layers import rms_norm


def _llama_order(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    xf = x.float()
    y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x)
    return y if weight is None else y * weight


@pytest.mark.parametrize("shape", [(1, 256), (7, 5120), (3, 10, 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_is_the_llama_formula_bit_for_bit(shape, dtype):
    g = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(*shape, generator=g) * 7).to(dtype)
    weight = torch.randn(shape[-1], generator=g).to(dtype)
    for w in (weight, None):
        got = rms_norm(x, w, 1e-5)
        assert got.dtype == dtype and torch.equal(got, _llama_order(x, w, 1e-5))
