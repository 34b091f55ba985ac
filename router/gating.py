"""Top-1 gating with a sigmoid score (Llama 4): the routing half that runs on the attention side."""

from __future__ import annotations

import torch


def top1_gate(x: torch.Tensor, router_weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Route each token to one logical expert.

    x [T, H], router_weight [E, H] (no bias). Returns expert_idx [T] int64 and score [T] in x's
    dtype, score = sigmoid(top logit) computed in fp32. The caller scales the expert's INPUT by
    the score (not its output); the shared expert sees the unscaled x.
    """
    logits = x @ router_weight.T
    top_value, top_idx = logits.topk(1, dim=-1)  # (Tensor.max(dim) is ~100x slower on CPU here)
    top_value, top_idx = top_value[:, 0], top_idx[:, 0]
    score = torch.sigmoid(top_value.float()).to(x.dtype)
    return top_idx, score
