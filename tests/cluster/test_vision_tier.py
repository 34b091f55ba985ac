"""Images through the disaggregated engine: the vision-encoder tier (Ray actors) or, without it,
the attention workers encode; greedy tokens equal the single-process engine's (itself checked
against transformers in tests/engine/test_multimodal.py)."""

from __future__ import annotations

import pytest
import ray

from cluster.config import ClusterConfig
from cluster.engine import ClusterEngine
from engine.core import EngineConfig
from engine.llm_engine import LLMEngine
from engine.request import SamplingParams
from model.image_processing import ImageProcessor
from tests.helpers import image_prompt_ids, random_prompts

ENGINE = EngineConfig(num_kv_blocks=1024, block_size=16, token_budget=128)
PARAMS = SamplingParams(max_tokens=5, ignore_eos=True)


@pytest.fixture(scope="module")
def requests(tiny_maverick):
    """Two image prompts and a text one at the start, an image prompt arriving later."""
    processor = ImageProcessor.for_checkpoint(tiny_maverick)
    text = random_prompts([3, 4, 2, 5], seed=31)
    first = image_prompt_ids(processor, [text[0], (300, 650), text[1]], seed=1)
    second = image_prompt_ids(processor, [text[2], (50, 70), (336, 336)], seed=2)
    late = image_prompt_ids(processor, [text[3], (90, 40)], seed=3)
    return [first, second, (random_prompts([21], seed=32)[0], [])], late


@pytest.fixture(scope="module")
def expected(tiny_maverick, requests):
    return run(LLMEngine.from_checkpoint(tiny_maverick, ENGINE), *requests)


def run(engine, start: list, late: tuple) -> list[list[int]]:
    ids = [engine.add(prompt, PARAMS, images=images) for prompt, images in start]
    tokens = {i: [] for i in ids}
    steps = 0
    while engine.has_unfinished or len(ids) == len(start):
        if steps == 3:
            ids.append(engine.add(late[0], PARAMS, images=late[1]))
            tokens[ids[-1]] = []
        for out in engine.step():
            tokens[out.request_id].extend(out.new_token_ids)
        steps += 1
    return [tokens[i] for i in ids]


@pytest.mark.slow
def test_vision_workers_encode_for_every_attention_rank(ray_session, tiny_maverick, requests, expected):
    cluster = ClusterConfig(2, 1, num_vision_workers=1)
    with ClusterEngine(tiny_maverick, cluster, ENGINE) as engine:
        assert run(engine, *requests) == expected
        # a request aborted while its images are encoded never reaches a rank
        prompt, images = requests[0][1]
        rid = engine.add(prompt, PARAMS, images=images)
        engine.abort(rid)
        assert not engine.has_unfinished
        (vision,) = engine.stats()["vision"]
        assert vision["images_encoded"] == 4  # the aborted request's images were never sent
        assert vision["calls"] == 2  # the first three requests' images in one call, the late one in another
        # a vision worker that dies is restarted; the next image request is served as before
        ray.kill(engine.vision.workers[0], no_restart=False)
        assert run(engine, [requests[0][0]], requests[1]) == [expected[0], expected[3]]
    assert engine.vision is None  # closed


@pytest.mark.slow
def test_without_vision_workers_the_attention_workers_encode(ray_session, tiny_maverick, requests, expected):
    with ClusterEngine(tiny_maverick, ClusterConfig(1, 2), ENGINE) as engine:
        assert engine.vision is None
        assert run(engine, *requests) == expected
