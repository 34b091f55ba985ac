"""Load a checkpoint into Hugging Face transformers' Llama4ForCausalLM: the outside referee.

transformers is a test (and benchmark) dependency only; importing this module needs it.
"""

from __future__ import annotations

import json
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
