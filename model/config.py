"""Model configuration: `config.json` (Llama4Config or Llama4TextConfig) into one frozen dataclass.

Only the text decoder is described here; vision fields are ignored. Everything derived
(which layers use RoPE, which are MoE, head_dim) is resolved once, so the math never
re-derives it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_ROPE_THETA = 500000.0


@dataclass(frozen=True)
class RopeScaling:
    """llama3-style frequency scaling (Scout: factor 16, low 1, high 1, original 8192)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int  # routed and shared expert width
    intermediate_size_mlp: int  # dense MLP width
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_local_experts: int
    moe_layers: tuple[int, ...]
    rope_layers: tuple[bool, ...]  # rope_layers[i]: layer i uses RoPE + chunked attention
    rope_theta: float = DEFAULT_ROPE_THETA
    rope_scaling: RopeScaling | None = None
    attention_chunk_size: int | None = 8192
    use_qk_norm: bool = True
    attn_temperature_tuning: bool = True
    floor_scale: int = 8192
    attn_scale: float = 0.1
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 131072
    bos_token_id: int = 200000
    eos_token_ids: tuple[int, ...] = (200001, 200007, 200008)
    torch_dtype: str = "bfloat16"
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def num_kv_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def moe_layer_set(self) -> frozenset[int]:
        return frozenset(self.moe_layers)

    def is_moe(self, layer_idx: int) -> bool:
        return layer_idx in self.moe_layer_set

    def is_chunked(self, layer_idx: int) -> bool:
        """Chunked local attention applies on RoPE layers when a chunk size is set."""
        return self.rope_layers[layer_idx] and self.attention_chunk_size is not None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("extra")
        return d

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.exists():
            raise FileNotFoundError(f"no config.json at {path}")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from e
        return cls.from_dict(raw)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        return _parse_text_config(_text_section(raw))


def _text_section(raw: dict[str, Any]) -> dict[str, Any]:
    if "text_config" in raw:  # Llama4Config (Llama4ForConditionalGeneration)
        text = raw["text_config"]
        if not isinstance(text, dict):
            raise ValueError("config field 'text_config' must be an object")
        return text
    return raw


def _require(text: dict[str, Any], name: str, kind: type = int) -> Any:
    if name not in text:
        raise ValueError(f"config is missing required field {name!r}")
    value = text[name]
    if kind is int and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
        raise ValueError(f"config field {name!r} must be a positive integer, got {value!r}")
    return value


def _parse_rope(text: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    """Read `rope_parameters` (transformers >= 5) or `rope_theta` + `rope_scaling` (older files)."""
    params = text.get("rope_parameters") or {}
    scaling = text.get("rope_scaling") or {}
    theta = float(params.get("rope_theta", text.get("rope_theta", DEFAULT_ROPE_THETA)))
    merged = {**scaling, **params}
    rope_type = merged.get("rope_type", merged.get("type", "default"))
    if rope_type in (None, "default"):
        return theta, None
    if rope_type != "llama3":
        raise ValueError(
            f"config field 'rope_scaling': unsupported rope_type {rope_type!r} (allowed: default, llama3)"
        )
    try:
        return theta, RopeScaling(
            factor=float(merged["factor"]),
            low_freq_factor=float(merged["low_freq_factor"]),
            high_freq_factor=float(merged["high_freq_factor"]),
            original_max_position_embeddings=int(merged["original_max_position_embeddings"]),
        )
    except KeyError as e:
        raise ValueError(f"config field 'rope_scaling' (llama3) is missing {e.args[0]!r}") from e


def _layer_lists(text: dict[str, Any], num_layers: int) -> tuple[tuple[bool, ...], tuple[int, ...]]:
    no_rope = text.get("no_rope_layers") or []
    if not no_rope:  # absent or [] (as in the Hub files) means the default pattern
        interval = int(text.get("no_rope_layer_interval", 4))
        no_rope = [int((i + 1) % interval != 0) for i in range(num_layers)]
    if len(no_rope) != num_layers:
        raise ValueError(f"config field 'no_rope_layers' has {len(no_rope)} entries for {num_layers} layers")
    moe = text.get("moe_layers")
    if moe is None:
        step = int(text.get("interleave_moe_layer_step", 1))
        moe = list(range(step - 1, num_layers, step)) if step > 0 else []
    bad = [i for i in moe if not 0 <= int(i) < num_layers]
    if bad:
        raise ValueError(f"config field 'moe_layers' has layers out of range: {bad}")
    return tuple(bool(x) for x in no_rope), tuple(sorted(int(i) for i in moe))


def _parse_text_config(text: dict[str, Any]) -> ModelConfig:
    model_type = text.get("model_type", "llama4_text")
    if model_type not in ("llama4_text", "llama4"):
        raise ValueError(f"config field 'model_type' is {model_type!r}; expected 'llama4_text'")
    top_k = text.get("num_experts_per_tok", 1)
    if top_k != 1:
        raise ValueError(
            f"config field 'num_experts_per_tok' is {top_k}; only top-1 routing (1) is supported"
        )
    if text.get("attention_bias"):
        raise ValueError("config field 'attention_bias' is true; Llama 4 attention has no bias")
    if text.get("hidden_act", "silu") != "silu":
        raise ValueError(f"config field 'hidden_act' is {text['hidden_act']!r}; only 'silu' is supported")
    if text.get("tie_word_embeddings"):
        raise ValueError("config field 'tie_word_embeddings' is true; Llama 4 has an untied lm_head")
    num_layers = _require(text, "num_hidden_layers")
    hidden = _require(text, "hidden_size")
    heads = _require(text, "num_attention_heads")
    kv_heads = text.get("num_key_value_heads") or heads
    if heads % kv_heads:
        raise ValueError(
            f"num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({kv_heads})"
        )
    head_dim = text.get("head_dim") or hidden // heads
    if head_dim % 2:
        raise ValueError(f"config field 'head_dim' must be even for RoPE, got {head_dim}")
    rope_layers, moe_layers = _layer_lists(text, num_layers)
    theta, scaling = _parse_rope(text)
    chunk = text.get("attention_chunk_size", 8192)
    eos = text.get("eos_token_id", [200001, 200007, 200008])
    return ModelConfig(
        vocab_size=_require(text, "vocab_size"),
        hidden_size=hidden,
        intermediate_size=_require(text, "intermediate_size"),
        intermediate_size_mlp=int(text.get("intermediate_size_mlp", 16384)),
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        num_local_experts=_require(text, "num_local_experts"),
        moe_layers=moe_layers,
        rope_layers=rope_layers,
        rope_theta=theta,
        rope_scaling=scaling,
        attention_chunk_size=int(chunk) if chunk else None,
        use_qk_norm=bool(text.get("use_qk_norm", True)),
        attn_temperature_tuning=bool(text.get("attn_temperature_tuning", True)),
        floor_scale=int(text.get("floor_scale", 8192)),
        attn_scale=float(text.get("attn_scale", 0.1)),
        rms_norm_eps=float(text.get("rms_norm_eps", 1e-5)),
        max_position_embeddings=int(text.get("max_position_embeddings", 131072)),
        bos_token_id=int(text.get("bos_token_id", 200000) or 200000),
        eos_token_ids=tuple(eos) if isinstance(eos, list) else (int(eos),),
        torch_dtype=str(text.get("torch_dtype", text.get("dtype", "bfloat16")) or "bfloat16"),
        extra={k: v for k, v in text.items()},
    )
