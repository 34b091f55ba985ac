"""The disaggregated engine on a real local Ray instance: socket meshes, and gloo groups once."""

from __future__ import annotations

import os
import pickle
import time

import pytest
import torch

from cluster.attention_worker import StepResult
from cluster.config import ClusterConfig
from cluster.engine import ClusterEngine
from cluster.placement_groups import attention_threads
from engine.core import EngineConfig
from engine.llm_engine import LLMEngine
from engine.protocol import Engine
from engine.request import SamplingParams
from model.config import ModelConfig
from tests.helpers import random_prompts, run_with_late_arrivals

ENGINE = EngineConfig(num_kv_blocks=1024, block_size=4, token_budget=40)
PARAMS = SamplingParams(max_tokens=12, ignore_eos=True)
# lengths cross the 16-token attention chunks; the budget of 40 splits the long ones
PROMPTS = random_prompts([37, 5, 21, 50, 12], seed=21)
LATE = random_prompts([18, 9], seed=22)


@pytest.fixture(scope="module")
def references(tiny_maverick, tiny_scout):
    out = {}
    for ckpt in (tiny_maverick, tiny_scout):
        engine = LLMEngine.from_checkpoint(ckpt, ENGINE)
        out[ckpt] = [c.token_ids for c in engine.generate(PROMPTS + LATE, PARAMS)]
    return out


# Each layout once, on the preset where it has most to show: one worker, an even split of
# maverick's 128 experts, an uneven split under both presets, and scout's 16
# experts over 8 workers, where every layer is MoE. Each case starts m + n actors: ~3-5 s each here.
# The default transport on CPUs is sockets; one case goes through gloo collectives instead.
LAYOUTS = [
    ("tiny-maverick", 1, 1, "auto"),
    ("tiny-maverick", 1, 4, "auto"),
    ("tiny-maverick", 2, 3, "auto"),
    ("tiny-scout", 2, 3, "auto"),
    ("tiny-scout", 2, 3, "collective"),
    ("tiny-scout", 2, 8, "auto"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("preset", "m", "n", "transport"), LAYOUTS)
def test_greedy_tokens_equal_single_process(ray_session, references, preset, m, n, transport, request):
    ckpt = request.getfixturevalue(preset.replace("-", "_"))
    with ClusterEngine(ckpt, ClusterConfig(m, n, transport=transport), ENGINE) as engine:
        got = run_with_late_arrivals(engine, PROMPTS, LATE, PARAMS, arrival_steps=(4, 7))
        stats = engine.stats()
    assert got == references[ckpt]
    assert_rows_exactly_once(stats, m)
    used = {w["transport"] for w in stats["attention"] + stats["experts"]}
    assert used == {"sockets (unix)" if transport == "auto" else "collective (gloo)"}
    # the test's Ray instance has 2 CPUs: one attention rank takes both, two take one each
    assert [a["threads"] for a in stats["attention"]] == [2 // m] * m


def assert_rows_exactly_once(stats: dict, num_attention: int) -> None:
    """Every routed row is computed once and comes back to the rank that sent it."""
    sent, computed = {}, {}
    for a in stats["attention"]:
        assert a["rows_sent_per_layer"] == a["rows_returned_per_layer"]
        for layer, n in a["rows_sent_per_layer"].items():
            sent[layer] = sent.get(layer, 0) + n
    for e in stats["experts"]:
        for layer, n in e["rows_computed_per_layer"].items():
            computed[layer] = computed.get(layer, 0) + n
        assert all(n == 0 for rank, n in e["rows_per_source_rank"].items() if rank >= num_attention)
    assert sent == computed and all(n > 0 for n in sent.values())
    per_source = {}
    for e in stats["experts"]:
        for rank, n in e["rows_per_source_rank"].items():
            per_source[rank] = per_source.get(rank, 0) + n
    for a in stats["attention"]:
        assert per_source[a["dp_rank"]] == sum(a["rows_sent_per_layer"].values())


def test_close_leaves_no_processes(ray_session, tiny_maverick):
    engine = ClusterEngine(tiny_maverick, ClusterConfig(1, 2), ENGINE)
    assert isinstance(engine, Engine)
    assert engine.generate(PROMPTS[:1], PARAMS)[0].token_ids
    (last,) = engine.last_results  # the last step's, from the one attention rank
    assert last.seconds > 0  # its own step, which bench overhead sets against the call's
    assert engine.metrics()["layer_threads"] == {0: last.layer_threads}
    pids = ray_session.get([w.pid.remote() for w in engine.attention + engine.experts])
    pg_id = engine._pg.id.hex()
    engine.close()
    deadline = time.monotonic() + 30
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(p) for p in pids)
    assert ray_session.util.placement_group_table()[pg_id]["state"] == "REMOVED"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_attention_workers": 0}, "attention workers must be >= 1"),
        ({"num_expert_workers": 0}, "expert workers must be >= 1"),
        ({"device": "tpu"}, "unknown device 'tpu'"),
        ({"placement_strategy": "RANDOM"}, "unknown placement strategy"),
        ({"transport": "mpi"}, "unknown transport 'mpi'"),
        ({"transport": "sockets", "device": "cuda"}, "sockets transport carries CPU tensors only"),
    ],
)
def test_bad_cluster_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ClusterConfig(**kwargs)


def test_a_step_result_carries_its_loads_as_numpy_and_gets_tensors_back():
    load = torch.arange(6).view(2, 3)
    result = StepResult(0, (), expert_load=load, slot_load=load * 2, seconds=0.5)
    data = pickle.dumps(result, protocol=5)
    assert b"_rebuild_tensor" not in data  # not torch.save's path
    back = pickle.loads(data)
    assert torch.equal(back.expert_load, load) and torch.equal(back.slot_load, load * 2)
    assert back.seconds == 0.5 and pickle.loads(pickle.dumps(StepResult(1, ()))).slot_load is None


def test_attention_threads_share_the_node_or_take_the_fixed_size():
    assert attention_threads(ClusterConfig(1, 2), 1, node_cpus=2.0) == 2
    assert attention_threads(ClusterConfig(2, 2), 2, node_cpus=2.0) == 1
    assert attention_threads(ClusterConfig(3, 2), 3, node_cpus=2.0) == 1  # never 0
    assert attention_threads(ClusterConfig(1, 2), 1, node_cpus=0.0) == 1  # a node Ray no longer lists
    assert attention_threads(ClusterConfig(1, 2, cpus_per_worker=0.25), 1, node_cpus=16.0) == 1
    assert attention_threads(ClusterConfig(1, 2, cpus_per_worker=4.0), 1, node_cpus=16.0) == 4


def test_more_expert_workers_than_experts(tiny_scout):
    with pytest.raises(ValueError, match="17 expert workers for 16 experts"):
        ClusterConfig(1, 17).plan(ModelConfig.from_file(tiny_scout))
