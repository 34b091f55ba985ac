"""The vision encoder and early fusion against transformers' Llama4ForConditionalGeneration."""

from __future__ import annotations

import pytest
import torch

from attention.paged import SeqChunk, build_batch
from attention.vision import VisionEncoder, pixel_shuffle, vision_rotation
from engine.multimodal import RequestImages
from model.checkpoint import CheckpointError, CheckpointReader
from model.hf_reference import load_hf_conditional_generation
from model.image_processing import ImageProcessor
from model.synthetic import make_checkpoint
from model.vision_config import VisionConfig
from tests.attention.test_decoder import BLOCK, Contiguous, decoder_for, new_pool
from tests.helpers import (
    checked_rows,
    hf_image_logits,
    hf_vision_model,
    image_prompt_ids,
    random_image,
    random_prompts,
)


def hidden_states(dec, steps: list[list[SeqChunk]], blocks_per_seq: int) -> list[torch.Tensor]:
    """Final hidden states [T, H] of each step (logits only where a test asks: see checked_rows)."""
    cfg = dec.cfg
    tables = Contiguous(cfg.num_hidden_layers, blocks_per_seq)
    pool = new_pool(dec, cfg.num_hidden_layers * blocks_per_seq * 3)

    def key_start(layer: int, start: int) -> int:
        c = cfg.attention_chunk_size
        return start // c * c if cfg.is_chunked(layer) else 0

    return [
        dec.forward(build_batch(chunks, tables, key_start, cfg.num_hidden_layers, BLOCK), pool)
        for chunks in steps
    ]


def encoder_for(model_dir) -> VisionEncoder:
    with CheckpointReader(model_dir) as reader:
        return VisionEncoder.from_checkpoint(reader, torch.float32)


def hf_features(hf, pixel_values: torch.Tensor) -> torch.Tensor:
    """transformers' vision tower and projector: [N * T, H] rows, in hf's dtype."""
    with torch.no_grad():
        tower = hf.get_image_features(pixel_values=pixel_values.to(hf.dtype), return_dict=True)
        hidden = tower.last_hidden_state
        return hf.multi_modal_projector(hidden.reshape(-1, hidden.shape[-1]))


def test_features_equal_transformers_vision_model_and_projector(tiny_checkpoint):
    processor = ImageProcessor.for_checkpoint(tiny_checkpoint)
    image = processor.preprocess(random_image(300, 650, seed=1))  # 1 x 2 tiles + the global one
    assert image.num_tiles == 3
    ours = encoder_for(tiny_checkpoint).encode(image.pixel_values)
    ref = hf_features(hf_vision_model(tiny_checkpoint), image.pixel_values)
    exact = hf_features(load_hf_conditional_generation(tiny_checkpoint, torch.float64), image.pixel_values)
    assert ours.shape == ref.shape == (3 * 144, 64)
    # The yardstick is what fp32 rounding alone does here: transformers' own fp32 features against
    # its fp64 ones (about 3e-6 on this machine, where ours and its fp32 agree bitwise). A CI
    # machine once put ours and transformers' fp32 6e-4 apart; fp64 says which one drifted.
    rounding = (ref.double() - exact).abs().max().item()
    ours_error = (ours.double() - exact).abs().max().item()
    assert ours_error <= max(1e-4, 2 * rounding), (ours_error, rounding)
    torch.testing.assert_close(ours, ref, atol=max(1e-4, 3 * rounding), rtol=0)


def test_pixel_shuffle_gathers_two_by_two_blocks():
    c, side = 3, 4
    x = torch.arange(side * side * c, dtype=torch.float32).view(1, side * side, c)
    out = pixel_shuffle(x, 0.5)
    assert out.shape == (1, 4, 4 * c)
    for h in range(side):
        for w in range(side):
            token, channel = (h // 2) * 2 + w // 2, (h % 2) * 2 * c + (w % 2) * c
            assert torch.equal(out[0, token, channel : channel + c], x[0, h * side + w])


def test_rope_turns_columns_then_rows_and_leaves_the_class_token():
    cfg = VisionConfig(32, 1, 2, 128, 64, 64, 64, 64)
    rot = vision_rotation(cfg)
    assert rot.shape == (577, 8)
    assert torch.allclose(rot[-1], torch.ones(8, dtype=rot.dtype))
    angle = rot.angle()
    # patch 25 is column 1, row 1; patch 1 is column 1, row 0: the first 4 pairs agree, the rest not
    assert torch.allclose(angle[25, :4], angle[1, :4]) and not torch.allclose(angle[25, 4:], angle[1, 4:])


@pytest.mark.parametrize("num_images", [1, 2, pytest.param(8, marks=pytest.mark.slow)])
def test_prefill_logits_with_images_match_transformers(tiny_checkpoint, num_images):
    """Images interleaved with text, batched with text-only requests, one prefill step."""
    processor = ImageProcessor.for_checkpoint(tiny_checkpoint)
    text = random_prompts([5, 3, 4, 2, 6, 3, 2, 4, 5], seed=num_images)
    sizes = {1: [(300, 650)], 2: [(336, 336), (672, 336)], 8: [(40 + 9 * i, 60) for i in range(8)]}[
        num_images
    ]
    parts = [text[0]]
    for i, size in enumerate(sizes):
        parts += [size, text[i + 1]]
    prompt, images = image_prompt_ids(processor, parts, seed=num_images)
    text_only = random_prompts([23, 7], seed=50 + num_images)
    dec, enc = decoder_for(tiny_checkpoint), encoder_for(tiny_checkpoint)
    placed = RequestImages.place(prompt, torch.cat(enc.encode_images(images)), 200092)
    chunks = [
        SeqChunk("t0", text_only[0], 0),
        SeqChunk("img", prompt, 0, placed.rows(0, len(prompt))),
        SeqChunk("t1", text_only[1], 0),
    ]
    (hidden,) = hidden_states(dec, [chunks], (len(prompt) + BLOCK - 1) // BLOCK)
    n0, rows = len(text_only[0]), checked_rows(prompt)
    ours = dec.logits(hidden[n0 + rows])
    torch.testing.assert_close(
        ours, hf_image_logits(tiny_checkpoint, prompt, images, rows), atol=1e-4, rtol=0
    )
    first = torch.arange(n0)
    ref = hf_image_logits(tiny_checkpoint, text_only[0], [], first)
    torch.testing.assert_close(dec.logits(hidden[first]), ref, atol=1e-4, rtol=0)


def test_chunked_prefill_cutting_through_an_image_equals_one_step(tiny_maverick):
    processor = ImageProcessor.for_checkpoint(tiny_maverick)
    prompt, images = image_prompt_ids(processor, [[7, 8, 9], (300, 650), [10, 11]], seed=3)
    dec, enc = decoder_for(tiny_maverick), encoder_for(tiny_maverick)
    placed = RequestImages.place(prompt, torch.cat(enc.encode_images(images)), 200092)
    per_seq = (len(prompt) + BLOCK - 1) // BLOCK
    (whole,) = hidden_states(dec, [[SeqChunk("a", prompt, 0, placed.rows(0, len(prompt)))]], per_seq)
    # chunk edges inside the first tile, across the tile separator, inside the global tile
    edges = [0, 2, 77, 150, 301, 433, len(prompt)]
    steps = [
        [SeqChunk("b", prompt[s:e], s, placed.rows(s, e))] for s, e in zip(edges, edges[1:], strict=False)
    ]
    assert all(step[0].image_rows is not None for step in steps[1:-1])
    parts = hidden_states(dec, steps, per_seq)
    rows = checked_rows(prompt)
    torch.testing.assert_close(dec.logits(torch.cat(parts)[rows]), dec.logits(whole[rows]), atol=1e-4, rtol=0)


def test_placing_features_checks_the_patch_count():
    with pytest.raises(
        ValueError, match="the prompt has 2 <\\|patch\\|> tokens but its images give 3 feature rows"
    ):
        RequestImages.place([1, 200092, 200092, 5], torch.zeros(3, 8), 200092)


def test_text_only_checkpoint_has_no_vision_tower(tmp_path):
    ckpt = make_checkpoint("tiny-scout", tmp_path / "text", seed=1, vision=False)
    with CheckpointReader(ckpt) as reader:
        assert reader.vision_config is None and not reader.has_vision
        with pytest.raises(CheckpointError, match="no vision tower"):
            VisionEncoder.from_checkpoint(reader, torch.float32)
    assert ImageProcessor.for_checkpoint(ckpt) is None
