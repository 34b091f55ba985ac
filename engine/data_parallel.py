"""Which data-parallel (attention) rank takes a new request: the one policy the cluster engine
and the simulator share."""

from __future__ import annotations

from collections.abc import Sequence


def least_loaded_rank(unfinished_per_rank: Sequence[int]) -> int:
    """The rank with the fewest unfinished requests; ties go to the lowest rank."""
    if not unfinished_per_rank:
        raise ValueError("there is no data-parallel rank to choose from")
    return min(range(len(unfinished_per_rank)), key=lambda rank: (unfinished_per_rank[rank], rank))
