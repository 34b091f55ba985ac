"""A node of a 3-node Ray cluster (on this machine) removed while requests run: the survivors
serve every request to the end with the same tokens; replicas of one expert had been spread over
nodes, so only experts with a single replica needed reloading."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_removing_a_node_with_expert_workers(tiny_maverick):
    run = subprocess.run(
        [sys.executable, "-m", "tests.cluster.node_loss", str(tiny_maverick)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    figures = json.loads(run.stdout.strip().splitlines()[-1])
    assert figures["nodes_used"] >= 2 and figures["lost_expert_workers"] >= 1
    assert figures["tokens_equal"] and figures["num_tokens"] == [12] * 6
    assert figures["faults"]["worker_failures"]["expert"] == figures["lost_expert_workers"]
    assert figures["expert_workers_left"] == 3 - figures["lost_expert_workers"]
    assert figures["same_node_replicas_at_start"] == 0  # replicas spread over the nodes
    assert figures["replicas_of_orphaned_experts"] in ([], [1])  # no replicated expert was lost
