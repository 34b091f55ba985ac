"""The Grafana dashboard and the PodMonitor under k8s/monitoring/ name series that exist."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml
from prometheus_client.parser import text_string_to_metric_families

from serving.metrics import ServingMetrics

MONITORING = Path(__file__).resolve().parents[2] / "k8s" / "monitoring"
SNAPSHOT = {
    "replica": "r1", "alive": True, "num_running": 1, "num_waiting": 0, "kv_blocks_used": 2,
    "kv_blocks_total": 8, "num_preemptions": 0, "expert_worker_tokens": [3, 4],
    "balancing": {"balancedness": 0.9, "balancedness_per_layer": [0.9], "imbalance": 0.1,
                  "placement_version": 0, "replicas_per_expert": [[1]], "rearrangements": 0,
                  "rearrangement_seconds": []},
}  # fmt: skip


def exposed_series() -> set[str]:
    metrics = ServingMetrics("m")
    timer = metrics.request("completions")
    timer.admitted(3)
    timer.tokens([1])
    timer.tokens([2])
    timer.engine_finished("length", 2)
    timer.finish(200)
    text = metrics.render([SNAPSHOT]).decode()
    return {s.name for family in text_string_to_metric_families(text) for s in family.samples}


def test_every_dashboard_query_names_an_exposed_series():
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    names = {n for e in exprs for n in re.findall(r"llama4_ep_[a-z0-9_]+", e)}
    assert len(names) >= 12
    assert names <= exposed_series(), names - exposed_series()


def test_podmonitor_scrapes_the_ports_the_manifests_open():
    monitor = yaml.safe_load((MONITORING / "podmonitor.yaml").read_text())
    assert monitor["kind"] == "PodMonitor"
    ports = {e["port"] for e in monitor["spec"]["podMetricsEndpoints"]}
    manifest = (MONITORING.parent / "cpu-demo.yaml").read_text()
    for port in ports:
        assert f"name: {port}\n" in manifest
