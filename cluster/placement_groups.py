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


def attention_threads(cluster: ClusterConfig, num_attention: int, node_cpus: float) -> int:
    """Intra-op threads of an attention worker on CPUs.

    A step runs in turns: the expert workers compute while the attention ranks wait for their rows,
    and wait while the attention ranks run the rest of the layers and the lm_head. So an attention
    worker may use its node's cores, shared with the other attention ranks of the layout (all
    assumed on one node, as PACK puts them); the layer stack still measures whether a second thread
    pays (`attention.threads`). A fixed `cpus_per_worker` is its size. Expert workers keep one
    thread (`LLAMA4_EP_WORKER_THREADS`): several of them compute at once."""
    if cluster.cpus_per_worker is not None:
        return max(1, math.floor(cluster.cpus_per_worker))
    return max(1, math.floor(node_cpus / num_attention))


def node_cpus(node_id: str) -> float:
    """The CPUs a Ray node has (0 for one Ray does not list alive)."""
    for node in ray.nodes():
        if node["NodeID"] == node_id and node.get("Alive", True):
            return float(node["Resources"].get("CPU", 0.0))
    return 0.0


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
