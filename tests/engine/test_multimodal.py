"""Requests with images through the single-process engine: greedy tokens equal transformers'
`generate` with the same pixels, under chunked prefill that cuts through the images."""

from __future__ import annotations

import pytest

from engine.core import EngineConfig
from engine.llm_engine import LLMEngine
from engine.request import SamplingParams
from model.image_processing import ImageProcessor
from model.synthetic import make_checkpoint
from model.vision_config import ImageProcessingConfig
from tests.helpers import hf_greedy, hf_greedy_with_images, image_prompt_ids, random_prompts

MAX_TOKENS = 6
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)


def run(engine: LLMEngine, requests: list[tuple[list[int], list]]) -> list[list[int]]:
    ids = [engine.add(prompt, GREEDY, images=images) for prompt, images in requests]
    tokens: dict[str, list[int]] = {i: [] for i in ids}
    while engine.has_unfinished:
        for out in engine.step():
            tokens[out.request_id].extend(out.new_token_ids)
    return [tokens[i] for i in ids]


def test_greedy_tokens_with_images_equal_transformers_under_chunked_prefill(tiny_scout):
    processor = ImageProcessor.for_checkpoint(tiny_scout)
    text = random_prompts([4, 3, 5], seed=11)
    with_images, images = image_prompt_ids(
        processor, [text[0], (300, 650), text[1], (336, 336), text[2]], seed=5
    )
    plain = random_prompts([30], seed=12)[0]
    # 100 tokens a step: the 600-token prompt's prefill is cut inside tiles and separators
    engine = LLMEngine.from_checkpoint(tiny_scout, EngineConfig(num_kv_blocks=512, token_budget=100))
    got = run(engine, [(with_images, images), (plain, [])])
    expected, gap = hf_greedy_with_images(tiny_scout, with_images, images, MAX_TOKENS)
    plain_expected, plain_gap = hf_greedy(tiny_scout, plain, MAX_TOKENS)
    assert min(gap, plain_gap) > 1e-3, "a near tie: the exact comparison would be decided by rounding"
    assert got == [expected, plain_expected]


def test_preempted_image_request_recomputes_the_same_tokens(tiny_maverick):
    processor = ImageProcessor.for_checkpoint(tiny_maverick)
    prompt, images = image_prompt_ids(processor, [[5, 6], (336, 336), [7]], seed=2)
    roomy = LLMEngine.from_checkpoint(tiny_maverick, EngineConfig(num_kv_blocks=512, block_size=16))
    (expected,) = run(roomy, [(prompt, images)])
    # two image requests that cannot both hold their KV: one is preempted and recomputed
    tight = LLMEngine.from_checkpoint(
        tiny_maverick, EngineConfig(num_kv_blocks=60, block_size=16, token_budget=64)
    )
    assert run(tight, [(prompt, images), (prompt, images)]) == [expected, expected]
    assert tight.core.scheduler.num_preemptions > 0


def test_images_need_a_vision_tower(tmp_path):
    ckpt = make_checkpoint("tiny-maverick", tmp_path / "text-only", seed=0, vision=False)
    prompt, images = image_prompt_ids(ImageProcessor(ImageProcessingConfig(), 144), [[5], (40, 40)])
    engine = LLMEngine.from_checkpoint(ckpt, EngineConfig(num_kv_blocks=64))
    with pytest.raises(ValueError, match="has images, but this engine has no vision encoder"):
        engine.add(prompt, GREEDY, images=images)
    assert not engine.has_unfinished
