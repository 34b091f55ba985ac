"""Growing and shrinking both tiers while requests stream: no request fails, tokens equal the
single-process engine, every expert stays served, the row-count invariant holds in the new epoch."""

from __future__ import annotations

import pytest

from cluster.config import ClusterConfig
from cluster.engine import ClusterEngine
from engine.core import EngineConfig
from engine.llm_engine import LLMEngine
from engine.request import SamplingParams
from tests.cluster.test_faults import check_rows
from tests.helpers import random_prompts

ENGINE = EngineConfig(num_kv_blocks=1024, block_size=4, token_budget=64)
PARAMS = SamplingParams(max_tokens=10, ignore_eos=True)
FIRST = random_prompts([12, 30, 7, 21, 16, 9, 25, 14], seed=81)
LATE = random_prompts([11, 6, 19, 8], seed=82)  # added after the resize is asked, longer lived
LATE_PARAMS = SamplingParams(max_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module")
def reference(tiny_maverick) -> list[list[int]]:
    params = [PARAMS] * len(FIRST) + [LATE_PARAMS] * len(LATE)
    done = LLMEngine.from_checkpoint(tiny_maverick, ENGINE).generate(FIRST + LATE, params)
    return [c.token_ids for c in done]


def stream_through(engine: ClusterEngine, resize: tuple[int, int, bool]) -> tuple[list[list[int]], int]:
    """FIRST streams; the resize is asked; LATE joins; two steps later the test waits for the
    resize to be ready (an event, not the machine's pace), so the switch lands at a known point
    while requests stream. Returns every request's tokens and how many were unfinished at the
    switch."""
    ids = [engine.add(p, PARAMS) for p in FIRST]
    tokens: dict[str, list[int]] = {i: [] for i in ids}

    def step() -> None:
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids

    step()
    engine.resize(*resize)
    for p in LATE:
        ids.append(engine.add(p, LATE_PARAMS))
        tokens[ids[-1]] = []
    step()
    step()
    engine.resizer.wait()
    while engine.resizer.busy:  # a draining rank finishes its requests first
        step()
    streaming = sum(not finished for finished in engine_unfinished(engine, ids))
    while engine.has_unfinished:
        step()
    return [tokens[i] for i in ids], streaming


def engine_unfinished(engine: ClusterEngine, ids: list[str]) -> list[bool]:
    """Per request: False while the engine still serves it."""
    return [i not in engine.book for i in ids]


def check(engine: ClusterEngine, tokens: list, reference: list, size: tuple[int, int]) -> None:
    assert tokens == reference  # every request, no token lost or repeated
    assert (len(engine.attention), len(engine.experts)) == size
    p = engine.placement
    assert p.num_workers == size[1] and bool((p.logcnt >= 1).all())
    assert engine.metrics()["workers"] == {"attention": size[0], "expert": size[1]}
    check_rows(engine)


def test_grow_both_tiers_while_streaming(ray_session, tiny_maverick, reference):
    with ClusterEngine(tiny_maverick, ClusterConfig(1, 2, cpus_per_worker=0.2), ENGINE) as engine:
        tokens, streaming = stream_through(engine, (2, 3, True))
        assert streaming >= 8  # the switch landed mid-stream
        check(engine, tokens, reference, (2, 3))
        assert len(engine.metrics()["resize_seconds"]) == 1
        engine.generate(random_prompts([5, 6], seed=83), PARAMS)  # new requests go to the new rank first
        stats = engine.stats()
        assert all(sum(a["rows_sent_per_layer"].values()) > 0 for a in stats["attention"])
        assert all(sum(x["rows_computed_per_layer"].values()) > 0 for x in stats["experts"])


def test_shrink_both_tiers_while_streaming_draining_and_moving(ray_session, tiny_maverick, reference):
    with ClusterEngine(tiny_maverick, ClusterConfig(2, 3, 1, cpus_per_worker=0.2), ENGINE) as engine:
        tokens, streaming = stream_through(engine, (1, 2, True))  # the leaving rank finishes first
        assert streaming >= 1  # LATE went to the staying rank and streams across the switch
        check(engine, tokens, reference, (1, 2))
    with ClusterEngine(tiny_maverick, ClusterConfig(2, 2, cpus_per_worker=0.2), ENGINE) as engine:
        tokens, streaming = stream_through(engine, (1, 2, False))  # its requests move at the switch
        assert streaming >= 8
        assert engine.metrics()["faults"]["requests_replayed"] == 0  # a move is not a failure
        check(engine, tokens, reference, (1, 2))


def test_bad_sizes_are_refused_and_change_nothing(ray_session, tiny_maverick):
    with ClusterEngine(tiny_maverick, ClusterConfig(1, 1, cpus_per_worker=0.2), ENGINE) as engine:
        for args, message in [
            ((0, 1), "a tier needs at least one worker"),
            ((1, 0), "a tier needs at least one worker"),
            ((1, 129), "129 expert workers for 128 experts"),
            ((1, 40), r"39 more workers need .* available"),
        ]:
            with pytest.raises(ValueError, match=message):
                engine.resize(*args)
            assert not engine.resizer.busy and (len(engine.attention), len(engine.experts)) == (1, 1)
        engine.resize(1, 1)  # the size it has: nothing to do
        assert not engine.resizer.busy
