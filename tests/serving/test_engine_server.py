"""The engine deployment's class outside Serve, with the single-process engine (no Ray)."""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from engine.async_engine import AsyncEngine
from engine.core import EngineConfig
from engine.llm_engine import LLMEngine
from engine.process_engine import ProcessEngine
from engine.request import SamplingParams
from serving.engine_server import EngineFailure, EngineServer, EngineSpec

ENGINE = EngineConfig(num_kv_blocks=256, block_size=4)
PARAMS = SamplingParams(max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def server(tiny_maverick):
    s = EngineServer(EngineSpec(str(tiny_maverick), ENGINE, cluster=None, max_pending=2))
    yield s
    s.__del__()


@pytest.fixture(scope="module")
def run():
    """One event loop for the module, as a Serve replica has (outputs of a request that is being
    aborted may still be delivered to its loop)."""
    loop = asyncio.new_event_loop()
    yield loop.run_until_complete
    loop.close()


async def collect(server: EngineServer, prompt: list[int], params: SamplingParams = PARAMS) -> list:
    return [item async for item in server.generate(prompt, params, f"r{id(prompt)}")]


def test_streams_the_engine_tokens(server, run, tiny_maverick):
    prompt = [200000, 11, 12, 13]
    items = run(collect(server, prompt))
    expected = LLMEngine.from_checkpoint(tiny_maverick, ENGINE).generate([prompt], PARAMS)[0].token_ids
    assert [t for item in items for t in item.new_token_ids] == expected
    assert items[-1].finished and items[-1].num_output_tokens == 6


def test_bad_request_is_a_failure_item_not_an_exception(server, run):
    (item,) = run(collect(server, list(range(1, 4095)), SamplingParams(max_tokens=10)))
    assert isinstance(item, EngineFailure) and item.kind == "invalid_request"
    assert "4096" in item.message


def test_full_queue_is_a_failure_item(server, run):
    long = SamplingParams(max_tokens=400, ignore_eos=True)

    async def main():
        held = [server.generate([1, 2, 3], long, f"hold{i}") for i in range(2)]
        for stream in held:
            await anext(stream)
        third = await collect(server, [4, 5, 6])
        for stream in held:
            await stream.aclose()  # the consumer goes away: the engine aborts the requests
        return third

    (item,) = run(main())
    assert isinstance(item, EngineFailure) and item.kind == "queue_full"
    for _ in range(600):  # closing the streams aborted the requests: their blocks come back
        if server.engine.gauges()["kv_blocks_used"] == 0:
            break
        time.sleep(0.05)
    gauges = server.engine.gauges()
    assert gauges["kv_blocks_used"] == 0 and gauges["num_running"] == gauges["num_waiting"] == 0


def test_metrics_and_health(server, run):
    m = run(server.metrics())
    assert m["alive"] and server.is_alive()
    server.check_health()
    assert m["kv_blocks_total"] == 256 and m["expert_worker_tokens"] == []
    assert {"num_running", "num_waiting", "kv_blocks_used", "replica", "num_steps"} <= set(m)


def test_the_single_process_engine_steps_in_a_child_process(server):
    assert isinstance(server.engine, ProcessEngine)
    assert server.engine.pid != os.getpid() and server.engine.alive


def test_on_a_thread_the_engine_streams_the_same_tokens(server, run, tiny_maverick):
    prompt = [200000, 21, 22, 23, 24]
    on_thread = EngineServer(
        EngineSpec(str(tiny_maverick), ENGINE, cluster=None, max_pending=2, engine_process=False)
    )
    try:
        assert isinstance(on_thread.engine, AsyncEngine)
        thread_items = run(collect(on_thread, prompt))
    finally:
        on_thread.close()
    process_items = run(collect(server, prompt))
    assert [t for i in thread_items for t in i.new_token_ids] == [
        t for i in process_items for t in i.new_token_ids
    ]
