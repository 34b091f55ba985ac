"""config.json parsing: derived layer lists, both rope formats, named errors."""

from __future__ import annotations

import pytest

from model.config import ModelConfig
from model.presets import preset_config


def test_empty_no_rope_layers_means_every_fourth_is_nope():
    cfg = ModelConfig.from_dict(preset_config("tiny-maverick"))
    assert [i for i, r in enumerate(cfg.rope_layers) if not r] == [3, 7]
    assert cfg.moe_layers == (1, 3, 5, 7)
    assert cfg.is_chunked(0) and not cfg.is_chunked(3)


def test_explicit_lists_are_kept():
    raw = {**preset_config("tiny-scout"), "no_rope_layers": [1, 0] * 4, "moe_layers": [0, 5]}
    cfg = ModelConfig.from_dict(raw)
    assert cfg.rope_layers == (True, False) * 4
    assert cfg.moe_layers == (0, 5)


def test_llama3_scaling_from_either_format():
    old = ModelConfig.from_dict(preset_config("tiny-scout"))
    raw = preset_config("tiny-scout")
    scaling = raw.pop("rope_scaling")
    raw["rope_parameters"] = {**scaling, "rope_theta": raw.pop("rope_theta")}
    new = ModelConfig.from_dict(raw)
    assert old.rope_scaling == new.rope_scaling and old.rope_scaling.factor == 16.0
    assert old.rope_theta == new.rope_theta == 500000.0


def test_wrapped_text_config_is_read():
    cfg = ModelConfig.from_dict({"model_type": "llama4", "text_config": preset_config("tiny-scout")})
    assert cfg.num_local_experts == 16 and cfg.use_qk_norm


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("num_experts_per_tok", 2, "num_experts_per_tok"),
        ("hidden_size", 0, "hidden_size"),
        ("no_rope_layers", [1, 1], "no_rope_layers"),
        ("moe_layers", [9], "moe_layers"),
        ("rope_scaling", {"rope_type": "yarn", "factor": 2.0}, "rope_type"),
        ("rope_scaling", {"rope_type": "llama3", "factor": 2.0}, "low_freq_factor"),
    ],
)
def test_bad_fields_are_named(field, value, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_dict({**preset_config("tiny-maverick"), field: value})


def test_missing_field_is_named():
    raw = preset_config("tiny-maverick")
    del raw["num_local_experts"]
    with pytest.raises(ValueError, match="num_local_experts"):
        ModelConfig.from_dict(raw)
