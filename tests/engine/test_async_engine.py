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


def outputs_of(engine, prompt, params):
    async def main():
        return [out async for out in engine.generate(prompt, params)]

    return asyncio.run(main())


def test_stream_interval_holds_tokens_but_sends_the_first_and_the_end_at_once(tiny_maverick):
    prompt = random_prompts([9], seed=33)[0]
    params = SamplingParams(max_tokens=11, ignore_eos=True)
    cfg = EngineConfig(num_kv_blocks=512, block_size=4)
    every = AsyncEngine(LLMEngine.from_checkpoint(tiny_maverick, cfg))
    fours = AsyncEngine(LLMEngine.from_checkpoint(tiny_maverick, cfg), stream_interval=4)
    try:
        each = outputs_of(every, prompt, params)
        held = outputs_of(fours, prompt, params)
    finally:
        every.close()
        fours.close()
    tokens = [t for out in each for t in out.new_token_ids]
    assert [t for out in held for t in out.new_token_ids] == tokens
    # 11 tokens: the first alone, then at least 4 per output, the last one when it ends
    sizes = [len(out.new_token_ids) for out in held]
    assert sizes[0] == 1 and all(n >= 4 for n in sizes[1:-1]) and sum(sizes) == 11
    assert held[-1].finished and not any(out.finished for out in held[:-1])
    assert held[-1].num_output_tokens == 11 and held[-1].finish_reason is FinishReason.LENGTH


def test_outputs_queued_while_the_consumer_is_away_come_as_one(engine):
    prompt = random_prompts([7], seed=34)[0]

    async def main():
        start = engine.num_steps
        stream = engine.generate(prompt, SamplingParams(max_tokens=12, ignore_eos=True))
        first = await stream.__anext__()
        while engine.num_steps < start + 12:  # a prefill and 11 decode steps, while nobody reads
            await asyncio.sleep(0.01)
        await asyncio.sleep(0)  # the last step's output, handed over before its count, is queued
        rest = [out async for out in stream]
        return first, rest

    first, rest = asyncio.run(main())
    assert len(first.new_token_ids) == 1
    assert len(rest) == 1 and rest[0].finished and len(rest[0].new_token_ids) == 11
    expected = outputs_of(engine, prompt, SamplingParams(max_tokens=12, ignore_eos=True))
    assert first.new_token_ids + rest[0].new_token_ids == tuple(t for o in expected for t in o.new_token_ids)


def test_a_bad_stream_interval_is_refused(tiny_maverick):
    with pytest.raises(ValueError, match="stream_interval must be >= 1, not 0"):
        AsyncEngine(LLMEngine.from_checkpoint(tiny_maverick), stream_interval=0)
