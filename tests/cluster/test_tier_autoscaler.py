"""The tier autoscaler on a live cluster engine: measured load in, a resize out, tokens unchanged."""

from __future__ import annotations

import pytest

from cluster.config import ClusterConfig
from cluster.engine import ClusterEngine
from engine.autoscale import AutoscalerConfig, TierAutoscaler, TierBounds
from engine.core import EngineConfig
from engine.llm_engine import LLMEngine
from engine.request import SamplingParams
from tests.helpers import random_prompts

ENGINE = EngineConfig(num_kv_blocks=1024, block_size=4, token_budget=64)
PARAMS = SamplingParams(max_tokens=16, ignore_eos=True)
PROMPTS = random_prompts([12, 30, 7, 21, 16, 9, 25, 14], seed=95)


def test_routed_load_above_the_target_adds_an_expert_worker(ray_session, tiny_maverick):
    """8 decoding requests route 8 tokens per step per MoE layer; a target of 2 per expert worker
    asks for more workers. The clock is the test's: one measurement every 'second' of 2 steps."""
    expected = [
        c.token_ids for c in LLMEngine.from_checkpoint(tiny_maverick, ENGINE).generate(PROMPTS, PARAMS)
    ]
    cfg = AutoscalerConfig(
        enabled=True,
        expert=TierBounds(1, 2),
        attention=TierBounds(1, 1),
        target_tokens_per_expert_worker=2.0,
        upscale_delay_s=1.0,
        cooldown_s=0.0,
    )
    with ClusterEngine(tiny_maverick, ClusterConfig(1, 1, cpus_per_worker=0.2), ENGINE) as engine:
        with pytest.raises(ValueError, match="exceeds the 128 experts"):
            engine.configure(autoscaler=AutoscalerConfig(enabled=True, expert=TierBounds(1, 200)))
        engine.configure(autoscaler=cfg)
        ids = [engine.add(p, PARAMS) for p in PROMPTS]
        tokens = {i: [] for i in ids}
        clock, decisions = 0.0, []
        while engine.has_unfinished:
            for _ in range(2):
                for out in engine.step():
                    tokens[out.request_id] += out.new_token_ids
            clock += 1.0
            d = engine.autoscale(clock)
            if d is not None:  # None: a resize in flight
                decisions.append((d.num_attention, d.num_expert))
            if engine.resizer.busy:
                engine.resizer.wait()  # the new worker loads; the switch lands at the next step
        assert [tokens[i] for i in ids] == expected
        assert decisions[0] == (1, 1) and (1, 2) in decisions  # held the delay, then one more
        assert len(engine.experts) == 2 and "expert workers 1 -> 2" in engine.last_decision
        assert engine.autoscale(clock + 1) is not None  # idle: reads as zero load, within bounds
        # the same controller fed the live engine's measurements takes the same decisions (what
        # the simulator runs, `sim.tiers`)
        replay = TierAutoscaler(cfg)
        for tick in engine.autoscaler.history:
            replay.window = _Fixed(tick.measurements)
            replay.tick(tick.measurements.time_s, 0, 0, resizing=tick.decision is None)
        assert [t.decision for t in replay.history] == [t.decision for t in engine.autoscaler.history]


class _Fixed:
    """A window that reads back recorded measurements."""

    def __init__(self, m):
        self.m = m

    def take(self, *_):
        return self.m
