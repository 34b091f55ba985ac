"""The asyncio front: streams, cancellation, overload, bad requests."""

from __future__ import annotations

import asyncio

import pytest

from engine.async_engine import AsyncEngine, QueueFullError
from engine.core import EngineConfig
from engine.llm_engine import LLMEngine
from engine.request import FinishReason, SamplingParams
from tests.helpers import random_prompts

PARAMS = SamplingParams(max_tokens=10, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(tiny_maverick):
    e = AsyncEngine(
        LLMEngine.from_checkpoint(tiny_maverick, EngineConfig(num_kv_blocks=512, block_size=4)), max_pending=4
    )
    yield e
    e.close()


async def collect(engine, prompt, params=PARAMS):
    tokens, last = [], None
    async for out in engine.generate(prompt, params):
        tokens.extend(out.new_token_ids)
        last = out
    return tokens, last


def test_concurrent_streams_equal_the_batch_engine(engine, tiny_maverick):
    prompts = random_prompts([5, 17, 30], seed=31)
    expected = [c.token_ids for c in LLMEngine.from_checkpoint(tiny_maverick).generate(prompts, PARAMS)]

    async def main():
        return await asyncio.gather(*(collect(engine, p) for p in prompts))

    results = asyncio.run(main())
    assert [tokens for tokens, _ in results] == expected
    assert all(last.finish_reason is FinishReason.LENGTH for _, last in results)


def test_abandoned_stream_frees_its_blocks(engine):
    async def main():
        stream = engine.generate(
            random_prompts([20], seed=32)[0], SamplingParams(max_tokens=500, ignore_eos=True)
        )
        first = await stream.__anext__()
        await stream.aclose()  # the client went away
        for _ in range(100):
            await asyncio.sleep(0.05)
            if engine.engine.metrics()["kv_blocks_used"] == 0:
                break
        return first

    first = asyncio.run(main())
    assert first.new_token_ids
    assert engine.engine.metrics()["kv_blocks_used"] == 0
    assert not engine.engine.has_unfinished


def test_bad_request_fails_alone(engine):
    async def main():
        with pytest.raises(ValueError, match="context length"):
            await collect(engine, list(range(4090)), SamplingParams(max_tokens=100))
        return await collect(engine, [200000, 5, 6])

    tokens, last = asyncio.run(main())
    assert len(tokens) == 10 and last.finished


def test_queue_full_is_refused(engine):
    async def main():
        streams = [
            engine.generate([1, 2, 3], SamplingParams(max_tokens=200, ignore_eos=True)) for _ in range(4)
        ]
        for s in streams:
            await s.__anext__()
        with pytest.raises(QueueFullError):
            await engine.generate([1, 2], PARAMS).__anext__()
        for s in streams:
            await s.aclose()

    asyncio.run(main())
