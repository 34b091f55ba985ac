"""A node lost from a 3-node Ray cluster on this machine (`ray.cluster_utils.Cluster`), run as its
own process (it needs its own Ray cluster): `python -m tests.cluster.node_loss <checkpoint>`.
Prints one JSON line for tests/cluster/test_node_loss.py."""

from __future__ import annotations

import json
import os
import sys

import ray
from ray.cluster_utils import Cluster

from cluster.config import ClusterConfig
from cluster.engine import ClusterEngine
from engine.core import EngineConfig
from engine.llm_engine import LLMEngine
from engine.request import SamplingParams
from router.nodes import same_node_replicas
from tests.helpers import random_prompts

ENGINE = EngineConfig(num_kv_blocks=1024, block_size=4, token_budget=64)
PARAMS = SamplingParams(max_tokens=12, ignore_eos=True)


def main(model: str) -> dict:
    prompts = random_prompts([12, 30, 7, 21, 16, 9], seed=71)
    expected = [c.token_ids for c in LLMEngine.from_checkpoint(model, ENGINE).generate(prompts, PARAMS)]
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        config = ClusterConfig(1, 3, 1, placement_strategy="SPREAD", cpus_per_worker=0.5)
        engine = ClusterEngine(model, config, ENGINE)
        by_id = {n.node_id: n for n in workers}
        nodes = list(engine.expert_nodes)
        placement = engine.placement
        victim = next(n for n in nodes if n in by_id)  # a non-head node holding an expert worker
        lost = {w for w, n in enumerate(nodes) if n == victim}
        # experts whose every replica was on the victim node: those had to be reloaded
        orphaned = [
            int(placement.logcnt[m, x])
            for m in range(placement.num_layers)
            for x in range(placement.num_experts)
            if set(placement.workers_of(m, x)) <= lost
        ]
        ids = [engine.add(p, PARAMS) for p in prompts]
        tokens = {i: [] for i in ids}
        step = 0
        while engine.has_unfinished:
            if step == 3:
                cluster.remove_node(by_id[victim])
            for out in engine.step():
                tokens[out.request_id] += out.new_token_ids
            step += 1
        figures = {
            "tokens_equal": [tokens[i] for i in ids] == expected,
            "num_tokens": [len(tokens[i]) for i in ids],
            "nodes_used": len(set(nodes)),
            "lost_expert_workers": len(lost),
            "same_node_replicas_at_start": same_node_replicas(placement, nodes),
            "replicas_of_orphaned_experts": sorted(set(orphaned)),
            "faults": engine.metrics()["faults"],
            "expert_workers_left": len(engine.experts),
        }
        engine.close()
        return figures
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    print(json.dumps(main(sys.argv[1])), flush=True)
