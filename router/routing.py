"""Replica choice: which physical slot serves each routed token, the one rule for every caller.

The k-th token routed to logical expert e in one batch goes to replica (k + offset) % logcnt[e]
of e, with offset = step id + dp_rank: each expert's tokens split within one of even, and the
remainder rotates over steps and ranks. The dispatcher calls `ReplicaTable.slots` per MoE layer;
the simulator calls `ReplicaTable.slot_rows` for every rank and layer of a step at once, which
evaluates the same rule (a test holds the two equal).
"""

from __future__ import annotations

import numpy as np
import torch

from router.placement import Placement, occurrence_rank


def choose_replica(
    expert_idx: torch.Tensor,
    log2phy: torch.Tensor,
    logcnt: torch.Tensor,
    offset: int = 0,
    check_values: bool = True,
) -> torch.Tensor:
    """The physical slot for each token of one layer: the k-th token routed to expert e in this
    batch goes to replica (k + offset) % logcnt[e], so each expert's tokens split within one of
    even, deterministically. `offset` (e.g. step id + dp_rank) rotates who gets the remainder, so
    many small decode batches do not all favour replica 0. Runs on the tensors' device with no
    host sync, except `check_values`, which reads the entries to check their range.
    expert_idx int [T], log2phy int64 [E, R], logcnt int64 [E] (one layer) -> slot int64 [T]."""
    if log2phy.dim() != 2 or logcnt.dim() != 1 or log2phy.shape[0] != logcnt.shape[0]:
        raise ValueError(
            f"need log2phy [E, R] and logcnt [E], got {list(log2phy.shape)}, {list(logcnt.shape)}"
        )
    if expert_idx.dim() != 1 or not all(_is_integer(t) for t in (expert_idx, log2phy, logcnt)):
        raise ValueError(
            f"need integer tensors and expert_idx [T], got expert_idx {expert_idx.dtype} "
            f"{list(expert_idx.shape)}, log2phy {log2phy.dtype}, logcnt {logcnt.dtype}"
        )
    num_experts = logcnt.shape[0]
    if check_values and expert_idx.numel() and (expert_idx.min() < 0 or expert_idx.max() >= num_experts):
        raise ValueError(f"expert_idx entries must be in [0, {num_experts})")
    if check_values and (logcnt.min() < 1 or logcnt.max() > log2phy.shape[1]):
        raise ValueError(f"logcnt entries must be in [1, R = {log2phy.shape[1]}]")
    expert_idx = expert_idx.long()
    rank = occurrence_rank(expert_idx, num_experts)
    return log2phy[expert_idx, (rank + offset) % logcnt[expert_idx]]


class ReplicaTable:
    """One placement map's replica choice, with the lookups precomputed once per map."""

    def __init__(self, placement: Placement) -> None:
        self.placement = placement
        # where every expert of a layer has one replica there is nothing to choose: one lookup
        single = (placement.logcnt == 1).all(dim=1).tolist()
        self._forced = [placement.log2phy[m, :, 0] if one else None for m, one in enumerate(single)]
        self._batched: dict[int, _BatchedTable] = {}

    def slots(self, moe_idx: int, expert_idx: torch.Tensor, offset: int) -> torch.Tensor:
        """The physical slot of each token of one MoE layer: expert_idx int64 [T] -> int64 [T]."""
        forced = self._forced[moe_idx]
        if forced is not None:
            return forced.to(expert_idx.device)[expert_idx]
        p = self.placement
        return choose_replica(expert_idx, p.log2phy[moe_idx], p.logcnt[moe_idx], offset)

    def slot_rows(self, counts: np.ndarray, step_id: int) -> np.ndarray:
        """Rows per (rank, MoE layer, physical slot) int64 [M, L, W*S] for the tokens counted per
        (rank, layer, logical expert) in counts int64 [M, L, E], rank r choosing with offset
        step_id + r, exactly as `slots` per rank and layer would."""
        num_ranks = counts.shape[0]
        if num_ranks not in self._batched:
            self._batched[num_ranks] = _BatchedTable(self.placement, num_ranks)
        return self._batched[num_ranks].slot_rows(counts, step_id)


class _BatchedTable:
    """`choose_replica` over every (rank, layer) of a step in one call.

    A token's key is (rank, layer, expert), and rank r's rows of the table list each expert's
    replicas rotated by r, so offset=step_id on them picks exactly what offset=step_id + r picks
    on the plain rows. A token's replica depends only on how many earlier tokens share its key,
    so keys of other ranks and layers change nothing, and neither does the order of the tokens
    (drawn independently): each replica's share of a key's tokens is counted from the key's
    count, without laying the tokens out. Experts with one replica go to it directly (what
    choose_replica would pick too)."""

    def __init__(self, placement: Placement, num_ranks: int) -> None:
        self.placement = placement
        num_layers, num_experts, max_replicas = placement.log2phy.shape
        num_slots = placement.num_slots
        group = np.arange(num_ranks * num_layers).reshape(num_ranks, num_layers, 1)
        target = (group * num_slots + placement.log2phy[:, :, 0].numpy()[None]).ravel()
        single = np.broadcast_to((placement.logcnt == 1).numpy()[None], (num_ranks, num_layers, num_experts))
        self._single_pos = np.flatnonzero(single.ravel())
        self._single_target = target[self._single_pos]
        self._replicated_pos = np.flatnonzero(~single.ravel())
        self._size = num_ranks * num_layers * num_slots
        if self._replicated_pos.size == 0:
            return
        cnt = placement.logcnt.reshape(-1, 1)  # [L * E, 1]
        j = torch.arange(max_replicas)
        flat = placement.log2phy.reshape(-1, max_replicas)
        rows = [torch.where(j < cnt, flat.gather(1, (j + r) % cnt), -1) for r in range(num_ranks)]
        pos = self._replicated_pos
        # per replicated key: its replicas' slots in the step's flat [M, L, W*S] rows, rotated by
        # rank, and how many there are (entries past the count are never used)
        self._replicas = torch.cat(rows).numpy()[pos] + (pos // num_experts * num_slots)[:, None]
        self._count = placement.logcnt.reshape(-1).repeat(num_ranks).numpy()[pos][:, None]
        self._used = np.arange(max_replicas)[None, :] < self._count

    def slot_rows(self, counts: np.ndarray, step_id: int) -> np.ndarray:
        num_ranks, num_layers, num_experts = counts.shape
        flat = counts.ravel()
        rows = np.bincount(self._single_target, weights=flat[self._single_pos], minlength=self._size)
        rows = rows.astype(np.int64)
        if self._replicated_pos.size:
            # the t-th of a key's c tokens goes to replica (t + step_id) % k: replica j gets the
            # t < c with t = j - step_id (mod k), counted rather than drawn one by one
            c, k = flat[self._replicated_pos][:, None], self._count
            j = np.arange(self._replicas.shape[1])[None, :]
            share = c // k + ((j - step_id) % k < c % k)
            used = self._used
            rows += np.bincount(self._replicas[used], weights=share[used], minlength=self._size).astype(
                np.int64
            )
        return rows.reshape(num_ranks, num_layers, self.placement.num_slots)


def _is_integer(tensor: torch.Tensor) -> bool:
    return not (tensor.dtype.is_floating_point or tensor.dtype.is_complex or tensor.dtype == torch.bool)
