"""Engine gauges rendered at /metrics from the replicas' snapshots."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from serving.metrics import ServingMetrics

SNAPSHOT = {
    "replica": "r1", "alive": True, "num_running": 1, "num_waiting": 0, "kv_blocks_used": 2,
    "kv_blocks_total": 8, "num_preemptions": 0, "expert_worker_tokens": [],
}  # fmt: skip


def samples(snapshots: list[dict]) -> dict[tuple, float]:
    text = ServingMetrics("m").render(snapshots).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_layer_threads_per_rank_and_size_of_step():
    """auto's choices: rank 0 chose one thread for steps of up to 2 tokens and two for 5-8; rank 1
    has not measured anything yet; a replica from before the gauge sends no such key."""
    snap = {**SNAPSHOT, "layer_threads": {0: {2: 1, 8: 2}, 1: {}}}
    old = {**SNAPSHOT, "replica": "r0"}
    found = {k: v for k, v in samples([snap, old]).items() if k[0] == "llama4_ep_layer_threads"}
    labels = {"model_name": "m", "replica": "r1", "dp_rank": "0"}
    assert found == {
        ("llama4_ep_layer_threads", tuple(sorted({**labels, "step_tokens": "2"}.items()))): 1.0,
        ("llama4_ep_layer_threads", tuple(sorted({**labels, "step_tokens": "8"}.items()))): 2.0,
    }
