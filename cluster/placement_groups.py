"""Ray placement groups for a cluster engine's workers: bundle sizes (pure) and reserving them."""

from __future__ import annotations

import math

import ray
from ray.util.placement_group import PlacementGroup, placement_group

from cluster.config import ClusterConfig

PLACEMENT_TIMEOUT_S = 300  # an autoscaling cluster may need minutes to add nodes


def bundles(cluster: ClusterConfig, cpus_available: float, gpus_available: float) -> list[dict[str, float]]:
    """One placement-group bundle per worker: a GPU each on GPUs, else a share of the CPUs.

    Fixed sizes (GPUs, or `cpus_per_worker` given) do not depend on what the cluster holds right
    now: on an autoscaling cluster the placement group waits while nodes are added. Only the
    CPU share of a fixed-size cluster is derived from (and checked against) what is there."""
    n = cluster.num_workers
    if cluster.device == "cuda":
        return [{"GPU": 1.0, "CPU": 1.0} for _ in range(n)]
    if cluster.cpus_per_worker is not None:
        return [{"CPU": cluster.cpus_per_worker} for _ in range(n)]
    share = max(0.01, min(1.0, math.floor(cpus_available / n * 100) / 100))
    if share * n > cpus_available + 1e-9:
        raise ValueError(f"{n} workers x {share:g} CPUs exceed the cluster's {cpus_available:g} CPUs")
    return [{"CPU": share} for _ in range(n)]


def bundles_in(group: PlacementGroup, offset: int, num_workers: int) -> list[dict[str, float]]:
    """The workers' bundles in an existing group, from index `offset` (e.g. a Serve replica's
    group, whose bundle 0 holds the replica)."""
    specs = group.bundle_specs[offset:]
    if offset < 0 or len(specs) < num_workers:
        raise ValueError(
            f"{num_workers} workers need {num_workers} bundles from index {offset}; "
            f"the placement group has {len(group.bundle_specs)}"
        )
    return specs[:num_workers]


def reserve(cluster: ClusterConfig) -> tuple[PlacementGroup, list[dict[str, float]]]:
    """A new group with one bundle per worker, ready (or a clear error after the timeout)."""
    resources = ray.cluster_resources()
    specs = bundles(cluster, resources.get("CPU", 0.0), resources.get("GPU", 0.0))
    group = placement_group(specs, strategy=cluster.placement_strategy)
    try:
        ray.get(group.ready(), timeout=PLACEMENT_TIMEOUT_S)
    except ray.exceptions.GetTimeoutError:
        ray.util.remove_placement_group(group)
        need = {k: sum(b.get(k, 0) for b in specs) for k in ("CPU", "GPU")}
        raise RuntimeError(
            f"{cluster.num_workers} workers need {need} in {cluster.placement_strategy} bundles; the Ray "
            f"cluster has {ray.cluster_resources()} and none were added within {PLACEMENT_TIMEOUT_S} s"
        ) from None
    return group, specs
