"""Rearranging replicas while serving: same tokens before, during and after; nothing lost."""

from __future__ import annotations

import time

from cluster.config import ClusterConfig
from cluster.engine import ClusterEngine
from engine.core import EngineConfig
from engine.llm_engine import LLMEngine
from engine.request import SamplingParams
from router.rebalancing import RebalanceConfig
from tests.helpers import random_prompts, run_with_late_arrivals

ENGINE = EngineConfig(num_kv_blocks=2048, block_size=4, token_budget=64)
PARAMS = SamplingParams(max_tokens=30, ignore_eos=True)


def test_tokens_identical_across_rearrangements(ray_session, skewed_maverick):
    prompts = random_prompts([37, 5, 21, 60, 12, 30], seed=41)
    late = random_prompts([15, 26], seed=42)
    reference = [
        c.token_ids
        for c in LLMEngine.from_checkpoint(skewed_maverick, ENGINE).generate(prompts + late, PARAMS)
    ]
    # re-plan as often as possible so rearrangements land while requests stream
    policy = RebalanceConfig(window_steps=8, interval_steps=2, report_every=2, min_gain=0.0)
    cluster = ClusterConfig(2, 4, redundant_slots_per_worker=2, rebalance=policy)
    with ClusterEngine(skewed_maverick, cluster, ENGINE) as engine:
        versions_seen = []

        def on_step(e: ClusterEngine) -> None:
            versions_seen.append(e.placement.version)
            # wait for a plan in flight and its staging (an event, not the machine's pace), so
            # the switches land at the same steps however busy the machine is
            e.rebalancer.wait()

        got = run_with_late_arrivals(engine, prompts, late, PARAMS, arrival_steps=(6, 11), on_step=on_step)
        metrics = engine.rebalancer.metrics()
        expert_versions = {s["placement_version"] for s in engine.stats()["experts"]}
        # idle now: the engine's gauges catch up with the service's figures for its last step
        service = {k: v for k, v in metrics.items() if k != "stage_seconds"}
        deadline = time.monotonic() + 60
        while engine.metrics()["balancing"] != service and time.monotonic() < deadline:
            time.sleep(0.05)
        assert engine.metrics()["balancing"] == service
    assert got == reference  # nothing lost, nothing repeated, same tokens
    # a plan every 2 steps; each switch lands 2 steps after its report (plan, then stage)
    assert metrics["rearrangements"] >= 2 and len(set(versions_seen)) >= 3
    switches = [i for i in range(1, len(versions_seen)) if versions_seen[i] != versions_seen[i - 1]]
    assert switches[0] < 8  # while the first requests were still decoding
    assert expert_versions == {engine.placement.version}
    assert max(max(row) for row in metrics["replicas_per_expert"]) > 1  # hot experts were replicated
