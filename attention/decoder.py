"""The Llama 4 text decoder, top to bottom, with the routed experts behind a backend.

The attention side owns everything but the routed experts: embeddings, attention, dense MLPs,
routers, shared experts, norms and lm_head. At a MoE layer it gates, hands `score * x` and the
chosen expert to a `MoEBackend` (local slots in the colocated layout, the all-to-all dispatcher
in the disaggregated one), computes the shared expert meanwhile, and adds both.

Weights are held in the layout the CPU GEMM streams fastest, `x @ w` with w [in, out] row-major
(MKL reads a [K, N] weight faster than the transposed [N, K] of nn.Linear: the lm_head product
[1, 256] x [256, 202048] took 13 ms instead of 24 ms), and the projections that read the same
input side by side: q, k and v as one [H, (Nq + 2 Nkv) D] weight, gate and up as one [H, 2I].
The lm_head goes further on a CPU: oneDNN's prepacked form, faster still for a few rows
(`attention.lm_head`). The values are the checkpoint's; only the layout differs.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from attention.layers import (
    apply_rope,
    attend,
    attention_mask,
    rms_norm,
    rope_inv_freq,
    rope_rotation,
    temperature_scale,
)
from attention.lm_head import LmHead
from attention.paged import AttentionBatch, KVPool
from attention.threads import PARALLEL_MIN_TOKENS, ThreadPolicy, intra_op_threads, thread_policy
from model import host_memory
from model.config import ModelConfig
from router.gating import top1_gate


@dataclass(frozen=True)
class MLPWeights:
    """`x @ w` layout: gate_up [H, 2I] (gate's I columns first), down [I, H]."""

    gate_up: torch.Tensor
    down: torch.Tensor


@dataclass(frozen=True)
class LayerWeights:
    input_norm: torch.Tensor  # [H]
    post_norm: torch.Tensor  # [H]
    qkv: torch.Tensor  # [H, (Nq + 2 Nkv) * D]: the q, k and v projections' columns, in that order
    o: torch.Tensor  # [Nq*D, H]
    mlp: MLPWeights  # dense MLP, or the shared expert on a MoE layer
    router: torch.Tensor | None  # [E, H] on MoE layers (checkpoint layout: a small product)


@dataclass(frozen=True)
class NonExpertWeights:
    embed: torch.Tensor  # [V, H]
    norm: torch.Tensor  # [H]
    lm_head: LmHead
    layers: tuple[LayerWeights, ...]


def _stack_columns(*weights: torch.Tensor) -> torch.Tensor:
    """nn.Linear weights [out_i, in] -> one `x @ w` weight [in, sum(out_i)], contiguous."""
    return torch.cat(weights).t().clone(memory_format=torch.contiguous_format)


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
    """Every weight but the routed experts', read straight to `device` (default CPU) in `dtype`.
    On a CPU they live in 2 MB pages (`model.host_memory`), the layers' side by side."""
    cfg = reader.config
    h, v = cfg.hidden_size, cfg.vocab_size
    layers = _packed(tuple(_load_layer(reader, i, dtype, device) for i in range(cfg.num_hidden_layers)))
    return NonExpertWeights(
        embed=host_memory.in_huge_pages(reader.tensor("embed_tokens.weight", (v, h), dtype, device)),
        norm=reader.tensor("norm.weight", (h,), dtype, device),
        lm_head=LmHead(reader.tensor("lm_head.weight", (v, h), dtype, device)),
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
        gate_up=_stack_columns(t(ff + "gate_proj.weight", (width, h)), t(ff + "up_proj.weight", (width, h))),
        down=_stack_columns(t(ff + "down_proj.weight", (h, width))),
    )
    nq, nkv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    return LayerWeights(
        input_norm=t("input_layernorm.weight", (h,)),
        post_norm=t("post_attention_layernorm.weight", (h,)),
        qkv=_stack_columns(
            t("self_attn.q_proj.weight", (nq, h)),
            t("self_attn.k_proj.weight", (nkv, h)),
            t("self_attn.v_proj.weight", (nkv, h)),
        ),
        o=_stack_columns(t("self_attn.o_proj.weight", (h, nq))),
        mlp=mlp,
        router=router,
    )


def _packed(layers: tuple[LayerWeights, ...]) -> tuple[LayerWeights, ...]:
    """The layers' weights copied into one mapping of 2 MB pages (a few hundred KB each at the
    bench preset, too small for a page of their own)."""
    it = iter(host_memory.pack([t for lw in layers for t in _tensors(lw)]))
    return tuple(_with_tensors(lw, it) for lw in layers)


def _tensors(lw: LayerWeights) -> list[torch.Tensor]:
    """A layer's weights, in the order `_with_tensors` takes them back."""
    head = [lw.input_norm, lw.post_norm, lw.qkv, lw.o, lw.mlp.gate_up, lw.mlp.down]
    return head if lw.router is None else [*head, lw.router]


def _with_tensors(lw: LayerWeights, it: Iterator[torch.Tensor]) -> LayerWeights:
    """`lw` with its weights replaced, in `_tensors`' order, by the next ones from `it`."""
    return LayerWeights(
        input_norm=next(it),
        post_norm=next(it),
        qkv=next(it),
        o=next(it),
        mlp=MLPWeights(gate_up=next(it), down=next(it)),
        router=None if lw.router is None else next(it),
    )


class Llama4Decoder:
    """Runs a batch of sequence chunks through every layer, reading and writing a paged KV pool.

    Everything it computes lives on its weights' device (`device`); the batch and the pool must
    be there too. On a CPU, its layers run on one intra-op thread or on all, as
    `parallel_min_tokens` says: "auto" measures which is faster, N puts steps of fewer than N
    tokens on one (`attention.threads`). The lm_head always runs on all."""

    def __init__(
        self,
        cfg: ModelConfig,
        weights: NonExpertWeights,
        experts: MoEBackend,
        parallel_min_tokens: int | str = PARALLEL_MIN_TOKENS,
    ) -> None:
        self.cfg = cfg
        self.weights = weights
        self.experts = experts
        self.inv_freq = rope_inv_freq(cfg).to(self.device)
        self.parallel_min_tokens = parallel_min_tokens
        self._threads: ThreadPolicy | None = None  # made at the first step, with torch's thread count

    @property
    def device(self) -> torch.device:
        return self.weights.embed.device

    @property
    def dtype(self) -> torch.dtype:
        return self.weights.embed.dtype

    def forward(self, batch: AttentionBatch, kv: KVPool) -> torch.Tensor:
        """Final-normed hidden states [T, H] for batch.token_ids [T]. Image features in the batch
        replace their tokens' embeddings before layer 0 (early fusion)."""
        if self.device.type != "cpu":
            return self._layers(batch, kv)
        num_tokens, policy = batch.token_ids.shape[0], self.thread_policy
        threads = policy.threads(num_tokens)
        start = time.perf_counter()
        with intra_op_threads(threads):
            hidden = self._layers(batch, kv)
        policy.record(num_tokens, threads, time.perf_counter() - start)
        return hidden

    @property
    def thread_policy(self) -> ThreadPolicy:
        if self._threads is None:
            self._threads = thread_policy(self.parallel_min_tokens, torch.get_num_threads())
        return self._threads

    def _layers(self, batch: AttentionBatch, kv: KVPool) -> torch.Tensor:
        cfg, w = self.cfg, self.weights
        h = w.embed[batch.token_ids]
        if batch.image_embeds is not None:
            index = batch.image_index.to(h.device)
            h = h.index_copy(0, index, batch.image_embeds.to(h.device, h.dtype))
        rotation = rope_rotation(batch.positions, self.inv_freq)
        q_scale = temperature_scale(batch.positions, cfg) if cfg.attn_temperature_tuning else None
        masks: dict[tuple, torch.Tensor] = {}  # one per distinct key geometry (and chunking) this step
        for layer_idx, lw in enumerate(w.layers):
            x = rms_norm(h, lw.input_norm, cfg.rms_norm_eps)
            h = h + self._attention(layer_idx, lw, x, batch, kv, rotation, q_scale, masks)
            x = rms_norm(h, lw.post_norm, cfg.rms_norm_eps)
            h = h + (self.moe(layer_idx, x) if lw.router is not None else _mlp(x, lw.mlp))
        return rms_norm(h, w.norm, cfg.rms_norm_eps)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, H] -> [N, V] in fp32."""
        return self.weights.lm_head(hidden)

    def _attention(
        self,
        layer_idx: int,
        lw: LayerWeights,
        x: torch.Tensor,
        batch: AttentionBatch,
        kv: KVPool,
        rotation: torch.Tensor,
        q_scale: torch.Tensor | None,
        masks: dict[tuple, torch.Tensor],
    ) -> torch.Tensor:
        cfg = self.cfg
        t, d = x.shape[0], cfg.head_dim
        nq, nkv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
        qk, v = (x @ lw.qkv).split([nq + nkv, nkv], dim=-1)
        nh, nkvh = cfg.num_attention_heads, cfg.num_key_value_heads
        qk, v = qk.view(t, nh + nkvh, d), v.view(t, nkvh, d)
        if cfg.rope_layers[layer_idx]:
            # the query and key heads together: rope and the weightless qk norm act on each head
            # alone, so one call over both gives what two would, with half the small ops
            qk = apply_rope(qk, rotation)
            if cfg.use_qk_norm:
                qk = rms_norm(qk, None, cfg.rms_norm_eps)
        q, k = qk.split([nh, nkvh], dim=1)
        if not cfg.rope_layers[layer_idx] and q_scale is not None:
            q = (q * q_scale[:, None, None]).to(q.dtype)
        meta = batch.layers[layer_idx]
        kv.write(meta.slot_mapping, k, v)
        keys, values = kv.gather(meta.key_blocks)
        chunk = cfg.attention_chunk_size if cfg.is_chunked(layer_idx) else None
        mask_key = (id(meta.key_pos), id(meta.key_valid), chunk)  # build_batch shares equal geometries
        if mask_key not in masks:
            masks[mask_key] = attention_mask(batch.q_pos, meta.key_pos, meta.key_valid, chunk)
        decode = batch.q_pos.shape == (t, 1)  # one query per sequence: the flat order is already [B]
        q_padded = q[:, None] if decode else q[batch.q_index.clamp(min=0)]  # [B, Qmax, Nq, D]
        # a decode query always sees its own key, just written: no row of its mask is empty
        out = attend(q_padded, keys, values, masks[mask_key], empty_rows=not decode)
        out = out[:, 0] if decode else out.flatten(0, 1)[batch.q_flat_index]  # [T, Nq, D], token order
        return out.reshape(t, nq) @ lw.o

    def moe(self, layer_idx: int, x: torch.Tensor) -> torch.Tensor:
        """One MoE layer's feed-forward: x [T, H] (post-attention normed) -> [T, H], the routed
        expert of each token plus the shared expert, without the residual."""
        lw = self.weights.layers[layer_idx]
        expert_idx, score = top1_gate(x, lw.router)
        pending = self.experts.dispatch(layer_idx, x * score[:, None], expert_idx)
        shared = _mlp(x, lw.mlp)  # overlaps the exchange in the disaggregated layout
        return shared + pending.wait()


def _mlp(x: torch.Tensor, w: MLPWeights) -> torch.Tensor:
    gate, up = (x @ w.gate_up).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ w.down
