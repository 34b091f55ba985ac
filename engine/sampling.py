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
ARGMAX_CHUNK = 64  # columns per chunk of `greedy_tokens`' first pass
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
    greedy = greedy_tokens(logits).tolist() if any(p.temperature == 0.0 for p in params) else []
    out = []
    for i, (row, p, seed, index) in enumerate(zip(logits, params, seeds, token_indices, strict=True)):
        out.append(greedy[i] if p.temperature == 0.0 else _sample_row(row, p, seed, index))
    return out


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """`logits.argmax(-1)` for [N, V] logits, the same indices (the first maximum of each row, NaN
    counting as the maximum), faster on a CPU: torch's CPU argmax is a scalar loop, about 7 ms at
    [32, 202048] on this machine, where `amax` is vectorized and takes 1.7 ms. So: the maximum of
    each chunk of `ARGMAX_CHUNK` columns, the first chunk holding the row's maximum (an argmax
    over V / 64 values), then the argmax inside that chunk. Columns beyond the last whole chunk
    form one more, smaller chunk."""
    n, vocab = logits.shape
    whole = vocab // ARGMAX_CHUNK * ARGMAX_CHUNK
    if logits.device.type != "cpu" or whole == 0:
        return logits.argmax(-1)
    body = logits[:, :whole].reshape(n, -1, ARGMAX_CHUNK)  # a view: rows are contiguous
    maxima = body.amax(-1)  # [N, V // chunk]
    if whole < vocab:
        maxima = torch.cat([maxima, logits[:, whole:].amax(-1, keepdim=True)], 1)
    chunk = maxima.argmax(-1)  # the first chunk holding the row's maximum (amax keeps NaN)
    starts = chunk * ARGMAX_CHUNK
    columns = starts[:, None] + torch.arange(ARGMAX_CHUNK, device=logits.device)
    inside = columns < vocab  # the short last chunk
    values = logits.gather(1, columns.clamp(max=vocab - 1)).masked_fill(~inside, float("-inf"))
    return starts + values.argmax(-1)


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
