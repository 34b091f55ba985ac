"""Maps for a changed expert tier (pure, tensors in and out): `shrink` for the workers that
survive a failure or stay after a removal, `grow` for workers added.

Survivors keep what they hold where they hold it: a replica that survives costs nothing. Every
logical expert must keep at least one replica, so the experts whose only replicas were on lost
workers go to free slots; a survivor grows its slots when the ones left cannot hold every expert
(S' = max(S, ceil(E / W'))). Where free slots run short, slots holding a second replica of the
least loaded experts are reclaimed. Free slots left over take extra replicas of the hottest
experts, on nodes that do not hold the expert yet where possible. Survivors are renumbered in
order: worker j of the new map is `survivors[j]` of the old.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Hashable, Sequence

import torch

from router.placement import Placement

EMPTY = -1


def shrink(
    placement: Placement,
    lost: Collection[int],
    load: torch.Tensor | None = None,
    max_slots_per_worker: int | None = None,
    node_of_worker: Sequence[Hashable] | None = None,
) -> tuple[Placement, list[int]]:
    """The map over the survivors (version + 1) and `survivors`, the old index of each new worker.

    load float [L, E] tokens per logical expert (None: all alike); node_of_worker[w] the node of
    old worker w (None: all on one). Raises ValueError when no expert worker survives or the
    survivors would need more than `max_slots_per_worker` slots."""
    w, s, e = placement.num_workers, placement.slots_per_worker, placement.num_experts
    bad = sorted(x for x in lost if not 0 <= x < w)
    if bad:
        raise ValueError(f"lost expert workers {bad} are not in [0, {w})")
    survivors = [x for x in range(w) if x not in set(lost)]
    if not survivors:
        raise ValueError(f"all {w} expert workers are lost; no expert can be served")
    new_s = max(s, math.ceil(e / len(survivors)))
    if max_slots_per_worker is not None and new_s > max_slots_per_worker:
        raise ValueError(
            f"{len(survivors)} surviving expert workers need {new_s} slots each for {e} experts; "
            f"at most {max_slots_per_worker} fit"
        )
    weights = torch.ones(placement.num_layers, e, dtype=torch.float64) if load is None else load.double()
    if weights.shape != (placement.num_layers, e):
        raise ValueError(f"load must be [L, E] = {[placement.num_layers, e]}, got {list(weights.shape)}")
    nodes = [node_of_worker[x] if node_of_worker is not None else 0 for x in survivors]
    rows = [
        _shrink_layer(
            [placement.experts_on_worker(m, x) + [EMPTY] * (new_s - s) for x in survivors],
            weights[m].tolist(),
            nodes,
        )
        for m in range(placement.num_layers)
    ]
    phy2log = torch.tensor(rows, dtype=torch.int64)
    new = Placement.from_phy2log(phy2log, e, len(survivors), new_s, placement.version + 1)
    return new, survivors


def grow(
    placement: Placement,
    num_new: int,
    load: torch.Tensor | None = None,
    node_of_worker: Sequence[Hashable] | None = None,
) -> Placement:
    """The map with `num_new` more workers of S slots (version + 1). The workers there keep every
    slot as it is (nothing of theirs reloads); the new ones take, slot by slot in turn, a replica
    of the expert with the most load per replica that they do not hold yet (ties: one not on
    their node yet). node_of_worker covers the old and the new workers."""
    if num_new < 1:
        raise ValueError(f"num_new must be >= 1, got {num_new}")
    w, s, e = placement.num_workers, placement.slots_per_worker, placement.num_experts
    if node_of_worker is not None and len(node_of_worker) != w + num_new:
        raise ValueError(
            f"node_of_worker names {len(node_of_worker)} workers; the grown map has {w + num_new}"
        )
    weights = torch.ones(placement.num_layers, e, dtype=torch.float64) if load is None else load.double()
    nodes = list(node_of_worker) if node_of_worker is not None else [0] * (w + num_new)
    rows = []
    for m in range(placement.num_layers):
        slots = [placement.experts_on_worker(m, x) for x in range(w)] + [[] for _ in range(num_new)]
        count = placement.logcnt[m].tolist()
        weight = weights[m].tolist()
        for _ in range(s):
            for j in range(w, w + num_new):
                on_node = {x for k, row in enumerate(slots) if nodes[k] == nodes[j] for x in row}
                fresh = [x for x in range(e) if x not in slots[j]] or list(range(e))
                x = max(fresh, key=lambda x: (weight[x] / (count[x] + 1), x not in on_node, -x))
                slots[j].append(x)
                count[x] += 1
        rows.append([x for row in slots for x in row])
    phy2log = torch.tensor(rows, dtype=torch.int64)
    return Placement.from_phy2log(phy2log, e, w + num_new, s, placement.version + 1)


def survivor_changes(
    old: Placement, new: Placement, survivors: Sequence[int]
) -> list[dict[int, dict[int, int]]]:
    """Per new worker j: moe layer -> {local slot: logical expert} for the slots whose content
    differs from what old worker survivors[j] held there (slots past the old S always do)."""
    changes: list[dict[int, dict[int, int]]] = [{} for _ in survivors]
    for m in range(new.num_layers):
        for j, x in enumerate(survivors):
            held = old.experts_on_worker(m, x)
            for slot, expert in enumerate(new.experts_on_worker(m, j)):
                if slot >= len(held) or held[slot] != expert:
                    changes[j].setdefault(m, {})[slot] = expert
    return changes


def _shrink_layer(slots: list[list[int]], weights: list[float], nodes: list[Hashable]) -> list[int]:
    """One layer: slots[j] is survivor j's row (EMPTY where free) -> the filled phy2log row."""
    num_experts = len(weights)
    count = [0] * num_experts
    for row in slots:
        for x in row:
            if x != EMPTY:
                count[x] += 1
    missing = sorted((x for x in range(num_experts) if count[x] == 0), key=lambda x: (-weights[x], x))
    free = sum(row.count(EMPTY) for row in slots)
    for _ in range(max(0, len(missing) - free)):
        _reclaim(slots, count, weights)
    for x in missing:
        _put(slots, count, weights, nodes, x)
    while any(EMPTY in row for row in slots):
        hottest = max(range(num_experts), key=lambda x: (weights[x] / (count[x] + 1), -x))
        _put(slots, count, weights, nodes, hottest)
    return [x for row in slots for x in row]


def _worker_load(row: list[int], count: list[int], weights: list[float]) -> float:
    return sum(weights[x] / count[x] for x in row if x != EMPTY)


def _reclaim(slots: list[list[int]], count: list[int], weights: list[float]) -> None:
    """Free the slot of one second-or-later replica: of the expert with the least load per
    replica, on the busiest worker holding it."""
    spare = [x for x in range(len(count)) if count[x] >= 2]
    x = min(spare, key=lambda x: (weights[x] / count[x], x))
    holders = [j for j, row in enumerate(slots) if x in row]
    j = max(holders, key=lambda j: (_worker_load(slots[j], count, weights), -j))
    slots[j][slots[j].index(x)] = EMPTY
    count[x] -= 1


def _put(
    slots: list[list[int]], count: list[int], weights: list[float], nodes: list[Hashable], x: int
) -> None:
    """A replica of expert x into a free slot of the least loaded worker that has one, on a node
    that does not hold x yet if there is such a worker with room."""
    room = [j for j, row in enumerate(slots) if EMPTY in row]
    held = {nodes[j] for j, row in enumerate(slots) if x in row}
    j = min(room, key=lambda j: (nodes[j] in held, _worker_load(slots[j], count, weights), j))
    slots[j][slots[j].index(EMPTY)] = x
    count[x] += 1
