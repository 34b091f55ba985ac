"""The vision config of a Llama 4 checkpoint: the real models' values, and bad ones named."""

from __future__ import annotations

import pytest

from model.vision_config import ImageProcessingConfig, VisionConfig

# Scout's and Maverick's vision_config (identical), as in their config.json
REAL = {
    "hidden_size": 1408,
    "num_hidden_layers": 34,
    "num_attention_heads": 16,
    "intermediate_size": 5632,
    "projector_input_dim": 4096,
    "projector_output_dim": 4096,
    "vision_output_dim": 4096,
    "image_size": 336,
    "patch_size": 14,
    "pixel_shuffle_ratio": 0.5,
    "rope_theta": 10000,
    "vision_feature_layer": -1,
}


def test_the_real_models_geometry():
    cfg = VisionConfig.from_dict({"text_config": {"hidden_size": 5120}, "vision_config": REAL})
    assert (cfg.head_dim, cfg.num_patches, cfg.tokens_per_tile, cfg.adapter_input_dim) == (88, 576, 144, 5632)
    assert cfg.image_token_id == 200092 and cfg.text_hidden_size == 5120 and cfg.rope_theta == 10000.0
    assert VisionConfig.from_dict({"text_config": {"hidden_size": 64}}) is None  # text only


@pytest.mark.parametrize(
    "change, message",
    [
        ({"hidden_size": 0}, "'vision_config.hidden_size' must be a positive integer"),
        ({"patch_size": 15}, "not a multiple of patch_size 15"),
        ({"num_attention_heads": 15}, "divisible by 4"),
        ({"vision_output_dim": 2048}, "must equal vision_output_dim 2048"),
        ({"vision_feature_layer": -2}, "vision_feature_layer -2 is not supported"),
    ],
)
def test_bad_values_are_named(change, message):
    with pytest.raises(ValueError, match=message):
        VisionConfig.from_dict({"text_config": {"hidden_size": 5120}, "vision_config": {**REAL, **change}})


def test_preprocessor_config_must_match_the_tile(tmp_path):
    cfg = VisionConfig.from_dict({"text_config": {"hidden_size": 5120}, "vision_config": REAL})
    assert ImageProcessingConfig.for_checkpoint(tmp_path, cfg) == ImageProcessingConfig()
    (tmp_path / "preprocessor_config.json").write_text(
        '{"size": {"height": 448, "width": 448}, "max_patches": 4}'
    )
    with pytest.raises(ValueError, match="match vision_config.image_size 336"):
        ImageProcessingConfig.for_checkpoint(tmp_path, cfg)
    (tmp_path / "preprocessor_config.json").write_text(
        '{"size": {"height": 336, "width": 336}, "max_patches": 4}'
    )
    assert ImageProcessingConfig.for_checkpoint(tmp_path, cfg).max_patches == 4
