"""What happens to a step's logits between the lm_head and the sampler, and the logprobs returned.

`process` applies, per row, in this order: the repetition penalty (prompt and output), the
presence and frequency penalties (output), `logit_bias`, the stop-token mask of `min_tokens`,
and a grammar's allowed-token mask. It is pure: the same logits and request state give the same
result, so a replayed step samples the same tokens.

Logprobs are taken from the model's logits as they left the lm_head (log-softmax in fp32,
before any processing), the way vLLM reports them by default: they measure the model, not the
sampling settings.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from engine.request import Request

ROWS_PER_SLICE = 64  # prompt logprobs: lm_head rows at once (a row is vocab x 4 bytes)


@dataclass(frozen=True)
class TokenLogprob:
    """One position: the chosen token's logprob and rank (1 = most likely), and the top k."""

    token_id: int
    logprob: float
    rank: int
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob), most likely first


def process(
    logits: torch.Tensor, requests: Sequence[Request], allowed: torch.Tensor | None = None
) -> torch.Tensor:
    """logits [N, V] fp32, one row per request -> processed logits [N, V] (a new tensor when
    anything applies). `allowed` [N, V] bool: a grammar's mask (rows without a grammar all True)."""
    if allowed is None and not any(r.params.needs_processing for r in requests):
        return logits
    out = logits.clone()
    for i, request in enumerate(requests):
        if request.params.needs_processing:
            _process_row(out[i], request)
    if allowed is not None:
        out.masked_fill_(~allowed, float("-inf"))
    return out


def _process_row(row: torch.Tensor, request: Request) -> None:
    p = request.params
    vocab = row.numel()
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(request.all_token_ids)), dtype=torch.long)
        seen = seen[seen < vocab]
        values = row[seen]
        row[seen] = torch.where(values > 0, values / p.repetition_penalty, values * p.repetition_penalty)
    if (p.presence_penalty or p.frequency_penalty) and request.output_token_ids:
        counts = torch.bincount(torch.tensor(request.output_token_ids, dtype=torch.long), minlength=vocab)
        counts = counts[:vocab].to(row.dtype)
        row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)
    for token_id, bias in p.logit_bias:
        if 0 <= token_id < vocab:
            row[token_id] += bias
    if len(request.output_token_ids) < p.min_tokens and not p.ignore_eos:
        stops = [t for t in p.stop_token_ids if 0 <= t < vocab]
        row[stops] = float("-inf")


def token_logprobs(logits: torch.Tensor, token_ids: Sequence[int], k: Sequence[int]) -> list[TokenLogprob]:
    """logits [N, V] fp32, the token chosen at each row, and how many alternatives row i wants
    -> one TokenLogprob per row, from log_softmax(logits)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs[torch.arange(len(token_ids)), torch.tensor(list(token_ids), dtype=torch.long)]
    ranks = (logprobs > chosen[:, None]).sum(dim=-1) + 1
    top_k = max(k, default=0)
    top = torch.topk(logprobs, top_k, dim=-1) if top_k else None
    out = []
    for i, token_id in enumerate(token_ids):
        pairs = ()
        if top is not None and k[i]:
            pairs = tuple(zip(top.indices[i, : k[i]].tolist(), top.values[i, : k[i]].tolist(), strict=True))
        out.append(TokenLogprob(int(token_id), float(chosen[i]), int(ranks[i]), pairs))
    return out
