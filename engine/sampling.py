"""Token sampling on the attention side: greedy, temperature, top-k, top-p, per-request seeds.

A sampled token's random draw depends only on the request's seed and the token's index in the
output, never on the batch, the step or the rank: a request recomputed elsewhere (after its
attention worker was lost, or after a preemption) draws the same tokens.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch

from engine.request import SamplingParams

_SEED_BITS = 63
_MIX = 0x9E3779B97F4A7C15  # 2^64 / golden ratio: spreads consecutive indices over the seed space


def new_seed() -> int:
    """A seed for a request that did not ask for one (fixed for its whole life)."""
    return random.getrandbits(_SEED_BITS)


def draw_seed(seed: int, token_index: int) -> int:
    """The generator seed of one draw: a mix of the request's seed and the token's index."""
    return (seed ^ ((token_index + 1) * _MIX)) % (1 << _SEED_BITS)


def sample(
    logits: torch.Tensor, params: Sequence[SamplingParams], seeds: Sequence[int], token_indices: Sequence[int]
) -> list[int]:
    """logits [N, V] fp32 on any device, one row per request -> N token ids. Row i draws with a
    generator on the logits' device seeded from (seeds[i], token_indices[i]). Host syncs: one for
    every greedy row together, one per sampled row."""
    greedy = logits.argmax(-1).tolist() if any(p.temperature == 0.0 for p in params) else []
    out = []
    for i, (row, p, seed, index) in enumerate(zip(logits, params, seeds, token_indices, strict=True)):
        out.append(greedy[i] if p.temperature == 0.0 else _sample_row(row, p, seed, index))
    return out


def _sample_row(row: torch.Tensor, p: SamplingParams, seed: int, index: int) -> int:
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
    generator = torch.Generator(device=row.device).manual_seed(draw_seed(seed, index))
    return int(torch.multinomial(probs, 1, generator=generator).item())
