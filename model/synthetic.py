"""Random-weight checkpoints in the real Hugging Face Llama 4 layout, made by the project itself,
and the cached embedded default that `llama4-ep serve` makes once and serves.

A preset with a vision tower (`model.presets.VISION_PRESETS`) is written as transformers writes a
Llama4ForConditionalGeneration: `vision_model.*` and `multi_modal_projector.*` beside the
`language_model.*` tensors, a `vision_config` in config.json and a preprocessor_config.json.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from model.config import ModelConfig
from model.presets import DEFAULT_PRESET, preset_config, preset_vision_config
from model.skew import hot_expert_ranking, skew_router
from model.vision_config import IMAGE_END, IMAGE_START, PATCH, ImageProcessingConfig, VisionConfig

# Bumped when made checkpoints change (2: the vision tower). Each version caches under its own
# folder, so code that still makes the older ones keeps finding them.
CACHE_VERSION = 2
VISION_PREFIXES = ("vision_model.", "multi_modal_projector.")


def random_weights(
    cfg: ModelConfig, seed: int, expert_skew: float = 0.0, skew_seed: int = 0
) -> dict[str, torch.Tensor]:
    """Canonical-name tensors (no prefix). Scales keep activations O(1) and logits spread, so
    greedy decoding is not decided by rounding noise. `expert_skew` > 0 rescales router rows so
    expert popularity is roughly Zipf(expert_skew); `skew_seed` picks the hot experts per layer."""
    g = torch.Generator().manual_seed(seed)
    h, d, e, i = cfg.hidden_size, cfg.head_dim, cfg.num_local_experts, cfg.intermediate_size

    def lin(*shape: int, fan_in: int, gain: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * (gain / math.sqrt(fan_in))

    def norm() -> torch.Tensor:
        return 1.0 + 0.1 * torch.randn(h, generator=g)

    w = {
        "embed_tokens.weight": torch.randn(cfg.vocab_size, h, generator=g),
        "norm.weight": norm(),
        "lm_head.weight": lin(cfg.vocab_size, h, fan_in=h, gain=4.0),
    }
    for layer in range(cfg.num_hidden_layers):
        p = f"layers.{layer}."
        w[p + "input_layernorm.weight"] = norm()
        w[p + "post_attention_layernorm.weight"] = norm()
        w[p + "self_attn.q_proj.weight"] = lin(cfg.num_attention_heads * d, h, fan_in=h, gain=2.0)
        w[p + "self_attn.k_proj.weight"] = lin(cfg.num_key_value_heads * d, h, fan_in=h, gain=2.0)
        w[p + "self_attn.v_proj.weight"] = lin(cfg.num_key_value_heads * d, h, fan_in=h)
        w[p + "self_attn.o_proj.weight"] = lin(
            h, cfg.num_attention_heads * d, fan_in=cfg.num_attention_heads * d
        )
        if cfg.is_moe(layer):
            f = p + "feed_forward."
            w[f + "router.weight"] = _router(lin(e, h, fan_in=h, gain=3.0), expert_skew, skew_seed, layer)
            w[f + "experts.gate_up_proj"] = lin(e, h, 2 * i, fan_in=h)
            w[f + "experts.down_proj"] = lin(e, i, h, fan_in=i)
            _mlp(w, f + "shared_expert.", h, i, lin)
        else:
            _mlp(w, p + "feed_forward.", h, cfg.intermediate_size_mlp, lin)
    return w


def random_vision_weights(vcfg: VisionConfig, seed: int) -> dict[str, torch.Tensor]:
    """The vision tower, adapter and projector under their checkpoint names. Its own generator:
    the text weights of a seed are the same with or without a vision tower. Scales keep the
    projected features O(1), like the text embeddings they replace."""
    g = torch.Generator().manual_seed(seed * 7919 + 17)
    hv, patch_dim = vcfg.hidden_size, vcfg.num_channels * vcfg.patch_size**2

    def lin(*shape: int, fan_in: int, gain: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * (gain / math.sqrt(fan_in))

    def small(*shape: int) -> torch.Tensor:
        return 0.1 * torch.randn(*shape, generator=g)

    v = "vision_model."
    w = {
        v + "patch_embedding.linear.weight": lin(hv, patch_dim, fan_in=patch_dim, gain=2.0),
        v + "class_embedding": torch.randn(hv, generator=g),
        v + "positional_embedding_vlm": 0.5 * torch.randn(vcfg.num_patches + 1, hv, generator=g),
    }
    for norm in ("layernorm_pre", "layernorm_post"):
        w[f"{v}{norm}.weight"], w[f"{v}{norm}.bias"] = 1.0 + small(hv), small(hv)
    for layer in range(vcfg.num_hidden_layers):
        p = f"{v}model.layers.{layer}."
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            w[f"{p}self_attn.{proj}.weight"] = lin(hv, hv, fan_in=hv, gain=1.5)
            w[f"{p}self_attn.{proj}.bias"] = small(hv)
        w[p + "mlp.fc1.weight"] = lin(vcfg.intermediate_size, hv, fan_in=hv)
        w[p + "mlp.fc1.bias"] = small(vcfg.intermediate_size)
        w[p + "mlp.fc2.weight"] = lin(hv, vcfg.intermediate_size, fan_in=vcfg.intermediate_size)
        w[p + "mlp.fc2.bias"] = small(hv)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            w[f"{p}{norm}.weight"], w[f"{p}{norm}.bias"] = 1.0 + small(hv), small(hv)
    a = v + "vision_adapter.mlp."
    w[a + "fc1.weight"] = lin(
        vcfg.projector_input_dim, vcfg.adapter_input_dim, fan_in=vcfg.adapter_input_dim, gain=2.0
    )
    w[a + "fc2.weight"] = lin(
        vcfg.projector_output_dim, vcfg.projector_input_dim, fan_in=vcfg.projector_input_dim, gain=2.0
    )
    w["multi_modal_projector.linear_1.weight"] = lin(
        vcfg.text_hidden_size, vcfg.vision_output_dim, fan_in=vcfg.vision_output_dim, gain=0.5
    )
    return w


def _router(router: torch.Tensor, exponent: float, skew_seed: int, layer: int) -> torch.Tensor:
    if exponent == 0:
        return router
    return skew_router(router, exponent, hot_expert_ranking(router.shape[0], skew_seed, layer), seed=layer)


def _mlp(w: dict[str, torch.Tensor], prefix: str, h: int, width: int, lin: Any) -> None:
    w[prefix + "gate_proj.weight"] = lin(width, h, fan_in=h)
    w[prefix + "up_proj.weight"] = lin(width, h, fan_in=h)
    w[prefix + "down_proj.weight"] = lin(h, width, fan_in=width)


def parse_size(text: str) -> int:
    """'200MB', '5GB', '1048576' -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError(f"--max-shard-size {text!r} is not a size (examples: 200MB, 5GB, 1048576)")
    unit = (m.group(2) or "B").upper().replace("I", "")
    size = int(float(m.group(1)) * {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9}[unit])
    if size <= 0:
        raise ValueError(f"--max-shard-size must be positive, got {text!r}")
    return size


def write_checkpoint(
    out: str | Path,
    text_config: dict[str, Any],
    weights: dict[str, torch.Tensor],
    max_shard_bytes: int | None = None,
    dtype: torch.dtype = torch.bfloat16,
    vision_config: dict[str, Any] | None = None,
) -> Path:
    """Write config.json (Llama4Config with text_config, and vision_config when given) and
    safetensors in the Llama4ForConditionalGeneration layout (`language_model.` prefixes; vision
    tensors under their own names), sharded when asked; a vision tower also gets the
    preprocessor_config.json transformers' processor reads."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {_full_name(k): v.to(dtype).contiguous() for k, v in weights.items()}
    dtype_name = str(dtype).removeprefix("torch.")
    config = {
        "architectures": ["Llama4ForConditionalGeneration"],
        "model_type": "llama4",
        "text_config": {**text_config, "torch_dtype": dtype_name},
        "tie_word_embeddings": False,
        "image_token_index": PATCH,
        "boi_token_index": IMAGE_START,
        "eoi_token_index": IMAGE_END,
    }
    if vision_config is not None:
        config["vision_config"] = {**vision_config, "torch_dtype": dtype_name}
        vision = VisionConfig.from_dict(config)
        processing = ImageProcessingConfig(tile_size=vision.image_size)
        (out / "preprocessor_config.json").write_text(json.dumps(processing.to_dict(), indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    shards = _shard(tensors, max_shard_bytes)
    if len(shards) == 1:
        save_file(shards[0], out / "model.safetensors", metadata={"format": "pt"})
        return out
    weight_map, n = {}, len(shards)
    for k, shard in enumerate(shards, start=1):
        name = f"model-{k:05d}-of-{n:05d}.safetensors"
        save_file(shard, out / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return out


def _full_name(name: str) -> str:
    if name.startswith(VISION_PREFIXES):
        return name
    return "language_model.lm_head.weight" if name == "lm_head.weight" else f"language_model.model.{name}"


def _shard(tensors: dict[str, torch.Tensor], max_bytes: int | None) -> list[dict[str, torch.Tensor]]:
    """Greedy in name order; a tensor larger than the limit gets a shard of its own (as HF does)."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if max_bytes is not None and shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    return shards


def make_checkpoint(
    preset: str,
    out: str | Path,
    seed: int = 0,
    max_shard_size: str | None = None,
    expert_skew: float = 0.0,
    skew_seed: int = 0,
    vision: bool = True,
) -> Path:
    """A random-weight checkpoint of a preset; with `vision` (and a preset that has one) the
    vision tower too. The text weights are the same either way."""
    text = preset_config(preset)
    cfg = ModelConfig.from_dict(text)
    weights = random_weights(cfg, seed, expert_skew, skew_seed)
    vision_config = preset_vision_config(preset) if vision else None
    if vision_config is not None:
        vcfg = VisionConfig.from_dict({"text_config": text, "vision_config": vision_config})
        weights.update(random_vision_weights(vcfg, seed))
    shard = parse_size(max_shard_size) if max_shard_size else None
    return write_checkpoint(out, text, weights, shard, vision_config=vision_config)


def cache_dir() -> Path:
    """Where made checkpoints are cached: $LLAMA4_EP_CACHE, else $XDG_CACHE_HOME/llama4-ep."""
    base = os.environ.get("LLAMA4_EP_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "llama4-ep"
    )
    return Path(base)


def cached_checkpoint_name(preset: str, seed: int = 0, expert_skew: float = 0.0, skew_seed: int = 0) -> str:
    """A made checkpoint's directory name: what clients send as `model` when it is served."""
    return f"{preset}-seed{seed}" + (f"-skew{expert_skew:g}-skewseed{skew_seed}" if expert_skew else "")


def cached_checkpoint_path(preset: str, seed: int = 0, expert_skew: float = 0.0, skew_seed: int = 0) -> Path:
    """Where `default_checkpoint` keeps that checkpoint (under the cache version's folder)."""
    name = cached_checkpoint_name(preset, seed, expert_skew, skew_seed)
    return cache_dir() / f"v{CACHE_VERSION}" / name


def default_checkpoint(
    preset: str = DEFAULT_PRESET, seed: int = 0, expert_skew: float = 0.0, skew_seed: int = 0
) -> Path:
    """The embedded default: a tiny random checkpoint, made once and cached. With expert_skew > 0
    the routers are Zipf-skewed (cached under a name that says so)."""
    name = cached_checkpoint_name(preset, seed, expert_skew, skew_seed)
    target = cached_checkpoint_path(preset, seed, expert_skew, skew_seed)
    if (target / "config.json").exists():
        return target
    print(f"making the {name if expert_skew else preset} checkpoint in {target} (once)", file=sys.stderr)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{name}-"))
    try:
        make_checkpoint(preset, tmp, seed=seed, expert_skew=expert_skew, skew_seed=skew_seed)
        tmp.rename(target)  # atomic: a half-written checkpoint is never visible
    except OSError:
        if not (target / "config.json").exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
