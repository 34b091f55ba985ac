"""Token sampling on the attention side: greedy, temperature, top-k, top-p, per-request seeds."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from engine.request import SamplingParams


def make_generator(seed: int | None) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, (1,)).item()))
    return g


def sample(
    logits: torch.Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator]
) -> list[int]:
    """logits [N, V] fp32, one row per request -> N token ids.

    Each row samples with its own generator, so a request's tokens do not depend on what else
    is in the batch.
    """
    out = []
    for row, p, g in zip(logits, params, generators, strict=True):
        out.append(int(row.argmax()) if p.temperature == 0.0 else _sample_row(row, p, g))
    return out


def _sample_row(row: torch.Tensor, p: SamplingParams, g: torch.Generator) -> int:
    scores = row / p.temperature
    if p.top_k > 0:
        kth = torch.topk(scores, min(p.top_k, scores.numel())).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if p.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        before = sorted_probs.cumsum(0) - sorted_probs  # mass strictly above each token
        sorted_probs = sorted_probs.masked_fill(before >= p.top_p, 0.0)
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=g).item())
