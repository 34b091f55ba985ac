"""The presets: Llama 4-shaped text configs and vision towers small enough for a 2-core CPU
(`model.synthetic` makes random-weight checkpoints of them).

Presets switch every architectural feature on at a size a 2-core CPU runs: the real vocabulary
(202048, so the real tokenizer works), at least 8 layers (RoPE and NoPE layers both appear
twice), and an attention chunk and temperature-tuning floor of tens of tokens so short prompts
cross chunk boundaries and reach the tuned range.
"""

from __future__ import annotations

import json
from typing import Any

DEFAULT_PRESET = "tiny-maverick"  # the embedded default that `llama4-ep serve` makes and serves

_COMMON: dict[str, Any] = {
    "model_type": "llama4_text",
    "vocab_size": 202048,
    "num_hidden_layers": 8,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "hidden_size": 64,
    "intermediate_size": 64,
    "intermediate_size_mlp": 128,
    "num_experts_per_tok": 1,
    "attention_chunk_size": 16,
    "floor_scale": 12,
    "attn_scale": 0.1,
    "attn_temperature_tuning": True,
    "rms_norm_eps": 1e-5,
    "max_position_embeddings": 4096,
    "bos_token_id": 200000,
    "eos_token_id": [200001, 200007, 200008],
    "pad_token_id": 200018,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "attention_bias": False,
    "no_rope_layers": [],
    "rope_theta": 500000.0,
}

PRESETS: dict[str, dict[str, Any]] = {
    "tiny-maverick": {
        **_COMMON,
        "num_local_experts": 128,
        "interleave_moe_layer_step": 2,
        "use_qk_norm": False,
        "rope_scaling": None,
    },
    "tiny-scout": {
        **_COMMON,
        "num_local_experts": 16,
        "interleave_moe_layer_step": 1,
        "use_qk_norm": True,
        # factor 16 with low == high makes the llama3 scaling a step function (as in Scout);
        # original 64 puts the step inside this head_dim's frequencies
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 16.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 1.0,
            "original_max_position_embeddings": 64,
        },
    },
    # the benchmark shape of the issues: 128 experts, hidden 256, 8 layers
    "bench-maverick": {
        **_COMMON,
        "hidden_size": 256,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "intermediate_size": 256,
        "intermediate_size_mlp": 512,
        "num_local_experts": 128,
        "interleave_moe_layer_step": 2,
        "use_qk_norm": False,
        "rope_scaling": None,
        "attention_chunk_size": 256,
        "floor_scale": 128,
    },
}


# The vision towers (`vision_config` of a Llama4Config): the real tile geometry (336-pixel tiles of
# 14-pixel patches, pixel shuffle 0.5: 144 `<|patch|>` tokens per tile), so preprocessing and the
# prompt expansion are the real ones, at a width a 2-core CPU encodes in milliseconds. transformers
# builds the adapter's fc1 from `intermediate_size`, so that is 4 x hidden_size (as 5632 = 4 x 1408).
_VISION_COMMON: dict[str, Any] = {
    "model_type": "llama4_vision_model",
    "hidden_act": "gelu",
    "num_channels": 3,
    "image_size": 336,
    "patch_size": 14,
    "norm_eps": 1e-5,
    "pixel_shuffle_ratio": 0.5,
    "multi_modal_projector_bias": False,
    "projector_dropout": 0.0,
    "attention_dropout": 0.0,
    "vision_feature_select_strategy": "default",
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
}
TINY_VISION: dict[str, Any] = {
    **_VISION_COMMON,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 128,
    "projector_input_dim": 64,
    "projector_output_dim": 64,
    "vision_output_dim": 64,
}
BENCH_VISION: dict[str, Any] = {
    **_VISION_COMMON,
    "hidden_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "intermediate_size": 512,
    "projector_input_dim": 256,
    "projector_output_dim": 256,
    "vision_output_dim": 256,
}
VISION_PRESETS: dict[str, dict[str, Any]] = {
    "tiny-maverick": TINY_VISION,
    "tiny-scout": TINY_VISION,
    "bench-maverick": BENCH_VISION,
}


def preset_config(name: str) -> dict[str, Any]:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r} (allowed: {', '.join(PRESETS)})")
    return json.loads(json.dumps(PRESETS[name]))


def preset_vision_config(name: str) -> dict[str, Any] | None:
    """The preset's `vision_config`, or None for a text-only preset."""
    preset_config(name)  # the same error for an unknown name
    vision = VISION_PRESETS.get(name)
    return None if vision is None else json.loads(json.dumps(vision))
