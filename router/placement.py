"""Expert placement policy: which logical expert each physical slot holds, per MoE layer.

Pure functions, torch tensors in and out, CPU only; no Ray, no I/O. Names follow DeepSeek EPLB:

- L = MoE layers, E = logical experts, W = expert workers, S = slots per worker, N = W * S slots.
- `phy2log` int64 [L, N]: physical slot -> logical expert. Slot s lives on worker s // S.
- `log2phy` int64 [L, E, R]: logical expert -> its slots in ascending order, padded with -1
  (R = the most replicas any expert has in any layer).
- `logcnt` int64 [L, E]: replicas per logical expert, >= 1 each, summing to N per layer.
- `load` float [L, E]: tokens per logical expert over a window (any real dtype, >= 0).

The policy: `replicate` gives the redundant slots (N - E) one at a time to the expert with the
highest load per replica; `pack` puts replicas on workers heaviest first, each into the
least-loaded worker with a free slot, so every worker has exactly S slots, then swaps replicas
off the busiest worker while that helps; `rebalance` runs both, never returns a layer worse than
`static_placement`, and prefers what is already in place because moving expert weights costs
time: replicas stay on their workers and in their slots where the counts allow, and a layer
whose gain is below `min_gain` is not touched at all.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import torch

_NOISE = 1e-9  # relative gains below this are float noise from summation order, not a gain


@dataclass(frozen=True, eq=False)
class Placement:
    """A versioned placement map for every MoE layer (shapes in the module docstring)."""

    phy2log: torch.Tensor  # int64 [L, W*S]
    log2phy: torch.Tensor  # int64 [L, E, R], padded with -1
    logcnt: torch.Tensor  # int64 [L, E]
    num_workers: int
    slots_per_worker: int
    version: int = 0

    def __post_init__(self) -> None:
        num_slots = self.num_workers * self.slots_per_worker
        if self.phy2log.dim() != 2 or self.phy2log.shape[1] != num_slots:
            raise ValueError(f"phy2log must be [L, {num_slots}], got {list(self.phy2log.shape)}")
        if self.logcnt.dim() != 2 or self.logcnt.shape[0] != self.phy2log.shape[0]:
            raise ValueError(f"logcnt must be [L, E] with L = {self.phy2log.shape[0]}")
        if self.log2phy.dim() != 3 or self.log2phy.shape[:2] != self.logcnt.shape:
            raise ValueError(f"log2phy must be [L, E, R] matching logcnt {list(self.logcnt.shape)}")

    @classmethod
    def from_phy2log(
        cls,
        phy2log: torch.Tensor,
        num_experts: int,
        num_workers: int,
        slots_per_worker: int,
        version: int = 0,
    ) -> Placement:
        """Build log2phy and logcnt from phy2log int64 [L, W*S]; every expert needs a slot."""
        _check_layout(num_experts, num_workers, slots_per_worker)
        if phy2log.dtype.is_floating_point or phy2log.dtype == torch.bool:
            raise ValueError(f"phy2log must hold integer expert ids, got {phy2log.dtype}")
        if phy2log.dim() != 2 or phy2log.shape[1] != num_workers * slots_per_worker:
            raise ValueError(
                f"phy2log must be [L, {num_workers * slots_per_worker}], got {list(phy2log.shape)}"
            )
        if phy2log.numel() and (phy2log.min() < 0 or phy2log.max() >= num_experts):
            raise ValueError(f"phy2log entries must be expert ids in [0, {num_experts})")
        num_layers, num_slots = phy2log.shape
        flat = (phy2log.long() + torch.arange(num_layers)[:, None] * num_experts).reshape(-1)
        logcnt = torch.bincount(flat, minlength=num_layers * num_experts).view(num_layers, num_experts)
        if (logcnt < 1).any():
            raise ValueError("every logical expert needs at least one slot in every layer")
        rank = occurrence_rank(flat, num_layers * num_experts).view(num_layers, num_slots)
        log2phy = torch.full((num_layers, num_experts, int(logcnt.max())), -1, dtype=torch.int64)
        slot_idx = torch.arange(num_slots).expand(num_layers, num_slots)
        log2phy[torch.arange(num_layers)[:, None], phy2log.long(), rank] = slot_idx
        return cls(phy2log.long(), log2phy, logcnt, num_workers, slots_per_worker, version)

    @property
    def num_layers(self) -> int:
        return self.phy2log.shape[0]

    @property
    def num_experts(self) -> int:
        return self.logcnt.shape[1]

    @property
    def num_slots(self) -> int:
        return self.num_workers * self.slots_per_worker

    def worker_of_slot(self, slot_idx: int | torch.Tensor) -> int | torch.Tensor:
        """The expert worker (ep_rank among expert workers) that holds a physical slot."""
        return slot_idx // self.slots_per_worker

    def slots_of(self, layer_idx: int, expert_idx: int) -> list[int]:
        """The physical slots holding a logical expert in a layer, ascending."""
        row = self.log2phy[layer_idx, expert_idx]
        return row[row >= 0].tolist()

    def workers_of(self, layer_idx: int, expert_idx: int) -> list[int]:
        """The workers holding a logical expert in a layer (one entry per replica)."""
        return [slot // self.slots_per_worker for slot in self.slots_of(layer_idx, expert_idx)]

    def experts_on_worker(self, layer_idx: int, worker_idx: int) -> list[int]:
        """The logical expert in each of a worker's slots, in slot order (length S)."""
        first = worker_idx * self.slots_per_worker
        return self.phy2log[layer_idx, first : first + self.slots_per_worker].tolist()


def static_placement(num_layers: int, num_experts: int, num_workers: int, slots_per_worker: int) -> Placement:
    """Slot s holds expert s % E in every layer: expert e in slot e, redundant slots round-robin
    from expert 0. Version 0."""
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    _check_layout(num_experts, num_workers, slots_per_worker)
    row = torch.arange(num_workers * slots_per_worker) % num_experts
    return Placement.from_phy2log(
        row.expand(num_layers, -1).clone(), num_experts, num_workers, slots_per_worker
    )


def replicate(load: torch.Tensor, num_slots: int) -> torch.Tensor:
    """Replica counts: start at one each, then give each redundant slot to the expert with the
    highest load per replica. load float [L, E] -> logcnt int64 [L, E], rows summing to num_slots."""
    load = _check_load(load)
    num_layers, num_experts = load.shape
    if num_slots < num_experts:
        raise ValueError(f"num_slots ({num_slots}) must be >= the number of experts ({num_experts})")
    logcnt = torch.ones(num_layers, num_experts, dtype=torch.int64)
    rows = torch.arange(num_layers)
    for _ in range(num_slots - num_experts):
        per_replica = load / logcnt
        hottest = per_replica == per_replica.amax(dim=1, keepdim=True)
        # Ties (idle experts above all) go to the fewest replicas, then the lowest id, so a zero
        # load spreads round-robin like static_placement.
        logcnt[rows, torch.where(hottest, logcnt, num_slots + 1).argmin(dim=1)] += 1
    return logcnt


def pack(
    load: torch.Tensor,
    logcnt: torch.Tensor,
    num_workers: int,
    slots_per_worker: int,
    previous: Placement | None = None,
    tolerance: float = 0.01,
) -> torch.Tensor:
    """Place replicas on workers so that every worker has exactly S slots (a replica weighs
    load / logcnt). Without `previous`: heaviest first, each into the least-loaded worker with a
    free slot. With `previous`: replicas stay on the workers that held them (while the expert
    still has that many replicas) and only the rest are placed that way. Then swap replicas off
    the busiest worker until it is within `tolerance` (relative) of the mean or no swap helps;
    a larger tolerance moves fewer weights. A replica that stays on its worker keeps its slot.
    load float [L, E], logcnt int64 [L, E] -> phy2log int64 [L, W*S]."""
    load = _check_load(load)
    _check_layout(load.shape[1], num_workers, slots_per_worker)
    _check_logcnt(logcnt, load.shape, num_workers * slots_per_worker)
    _check_previous(previous, load.shape)
    _check_fraction("tolerance", tolerance)
    rows = [
        _pack_layer(
            load[layer_idx],
            logcnt[layer_idx].tolist(),
            _previous_rows(previous, layer_idx, num_workers, slots_per_worker),
            slots_per_worker,
            tolerance,
        )
        for layer_idx in range(load.shape[0])
    ]
    return torch.tensor(rows, dtype=torch.int64)


def rebalance(
    load: torch.Tensor,
    num_workers: int,
    slots_per_worker: int,
    previous: Placement | None = None,
    min_gain: float = 0.05,
    tolerance: float = 0.01,
) -> Placement:
    """A new placement for load float [L, E] on W workers of S slots each.

    Per layer: `replicate`, `pack` (sticky to `previous`), and fall back to `static_placement`
    where that has a lighter busiest worker. With `previous` of the same W and S, a layer moves
    only when its busiest worker gets lighter by at least `min_gain` (relative, under this load);
    otherwise the previous row is kept unchanged. Returns `previous` itself when no layer
    changed, else a Placement with version previous.version + 1 (0 without previous)."""
    load = _check_load(load)
    num_layers, num_experts = load.shape
    _check_layout(num_experts, num_workers, slots_per_worker)
    _check_fraction("min_gain", min_gain)
    logcnt = replicate(load, num_workers * slots_per_worker)
    phy2log = pack(load, logcnt, num_workers, slots_per_worker, previous, tolerance)
    static = static_placement(num_layers, num_experts, num_workers, slots_per_worker).phy2log
    phy2log = _lighter_rows(load, static, phy2log, num_workers, min_gain=_NOISE)
    if previous is None:
        return Placement.from_phy2log(phy2log, num_experts, num_workers, slots_per_worker)
    if (previous.num_workers, previous.slots_per_worker) == (num_workers, slots_per_worker):
        phy2log = _lighter_rows(load, phy2log, previous.phy2log, num_workers, max(min_gain, _NOISE))
        if torch.equal(phy2log, previous.phy2log):
            return previous
    version = previous.version + 1
    return Placement.from_phy2log(phy2log, num_experts, num_workers, slots_per_worker, version)


def worker_loads(load: torch.Tensor, placement: Placement) -> torch.Tensor:
    """Tokens per worker, each expert's tokens split evenly over its replicas.
    load float [L, E] -> float64 [L, W]."""
    load = _check_load(load)
    if load.shape != placement.logcnt.shape:
        raise ValueError(f"load shape {list(load.shape)} != placement [L, E] {list(placement.logcnt.shape)}")
    return _worker_loads(load, placement.phy2log, placement.num_workers)


def changed_slots(old: Placement, new: Placement) -> torch.Tensor:
    """Which slots must load new weights going from old to new: bool [L, W*S]."""
    if old.phy2log.shape != new.phy2log.shape:
        raise ValueError(
            f"placements differ in shape: {list(old.phy2log.shape)} vs {list(new.phy2log.shape)}"
        )
    return old.phy2log != new.phy2log


# ---- helpers ---------------------------------------------------------------------------------


def _pack_layer(
    load_row: torch.Tensor,
    cnt_row: list[int],
    held_rows: list[list[int]],
    slots_per_worker: int,
    tolerance: float,
) -> list[int]:
    """One layer of `pack`: load_row float64 [E], cnt_row = logcnt of the layer, held_rows[w] =
    what worker w held before, in slot order (empty without a previous placement) -> phy2log row."""
    weights = (load_row / torch.tensor(cnt_row, dtype=torch.float64)).tolist()
    experts_on, left = _kept_replicas(weights, cnt_row, held_rows)
    loads = [sum(weights[e] for e in experts) for experts in experts_on]
    newcomers = sorted((e for e, n in enumerate(left) for _ in range(n)), key=lambda e: (-weights[e], e))
    for e in newcomers:
        free = [w for w, experts in enumerate(experts_on) if len(experts) < slots_per_worker]
        w = min(free, key=lambda w: (loads[w], w))
        experts_on[w].append(e)
        loads[w] += weights[e]
    assign = _swap_down(torch.tensor(experts_on), torch.tensor(weights, dtype=torch.float64), tolerance)
    return [e for w, row in enumerate(assign.tolist()) for e in _order_slots(row, held_rows[w])]


def _kept_replicas(
    weights: list[float], cnt_row: list[int], held_rows: list[list[int]]
) -> tuple[list[list[int]], list[int]]:
    """Leave each previous replica where it is while its expert still has replicas to give out;
    the lightest workers keep first, so an expert that lost replicas loses them on heavy workers.
    Returns (experts kept per worker, replicas per expert still to place)."""
    left = list(cnt_row)
    experts_on: list[list[int]] = [[] for _ in held_rows]
    held_load = [sum(weights[e] for e in row) for row in held_rows]
    for w in sorted(range(len(held_rows)), key=lambda w: (held_load[w], w)):
        for e in held_rows[w]:
            if left[e] > 0:
                experts_on[w].append(e)
                left[e] -= 1
    return experts_on, left


def _swap_down(assign: torch.Tensor, weights: torch.Tensor, tolerance: float) -> torch.Tensor:
    """Local search: swap a replica on the busiest worker with a lighter one elsewhere while that
    makes the busiest worker lighter (greedy packing can miss, e.g. {3,3,0,2,2,2} on 2 workers),
    until the busiest worker is within `tolerance` (relative) of the mean.
    assign int64 [W, S] expert per slot, weights float64 [E] per replica -> assign int64 [W, S]."""
    assign = assign.clone()
    num_workers, slots_per_worker = assign.shape
    for _ in range(4 * num_workers * slots_per_worker):  # each swap lowers the sorted loads; cap anyway
        item = weights[assign]
        loads = item.sum(dim=1)
        top = int(loads.argmax())
        if loads[top] <= loads.mean() * (1 + tolerance):
            break
        delta = item[top][:, None, None] - item[None]  # [S, W, S]: load moving off the busiest worker
        pair_max = torch.maximum(loads[top] - delta, loads[None, :, None] + delta)
        pair_max[delta <= 0] = torch.inf
        pair_max[:, top, :] = torch.inf
        best = int(pair_max.argmin())
        if not pair_max.view(-1)[best] < loads[top] * (1 - _NOISE):
            break
        i, w, j = (
            best // (num_workers * slots_per_worker),
            best // slots_per_worker % num_workers,
            best % slots_per_worker,
        )
        assign[top, i], assign[w, j] = assign[w, j].clone(), assign[top, i].clone()
    return assign


def _order_slots(experts: list[int], held_row: list[int]) -> list[int]:
    """Slot order on one worker: an expert it keeps stays in its old slot index (no copy at all)."""
    left = Counter(experts)
    row = [-1] * len(experts)
    for i, e in enumerate(held_row):
        if left[e] > 0:
            row[i] = e
            left[e] -= 1
    rest = iter(sorted(left.elements()))
    return [e if e >= 0 else next(rest) for e in row]


def _previous_rows(
    previous: Placement | None, layer_idx: int, num_workers: int, slots_per_worker: int
) -> list[list[int]]:
    """What each of W workers held in `previous`, in slot order, cut to S slots (empty for workers
    it did not have, and for all without it)."""
    num_held = 0 if previous is None else min(num_workers, previous.num_workers)
    held = [previous.experts_on_worker(layer_idx, w)[:slots_per_worker] for w in range(num_held)]
    return held + [[] for _ in range(num_workers - num_held)]


def _worker_loads(load: torch.Tensor, phy2log: torch.Tensor, num_workers: int) -> torch.Tensor:
    """load float64 [L, E], phy2log int64 [L, N] -> tokens per worker float64 [L, W]."""
    logcnt = torch.zeros_like(load).scatter_add_(1, phy2log, torch.ones_like(phy2log, dtype=load.dtype))
    per_slot = torch.gather(load / logcnt.clamp(min=1), 1, phy2log)
    return per_slot.view(phy2log.shape[0], num_workers, -1).sum(dim=2)


def _lighter_rows(
    load: torch.Tensor, candidate: torch.Tensor, current: torch.Tensor, num_workers: int, min_gain: float
) -> torch.Tensor:
    """Per layer, the candidate row where it makes the busiest worker lighter by at least
    `min_gain` (relative), else the current row. load float64 [L, E]; rows phy2log int64 [L, N]."""
    current_max = _worker_loads(load, current, num_workers).amax(dim=1)
    candidate_max = _worker_loads(load, candidate, num_workers).amax(dim=1)
    rel_gain = torch.where(
        current_max > 0, (current_max - candidate_max) / current_max.clamp(min=1e-300), 0.0
    )
    return torch.where((rel_gain >= min_gain)[:, None], candidate, current)


def occurrence_rank(keys: torch.Tensor, num_keys: int) -> torch.Tensor:
    """k for the k-th occurrence (0-based, in index order) of each key: int64 [N] -> int64 [N]."""
    order = torch.argsort(keys, stable=True)
    counts = torch.bincount(keys, minlength=num_keys)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(keys)
    rank[order] = torch.arange(keys.numel(), device=keys.device) - starts[keys[order]]
    return rank


def _check_layout(num_experts: int, num_workers: int, slots_per_worker: int) -> None:
    if num_experts < 1 or num_workers < 1 or slots_per_worker < 1:
        raise ValueError(
            f"need >= 1 expert, worker and slot per worker, got E={num_experts}, W={num_workers}, "
            f"S={slots_per_worker}"
        )
    if num_workers * slots_per_worker < num_experts:
        raise ValueError(
            f"slots_per_worker={slots_per_worker} is too few: {num_workers} workers need at least "
            f"ceil({num_experts} / {num_workers}) = {-(-num_experts // num_workers)} slots each"
        )


def _check_load(load: torch.Tensor) -> torch.Tensor:
    """Validate load [L, E] and return it as float64."""
    if not isinstance(load, torch.Tensor) or load.dim() != 2 or load.shape[0] < 1 or load.shape[1] < 1:
        shape = list(load.shape) if isinstance(load, torch.Tensor) else type(load).__name__
        raise ValueError(f"load must be a tensor [num_layers >= 1, num_experts >= 1], got {shape}")
    if load.dtype == torch.bool or load.is_complex():
        raise ValueError(f"load must be real numbers, got {load.dtype}")
    load = load.detach().to("cpu", torch.float64)
    if not torch.isfinite(load).all() or (load < 0).any():
        raise ValueError("load must be finite and >= 0 (tokens per expert)")
    return load


def _check_logcnt(logcnt: torch.Tensor, shape: torch.Size, num_slots: int) -> None:
    if logcnt.shape != shape or logcnt.dtype.is_floating_point:
        raise ValueError(
            f"logcnt must be integer [L, E] = {list(shape)}, got {logcnt.dtype} {list(logcnt.shape)}"
        )
    if (logcnt < 1).any() or (logcnt.sum(dim=1) != num_slots).any():
        raise ValueError(f"logcnt needs >= 1 replica per expert and {num_slots} replicas per layer")


def _check_previous(previous: Placement | None, shape: torch.Size) -> None:
    if previous is not None and previous.logcnt.shape != shape:
        raise ValueError(
            f"previous placement is for [L, E] = {list(previous.logcnt.shape)}, load is {list(shape)}"
        )


def _check_fraction(name: str, value: float) -> None:
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
