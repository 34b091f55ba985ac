"""Node-aware placement: replicas of one expert on different Ray nodes where possible (pure).

With redundant slots, a hot expert has several replicas; if they all sit on one node, losing
that node loses the expert. `spread_over_nodes` swaps replicas between workers of different
nodes until no expert has two replicas on one node, or no swap can fix what is left. A swap
exchanges a conflicting replica with one of another expert of about the same load per replica,
so the workers' loads change little, and never creates a new conflict.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch

from router.placement import Placement


def same_node_replicas(placement: Placement, node_of_worker: Sequence[Hashable]) -> int:
    """Replicas beyond the first of an expert on one node, summed over experts, nodes and layers."""
    _check_nodes(placement, node_of_worker)
    extra = 0
    for m in range(placement.num_layers):
        rows = [placement.experts_on_worker(m, w) for w in range(placement.num_workers)]
        extra += sum(count - 1 for count in _per_node(rows, node_of_worker).values() if count > 1)
    return extra


def spread_over_nodes(
    placement: Placement, node_of_worker: Sequence[Hashable], load: torch.Tensor | None = None
) -> Placement:
    """The same replicas per expert (same logcnt and version), moved so replicas of one expert
    share a node only where it cannot be helped. node_of_worker[w]: any hashable id of worker w's
    node. load float [L, E] (None: all alike) weighs which swap keeps the balance best."""
    _check_nodes(placement, node_of_worker)
    if len(set(node_of_worker)) < 2:
        return placement
    weights = torch.ones(placement.logcnt.shape, dtype=torch.float64) if load is None else load.double()
    per_replica = (weights / placement.logcnt).tolist()
    rows_out = []
    for m in range(placement.num_layers):
        rows = [placement.experts_on_worker(m, w) for w in range(placement.num_workers)]
        _spread_layer(rows, list(node_of_worker), per_replica[m])
        rows_out.append([x for row in rows for x in row])
    phy2log = torch.tensor(rows_out, dtype=torch.int64)
    if torch.equal(phy2log, placement.phy2log):
        return placement
    return Placement.from_phy2log(
        phy2log, placement.num_experts, placement.num_workers, placement.slots_per_worker, placement.version
    )


def _per_node(rows: list[list[int]], node: Sequence[Hashable]) -> dict[tuple[Hashable, int], int]:
    counts: dict[tuple[Hashable, int], int] = {}
    for w, row in enumerate(rows):
        for x in row:
            counts[node[w], x] = counts.get((node[w], x), 0) + 1
    return counts


def _spread_layer(rows: list[list[int]], node: list[Hashable], weight: list[float]) -> None:
    """In place: rows[w] lists worker w's experts in slot order."""
    stuck: set[tuple[int, int]] = set()  # (worker, expert) conflicts no swap can fix
    for _ in range(sum(len(row) for row in rows)):  # each swap removes a conflict; cap anyway
        counts = _per_node(rows, node)
        conflict = next(
            ((w, x) for w in reversed(range(len(rows))) for x in rows[w]
             if counts[node[w], x] > 1 and (w, x) not in stuck),
            None,
        )  # fmt: skip
        if conflict is None:
            return
        w, x = conflict
        swap = _best_swap(rows, node, weight, counts, w, x)
        if swap is None:
            stuck.add(conflict)
            continue
        c, y = swap
        rows[w][rows[w].index(x)] = y
        rows[c][rows[c].index(y)] = x


def _best_swap(
    rows: list[list[int]], node: list[Hashable], weight: list[float], counts: dict, w: int, x: int
) -> tuple[int, int] | None:
    """Worker c on another node and its expert y to trade for x on w: x is not on c's node, y is
    not on w's node, and y's load per replica is the closest to x's."""
    best, best_cost = None, float("inf")
    for c, row in enumerate(rows):
        if node[c] == node[w] or counts.get((node[c], x), 0) > 0:
            continue
        for y in row:
            if counts.get((node[w], y), 0) > 0:
                continue
            cost = abs(weight[x] - weight[y])
            if cost < best_cost:
                best, best_cost = (c, y), cost
    return best


def _check_nodes(placement: Placement, node_of_worker: Sequence[Hashable]) -> None:
    if len(node_of_worker) != placement.num_workers:
        raise ValueError(
            f"node_of_worker names {len(node_of_worker)} workers; the map has {placement.num_workers}"
        )
