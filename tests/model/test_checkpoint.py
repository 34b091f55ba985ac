"""Checkpoint reading: both transformers layouts, shards, lazy expert slices, clear errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from model.checkpoint import CheckpointError, CheckpointReader
from model.config import ModelConfig
from model.presets import preset_config
from model.synthetic import random_weights, write_checkpoint


def test_reads_sharded_language_model_layout(tiny_scout):
    assert (tiny_scout / "model.safetensors.index.json").exists()
    with CheckpointReader(tiny_scout) as reader:
        cfg = reader.config
        emb = reader.tensor("embed_tokens.weight", (cfg.vocab_size, cfg.hidden_size), torch.float32)
        head = reader.tensor("lm_head.weight", (cfg.vocab_size, cfg.hidden_size), torch.float32)
    expected = random_weights(cfg, seed=1)
    torch.testing.assert_close(emb, expected["embed_tokens.weight"].to(torch.bfloat16).float())
    torch.testing.assert_close(head, expected["lm_head.weight"].to(torch.bfloat16).float())


def test_expert_slices_read_only_their_bytes(tmp_path):
    text = {**preset_config("tiny-maverick"), "num_hidden_layers": 2, "intermediate_size": 512}
    cfg = ModelConfig.from_dict(text)
    write_checkpoint(tmp_path, text, random_weights(cfg, seed=0), dtype=torch.float32)
    h, i = cfg.hidden_size, cfg.intermediate_size
    with CheckpointReader(tmp_path) as reader:
        before = reader.bytes_read
        w = reader.expert_rows(1, [17, 3], torch.float32)
        read = reader.bytes_read - before
    per_expert = (h * 2 * i + i * h) * 4
    assert read == 2 * per_expert  # 2 of 128 experts: 1/64 of the fused tensors
    full = random_weights(cfg, seed=0)
    torch.testing.assert_close(w.gate_up, full["layers.1.feed_forward.experts.gate_up_proj"][[17, 3]])
    torch.testing.assert_close(w.down, full["layers.1.feed_forward.experts.down_proj"][[17, 3]])


def test_reads_transformers_causal_lm_checkpoint(tmp_path):
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    text = preset_config("tiny-scout")
    text.pop("model_type")
    model = Llama4ForCausalLM(Llama4TextConfig(**text))
    model.save_pretrained(tmp_path, max_shard_size="20MB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    with CheckpointReader(tmp_path) as reader:
        assert reader.config.rope_scaling is not None and reader.config.rope_scaling.factor == 16.0
        q = reader.tensor("layers.2.self_attn.q_proj.weight", (64, 64), torch.float32)
        gu = reader.expert_rows(0, [5], torch.float32).gate_up
    torch.testing.assert_close(q, model.model.layers[2].self_attn.q_proj.weight.detach())
    torch.testing.assert_close(gu[0], model.model.layers[0].feed_forward.experts.gate_up_proj.detach()[5])


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_tensor_is_named(tiny_maverick, tmp_path):
    ckpt = _copy(tiny_maverick, tmp_path / "c")
    from safetensors.torch import load_file

    tensors = load_file(ckpt / "model.safetensors")
    del tensors["language_model.model.layers.3.self_attn.k_proj.weight"]
    save_file(tensors, ckpt / "model.safetensors")
    with CheckpointReader(ckpt) as reader, pytest.raises(CheckpointError, match="layers.3.self_attn.k_proj"):
        reader.tensor("layers.3.self_attn.k_proj.weight", (32, 64), torch.float32)


def test_wrong_shape_is_named(tiny_maverick):
    with (
        CheckpointReader(tiny_maverick) as reader,
        pytest.raises(CheckpointError, match=r"q_proj.*\[64, 64\]"),
    ):
        reader.tensor("layers.0.self_attn.q_proj.weight", (64, 32), torch.float32)


def test_top2_config_is_rejected(tiny_maverick, tmp_path):
    ckpt = _copy(tiny_maverick, tmp_path / "c")
    raw = json.loads((ckpt / "config.json").read_text())
    raw["text_config"]["num_experts_per_tok"] = 2
    (ckpt / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        CheckpointReader(ckpt)


def test_pickle_only_directory_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(preset_config("tiny-maverick")))
    torch.save({"x": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="only safetensors"):
        CheckpointReader(tmp_path)


def test_missing_shard_is_named(tiny_scout, tmp_path):
    ckpt = _copy(tiny_scout, tmp_path / "c")
    (ckpt / "model-00002-of-00004.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00004"):
        CheckpointReader(ckpt)
