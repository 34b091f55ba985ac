"""Load a checkpoint into Hugging Face transformers' Llama4ForCausalLM (text) or
Llama4ForConditionalGeneration (vision tower too): the outside referee.

transformers is a test (and benchmark) dependency only; importing this module needs it.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file


def load_hf_causal_lm(model_dir: str | Path, dtype: torch.dtype = torch.float32, attn: str = "eager"):
    """Llama4ForCausalLM with the checkpoint's text weights (either tensor layout), in eval mode."""
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    model_dir = Path(model_dir)
    raw = json.loads((model_dir / "config.json").read_text())
    text = dict(raw.get("text_config", raw))
    for key in ("model_type", "architectures", "transformers_version", "torch_dtype", "dtype"):
        text.pop(key, None)
    cfg = Llama4TextConfig(**text)
    cfg._attn_implementation = attn
    model = Llama4ForCausalLM(cfg)
    state = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        state.update(load_file(f))
    state = {
        k.removeprefix("language_model."): v.to(dtype)
        for k, v in state.items()
        if not k.startswith(("vision_model.", "multi_modal_projector."))
    }
    model.load_state_dict(state, strict=True)
    return model.to(dtype).eval()


def load_hf_conditional_generation(
    model_dir: str | Path, dtype: torch.dtype = torch.float32, attn: str = "eager"
):
    """Llama4ForConditionalGeneration (vision tower, projector and text model) with every tensor of
    the checkpoint, in eval mode."""
    from transformers import Llama4Config, Llama4ForConditionalGeneration

    model_dir = Path(model_dir)
    raw = json.loads((model_dir / "config.json").read_text())
    sections = {}
    for section in ("text_config", "vision_config"):
        sections[section] = {
            k: v for k, v in raw[section].items() if k not in ("model_type", "torch_dtype", "dtype")
        }
    top = {k: raw[k] for k in ("image_token_index", "boi_token_index", "eoi_token_index") if k in raw}
    cfg = Llama4Config(**sections, **top)
    cfg._attn_implementation = attn
    cfg.text_config._attn_implementation = attn
    cfg.vision_config._attn_implementation = attn
    model = Llama4ForConditionalGeneration(cfg)
    state = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        state.update(load_file(f))
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True)
    rope = model.vision_model.rotary_embedding
    freqs = rope.freqs_ci  # complex: Module.to(dtype) would drop its imaginary part
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model.to(dtype)
    rope.freqs_ci = freqs
    return model.eval()
