"""Model shapes for the simulator: the real Llama 4 text configs, and the project's tiny presets.

The simulator needs shapes, not weights, so Maverick and Scout are written out here as the
`text_config` fields of their Hugging Face `config.json` (values from the reference notes,
`llama4.md` section 1.3) and parsed by the same `ModelConfig` the engine uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from model.config import ModelConfig
from model.presets import PRESETS, preset_config

_LLAMA4_TEXT: dict[str, Any] = {
    "model_type": "llama4_text",
    "vocab_size": 202048,
    "hidden_size": 5120,
    "intermediate_size": 8192,
    "intermediate_size_mlp": 16384,
    "num_hidden_layers": 48,
    "num_attention_heads": 40,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "num_experts_per_tok": 1,
    "attention_chunk_size": 8192,
    "no_rope_layers": [],  # the default pattern: NoPE (global) at layers 3, 7, ..., 47
    "rope_theta": 500000.0,
    "torch_dtype": "bfloat16",
}

REAL_MODELS: dict[str, dict[str, Any]] = {
    "maverick": {
        **_LLAMA4_TEXT,
        "num_local_experts": 128,
        "interleave_moe_layer_step": 2,
        "use_qk_norm": False,
        "rope_scaling": None,
        "max_position_embeddings": 1048576,
    },
    "scout": {
        **_LLAMA4_TEXT,
        "num_local_experts": 16,
        "interleave_moe_layer_step": 1,
        "use_qk_norm": True,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 16.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 1.0,
            "original_max_position_embeddings": 8192,
        },
        "max_position_embeddings": 10485760,
    },
}


def model_config(name: str) -> ModelConfig:
    """'maverick', 'scout', or a preset of `model.presets` ('tiny-maverick', ...)."""
    if name in REAL_MODELS:
        return ModelConfig.from_dict(REAL_MODELS[name])
    if name in PRESETS:
        return ModelConfig.from_dict(preset_config(name))
    raise ValueError(f"unknown model {name!r} (allowed: {', '.join([*REAL_MODELS, *PRESETS])})")


@dataclass(frozen=True)
class Shape:
    """Parameter counts of the pieces of one model (counts of weights, not bytes)."""

    hidden: int
    q_dim: int  # num_attention_heads * head_dim
    kv_dim: int  # num_key_value_heads * head_dim
    num_layers: int
    num_experts: int
    moe_layers: tuple[int, ...]
    chunked: tuple[bool, ...]  # per layer: chunked local attention
    chunk_size: int | None
    attn_params: int  # q, k, v, o projections of one layer
    dense_mlp_params: int  # the dense MLP of one non-MoE layer
    expert_params: int  # one routed expert (gate, up, down); the shared expert is the same size
    router_params: int
    head_params: int  # lm_head (the embedding is a gather, not a matmul)

    @classmethod
    def of(cls, cfg: ModelConfig) -> Shape:
        h, q, kv = (
            cfg.hidden_size,
            cfg.num_attention_heads * cfg.head_dim,
            cfg.num_key_value_heads * cfg.head_dim,
        )
        return cls(
            hidden=h,
            q_dim=q,
            kv_dim=kv,
            num_layers=cfg.num_hidden_layers,
            num_experts=cfg.num_local_experts,
            moe_layers=cfg.moe_layers,
            chunked=tuple(cfg.is_chunked(i) for i in range(cfg.num_hidden_layers)),
            chunk_size=cfg.attention_chunk_size,
            attn_params=h * (2 * q + 2 * kv),
            dense_mlp_params=3 * h * cfg.intermediate_size_mlp,
            expert_params=3 * h * cfg.intermediate_size,
            router_params=h * cfg.num_local_experts,
            head_params=h * cfg.vocab_size,
        )

    @property
    def num_dense_layers(self) -> int:
        return self.num_layers - len(self.moe_layers)

    @property
    def non_expert_params(self) -> int:
        """What an attention worker holds: attention, dense MLPs, shared experts, routers,
        embedding and lm_head."""
        moe = len(self.moe_layers)
        return (
            self.num_layers * self.attn_params
            + self.num_dense_layers * self.dense_mlp_params
            + moe * (self.expert_params + self.router_params)
            + 2 * self.head_params
        )

    @property
    def total_params(self) -> int:
        return self.non_expert_params + len(self.moe_layers) * self.num_experts * self.expert_params
