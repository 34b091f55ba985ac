"""The engine in a child process: the same tokens, bad requests, abandoned streams, calls, the
child's death (a real SIGKILL: its requests go on in a new child with the same tokens, or fail
once the restarts are spent), a request that kills every child, and the child's exit when its
parent dies."""

from __future__ import annotations

import asyncio
import functools
import operator
import os
import signal
import subprocess
import sys
import time

import pytest

from engine.async_engine import EngineDeadError, QueueFullError
from engine.core import EngineConfig
from engine.llm_engine import LLMEngine
from engine.process_engine import ProcessEngine
from engine.request import FinishReason, SamplingParams
from tests.engine import crashing_engine
from tests.helpers import random_prompts

CONFIG = EngineConfig(num_kv_blocks=512, block_size=4)
PARAMS = SamplingParams(max_tokens=10, ignore_eos=True)
LONG = SamplingParams(max_tokens=400, ignore_eos=True)


def factory(checkpoint) -> functools.partial:
    return functools.partial(LLMEngine.from_checkpoint, str(checkpoint), CONFIG)


@pytest.fixture(scope="module")
def engine(tiny_maverick):
    e = ProcessEngine(factory(tiny_maverick), threads=1, max_pending=4)
    yield e
    e.close()


@pytest.fixture(scope="module")
def run():
    """One event loop for the module, as a Serve replica has."""
    loop = asyncio.new_event_loop()
    yield loop.run_until_complete
    loop.close()


async def collect(engine, prompt, params=PARAMS, request_id=None):
    tokens, last = [], None
    async for out in engine.generate(prompt, params, request_id):
        tokens.extend(out.new_token_ids)
        last = out
    return tokens, last


def wait_for(condition, timeout_s: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_the_child_steps_the_engine_and_its_tokens_equal_the_engine_in_process(engine, run, tiny_maverick):
    prompts = random_prompts([5, 17, 30], seed=41)
    expected = [
        c.token_ids for c in LLMEngine.from_checkpoint(tiny_maverick, CONFIG).generate(prompts, PARAMS)
    ]
    steps_before = engine.num_steps

    async def main():
        return await asyncio.gather(*(collect(engine, p) for p in prompts))

    results = run(main())
    assert [tokens for tokens, _ in results] == expected
    assert all(last.finish_reason is FinishReason.LENGTH for _, last in results)
    assert engine.pid != os.getpid() and engine.alive
    # every step's outputs came in one message, with the step's time: 10 tokens take >= 10 steps
    assert engine.num_steps - steps_before >= 10
    assert engine.step_times.count == engine.num_steps and engine.step_times.total_s > 0


def test_a_request_that_cannot_run_is_a_value_error_and_the_engine_serves_on(engine, run):
    with pytest.raises(ValueError, match="context length"):
        run(collect(engine, list(range(4090)), SamplingParams(max_tokens=100)))
    tokens, last = run(collect(engine, [200000, 5, 6]))
    assert len(tokens) == 10 and last.finished


def test_a_running_request_id_cannot_be_reused(engine, run):
    async def main():
        first = engine.generate([1, 2, 3], LONG, "same")
        await anext(first)
        with pytest.raises(ValueError, match="already running"):
            await collect(engine, [4, 5, 6], request_id="same")
        await first.aclose()

    run(main())


def test_an_abandoned_stream_frees_its_blocks_in_the_child(engine, run):
    async def main():
        stream = engine.generate(random_prompts([20], seed=42)[0], LONG)
        first = await anext(stream)
        used = engine.gauges()["kv_blocks_used"]
        await stream.aclose()  # the client went away
        return first, used

    first, used = run(main())
    assert first.new_token_ids and used > 0
    # the child answers an abort that leaves it idle with its gauges
    assert wait_for(lambda: engine.gauges()["kv_blocks_used"] == 0)
    assert engine.gauges()["num_running"] == 0


def test_a_full_engine_refuses_more(engine, run):
    async def main():
        held = [engine.generate([1, 2, 3], LONG) for _ in range(4)]
        for stream in held:
            await anext(stream)
        try:
            with pytest.raises(QueueFullError):
                await collect(engine, [4, 5, 6])
        finally:
            for stream in held:
                await stream.aclose()

    run(main())
    assert wait_for(lambda: engine.gauges()["kv_blocks_used"] == 0)


def test_calls_run_in_the_child_and_their_errors_come_back(engine):
    stats = engine.call(operator.methodcaller("stats")).result(timeout=30)
    assert stats["attention"] == [{"dp_rank": 0}]
    with pytest.raises(AttributeError, match="no_such_verb"):
        engine.call(operator.methodcaller("no_such_verb")).result(timeout=30)
    with pytest.raises(Exception, match="pickle"):  # a lambda cannot cross to the child
        engine.call(lambda e: e.metrics()).result(timeout=30)
    assert engine.alive


def test_an_engine_that_cannot_be_built_is_a_runtime_error(tmp_path):
    with pytest.raises(RuntimeError, match="could not build its engine.*config.json"):
        ProcessEngine(functools.partial(LLMEngine.from_checkpoint, str(tmp_path), CONFIG))


def test_a_killed_child_with_no_restarts_fails_its_streams_and_the_engine_reports_dead(tiny_maverick):
    engine = ProcessEngine(factory(tiny_maverick), threads=1, restarts=0)
    loop = asyncio.new_event_loop()

    async def main():
        stream = engine.generate([1, 2, 3], LONG)
        await anext(stream)
        os.kill(engine.pid, signal.SIGKILL)
        with pytest.raises(EngineDeadError, match="exited"):
            async for _ in stream:
                pass

    try:
        loop.run_until_complete(main())
        assert not engine.alive and "exited" in engine.reason
        with pytest.raises(EngineDeadError):
            loop.run_until_complete(collect(engine, [1, 2, 3]))
        with pytest.raises(EngineDeadError):
            engine.call(operator.methodcaller("stats")).result(timeout=30)
    finally:
        engine.close()
        loop.close()


def mixed_requests(checkpoint):
    """Prompts, their params (greedy, seeded and unseeded sampling, prompt logprobs, a stop token)
    and an uninterrupted in-process run of them (for the stop token: what it should stop at)."""
    prompts = random_prompts([5, 17, 30, 9, 12], seed=43)
    long = SamplingParams(max_tokens=200, ignore_eos=True)
    params = [
        long,
        SamplingParams(max_tokens=200, ignore_eos=True, temperature=0.8, seed=11),
        SamplingParams(max_tokens=200, ignore_eos=True, prompt_logprobs=2, logprobs=1),
        SamplingParams(max_tokens=200, ignore_eos=True, temperature=1.0),
        long,
    ]
    reference = [c.token_ids for c in LLMEngine.from_checkpoint(checkpoint, CONFIG).generate(prompts, params)]
    # a stop token the greedy continuation of prompt 4 reaches after a hundred tokens or so
    stop = reference[4][100]
    params[4] = SamplingParams(max_tokens=200, stop_token_ids=(stop,))
    reference[4] = reference[4][: reference[4].index(stop) + 1]
    return prompts, params, reference


def test_a_killed_child_is_replaced_and_its_requests_go_on_with_the_same_tokens(tiny_maverick):
    """Greedy, seeded and unseeded sampling, prompt logprobs and a stop token, killed mid-stream:
    what each stream receives equals an uninterrupted run (the unseeded one: its length)."""
    prompts, params, reference = mixed_requests(tiny_maverick)
    engine = ProcessEngine(factory(tiny_maverick), threads=1, restarts=1)
    first_pid = engine.pid
    loop = asyncio.new_event_loop()

    async def one(prompt, p, started: asyncio.Event):
        tokens, prompt_lps, lps, last = [], [], [], None
        async for out in engine.generate(prompt, p):
            tokens += out.new_token_ids
            prompt_lps += out.prompt_logprobs
            lps += out.logprobs
            last = out
            started.set()
        return tokens, prompt_lps, lps, last

    async def main():
        started = [asyncio.Event() for _ in prompts]
        tasks = [asyncio.create_task(one(*args)) for args in zip(prompts, params, started, strict=True)]
        for event in started:
            await event.wait()
        os.kill(engine.pid, signal.SIGKILL)
        return await asyncio.gather(*tasks)

    try:
        results = loop.run_until_complete(main())
        for i in (0, 1, 2):
            assert results[i][0] == reference[i], i
        assert len(results[3][0]) == 200
        assert results[4][0] == reference[4] and results[4][3].finish_reason is FinishReason.STOP
        # prompt logprobs once each, though the new child computed the prompt again
        _, prompt_lps, lps, last = results[2]
        assert prompt_lps[0] is None and [e.token_id for e in prompt_lps[1:]] == prompts[2][1:]
        assert [e.token_id for e in lps] == reference[2] and last.num_output_tokens == 200
        assert engine.alive and engine.pid != first_pid
        faults = engine.gauges()["faults"]
        assert faults["worker_failures"] == {"engine": 1} and faults["requests_replayed"] == 5
        assert faults["recoveries"] == 1 and faults["recovery_seconds"][0] > 0
        tokens, _ = loop.run_until_complete(collect(engine, prompts[0], PARAMS))
        assert tokens == reference[0][:10]
        # the restart budget (1) is spent: the next death is the end
        os.kill(engine.pid, signal.SIGKILL)
        assert wait_for(lambda: not engine.alive)
        with pytest.raises(EngineDeadError):
            loop.run_until_complete(collect(engine, [1, 2, 3]))
    finally:
        engine.close()
        loop.close()


def test_a_request_that_kills_every_child_fails_and_the_engine_serves_on(tiny_maverick):
    build = functools.partial(crashing_engine.build, str(tiny_maverick), CONFIG)
    engine = ProcessEngine(build, threads=1, restarts=3, max_deaths_per_request=2)
    loop = asyncio.new_event_loop()
    try:
        with pytest.raises(EngineDeadError, match="failed 2 times while running this request"):
            loop.run_until_complete(collect(engine, [crashing_engine.POISON]))
        assert engine.alive and engine.gauges()["faults"]["worker_failures"] == {"engine": 2}
        prompt = random_prompts([8], seed=44)[0]
        (expected,) = LLMEngine.from_checkpoint(tiny_maverick, CONFIG).generate([prompt], PARAMS)
        assert loop.run_until_complete(collect(engine, prompt))[0] == expected.token_ids
    finally:
        engine.close()
        loop.close()


PARENT = """
import functools, os, sys
from engine.core import EngineConfig
from engine.llm_engine import LLMEngine
from engine.process_engine import ProcessEngine
config = EngineConfig(num_kv_blocks=64)
engine = ProcessEngine(functools.partial(LLMEngine.from_checkpoint, sys.argv[1], config))
print(engine.pid, flush=True)
os._exit(0)  # no close(): the parent just goes away
"""


def test_the_child_exits_when_its_parent_dies(tiny_maverick):
    parent = subprocess.run(
        [sys.executable, "-c", PARENT, str(tiny_maverick)], capture_output=True, text=True, timeout=300
    )
    child = int(parent.stdout.split()[-1])

    def gone() -> bool:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return True
        # a zombie is gone too: it was reparented and exited, waiting to be reaped
        with open(f"/proc/{child}/stat") as f:
            return f.read().split(")")[-1].split()[0] == "Z"

    assert wait_for(gone, timeout_s=60)
