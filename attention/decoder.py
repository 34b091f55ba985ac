"""The Llama 4 text decoder, top to bottom, with the routed experts behind a backend.

The attention side owns everything but the routed experts: embeddings, attention, dense MLPs,
routers, shared experts, norms and lm_head. At a MoE layer it gates, hands `score * x` and the
chosen expert to a `MoEBackend` (local slots in the colocated layout, the all-to-all dispatcher
in the disaggregated one), computes the shared expert meanwhile, and adds both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from attention.layers import (
    apply_rope,
    attend,
    attention_mask,
    rms_norm,
    rope_inv_freq,
    rope_rotation,
    swiglu,
    temperature_scale,
)
from attention.paged import AttentionBatch, KVPool
from model.config import ModelConfig
from router.gating import top1_gate


@dataclass(frozen=True)
class MLPWeights:
    """nn.Linear layout: gate/up [I, H], down [H, I]."""

    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor


@dataclass(frozen=True)
class LayerWeights:
    input_norm: torch.Tensor  # [H]
    post_norm: torch.Tensor  # [H]
    q: torch.Tensor  # [Nq*D, H]
    k: torch.Tensor  # [Nkv*D, H]
    v: torch.Tensor  # [Nkv*D, H]
    o: torch.Tensor  # [H, Nq*D]
    mlp: MLPWeights  # dense MLP, or the shared expert on a MoE layer
    router: torch.Tensor | None  # [E, H] on MoE layers


@dataclass(frozen=True)
class NonExpertWeights:
    embed: torch.Tensor  # [V, H]
    norm: torch.Tensor  # [H]
    lm_head: torch.Tensor  # [V, H]
    layers: tuple[LayerWeights, ...]


class PendingExperts(Protocol):
    def wait(self) -> torch.Tensor:
        """Routed expert outputs [T, H] in token order."""
        ...


class MoEBackend(Protocol):
    def dispatch(self, layer_idx: int, routed_in: torch.Tensor, expert_idx: torch.Tensor) -> PendingExperts:
        """Start the routed experts on routed_in [T, H] (already scaled by the gate score), one
        logical expert per row expert_idx [T] (int64). May return before the work is done."""
        ...


class TensorSource(Protocol):
    """Where weights come from: a `CheckpointReader`, or tensors already in memory
    (`model.checkpoint.TensorDict`). Names are canonical (`layers.{i}.self_attn.q_proj.weight`)."""

    config: ModelConfig

    def tensor(
        self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | None = None
    ) -> torch.Tensor: ...


def load_non_expert_weights(
    reader: TensorSource, dtype: torch.dtype, device: torch.device | None = None
) -> NonExpertWeights:
    """Every weight but the routed experts', read straight to `device` (default CPU) in `dtype`."""
    cfg = reader.config
    h, v = cfg.hidden_size, cfg.vocab_size
    layers = tuple(_load_layer(reader, i, dtype, device) for i in range(cfg.num_hidden_layers))
    return NonExpertWeights(
        embed=reader.tensor("embed_tokens.weight", (v, h), dtype, device),
        norm=reader.tensor("norm.weight", (h,), dtype, device),
        lm_head=reader.tensor("lm_head.weight", (v, h), dtype, device),
        layers=layers,
    )


def _load_layer(
    reader: TensorSource, i: int, dtype: torch.dtype, device: torch.device | None
) -> LayerWeights:
    cfg = reader.config
    h, d = cfg.hidden_size, cfg.head_dim
    p = f"layers.{i}."

    def t(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        return reader.tensor(p + name, shape, dtype, device)

    if cfg.is_moe(i):
        width, ff = cfg.intermediate_size, "feed_forward.shared_expert."
        router = t("feed_forward.router.weight", (cfg.num_local_experts, h))
    else:
        width, ff, router = cfg.intermediate_size_mlp, "feed_forward.", None
    mlp = MLPWeights(
        gate=t(ff + "gate_proj.weight", (width, h)),
        up=t(ff + "up_proj.weight", (width, h)),
        down=t(ff + "down_proj.weight", (h, width)),
    )
    return LayerWeights(
        input_norm=t("input_layernorm.weight", (h,)),
        post_norm=t("post_attention_layernorm.weight", (h,)),
        q=t("self_attn.q_proj.weight", (cfg.num_attention_heads * d, h)),
        k=t("self_attn.k_proj.weight", (cfg.num_key_value_heads * d, h)),
        v=t("self_attn.v_proj.weight", (cfg.num_key_value_heads * d, h)),
        o=t("self_attn.o_proj.weight", (h, cfg.num_attention_heads * d)),
        mlp=mlp,
        router=router,
    )


class Llama4Decoder:
    """Runs a batch of sequence chunks through every layer, reading and writing a paged KV pool.

    Everything it computes lives on its weights' device (`device`); the batch and the pool must
    be there too."""

    def __init__(self, cfg: ModelConfig, weights: NonExpertWeights, experts: MoEBackend) -> None:
        self.cfg = cfg
        self.weights = weights
        self.experts = experts
        self.inv_freq = rope_inv_freq(cfg).to(self.device)

    @property
    def device(self) -> torch.device:
        return self.weights.embed.device

    @property
    def dtype(self) -> torch.dtype:
        return self.weights.embed.dtype

    def forward(self, batch: AttentionBatch, kv: KVPool) -> torch.Tensor:
        """Final-normed hidden states [T, H] for batch.token_ids [T]. Image features in the batch
        replace their tokens' embeddings before layer 0 (early fusion)."""
        cfg, w = self.cfg, self.weights
        h = w.embed[batch.token_ids]
        if batch.image_embeds is not None:
            index = batch.image_index.to(h.device)
            h = h.index_copy(0, index, batch.image_embeds.to(h.device, h.dtype))
        rotation = rope_rotation(batch.positions, self.inv_freq)
        q_scale = temperature_scale(batch.positions, cfg) if cfg.attn_temperature_tuning else None
        for layer_idx, lw in enumerate(w.layers):
            x = rms_norm(h, lw.input_norm, cfg.rms_norm_eps)
            h = h + self._attention(layer_idx, lw, x, batch, kv, rotation, q_scale)
            x = rms_norm(h, lw.post_norm, cfg.rms_norm_eps)
            h = h + (self.moe(layer_idx, x) if lw.router is not None else _mlp(x, lw.mlp))
        return rms_norm(h, w.norm, cfg.rms_norm_eps)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, H] -> [N, V] in fp32."""
        return (hidden @ self.weights.lm_head.T).float()

    def _attention(
        self,
        layer_idx: int,
        lw: LayerWeights,
        x: torch.Tensor,
        batch: AttentionBatch,
        kv: KVPool,
        rotation: torch.Tensor,
        q_scale: torch.Tensor | None,
    ) -> torch.Tensor:
        cfg = self.cfg
        t, d = x.shape[0], cfg.head_dim
        q = (x @ lw.q.T).view(t, cfg.num_attention_heads, d)
        k = (x @ lw.k.T).view(t, cfg.num_key_value_heads, d)
        v = (x @ lw.v.T).view(t, cfg.num_key_value_heads, d)
        if cfg.rope_layers[layer_idx]:
            q, k = apply_rope(q, rotation), apply_rope(k, rotation)
            if cfg.use_qk_norm:
                q, k = rms_norm(q, None, cfg.rms_norm_eps), rms_norm(k, None, cfg.rms_norm_eps)
        elif q_scale is not None:
            q = (q * q_scale[:, None, None]).to(q.dtype)
        meta = batch.layers[layer_idx]
        kv.write(meta.slot_mapping, k, v)
        keys, values = kv.gather(meta.key_blocks)
        chunk = cfg.attention_chunk_size if cfg.is_chunked(layer_idx) else None
        mask = attention_mask(batch.q_pos, meta.key_pos, meta.key_valid, chunk)
        q_padded = q[batch.q_index.clamp(min=0)]  # [B, Qmax, Nq, D]
        out = attend(q_padded, keys, values, mask)
        out = out.flatten(0, 1)[batch.q_flat_index]  # back to [T, Nq, D], in token order
        return out.reshape(t, cfg.num_attention_heads * d) @ lw.o.T

    def moe(self, layer_idx: int, x: torch.Tensor) -> torch.Tensor:
        """One MoE layer's feed-forward: x [T, H] (post-attention normed) -> [T, H], the routed
        expert of each token plus the shared expert, without the residual."""
        lw = self.weights.layers[layer_idx]
        expert_idx, score = top1_gate(x, lw.router)
        pending = self.experts.dispatch(layer_idx, x * score[:, None], expert_idx)
        shared = _mlp(x, lw.mlp)  # overlaps the exchange in the disaggregated layout
        return shared + pending.wait()


def _mlp(x: torch.Tensor, w: MLPWeights) -> torch.Tensor:
    return swiglu(x, w.gate, w.up, w.down)
