"""The Llama 4 vision encoder and multimodal projector: tiles of pixels in, one row per
`<|patch|>` position out, in the text model's width (Llama4VisionModel + Llama4MultiModalProjector).

For N tiles at once (Hv vision width, P patches per tile = 576, T tokens per tile = 144):

1. patches: unfold 14 x 14 (channel-major: c, kh, kw), linear 588 -> Hv (no bias)    [N, P, Hv]
2. the class token appended last, the learned positions added, `layernorm_pre`      [N, P+1, Hv]
3. pre-LN ViT layers: x + o(attn(LN x)), bidirectional, biased q/k/v/o, 2D RoPE on q and k;
   then x + fc2(gelu(fc1(LN x)))
4. `layernorm_post`, the class token dropped                                         [N, P, Hv]
5. pixel shuffle at ratio 0.5: each 2 x 2 block of patches becomes one token         [N, T, 4Hv]
6. the adapter: gelu(fc2(gelu(fc1 x))), no biases                                     [N, T, Pout]
7. the projector `linear_1` to the text width, no bias                                 [N, T, H]

It owns nothing but its weights: the engine runs it in-process (colocated), a vision worker runs
it on its own device (`cluster.vision_worker`). Every tensor lives on the encoder's device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model.checkpoint import CheckpointError, CheckpointReader
from model.image_processing import ProcessedImage
from model.vision_config import VisionConfig

MAX_TILES_PER_BATCH = 32  # bounds one forward's activations (attention: heads x 577^2 floats a tile)


@dataclass(frozen=True)
class Linear:
    weight: torch.Tensor  # [out, in]
    bias: torch.Tensor | None = None  # [out]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


@dataclass(frozen=True)
class LayerNorm:
    weight: torch.Tensor  # [Hv]
    bias: torch.Tensor  # [Hv]
    eps: float

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


@dataclass(frozen=True)
class VisionLayerWeights:
    input_norm: LayerNorm
    q: Linear
    k: Linear
    v: Linear
    o: Linear
    post_norm: LayerNorm
    fc1: Linear  # Hv -> intermediate
    fc2: Linear  # intermediate -> Hv


@dataclass(frozen=True)
class VisionWeights:
    patch_embed: Linear  # [Hv, C*p*p]
    class_embedding: torch.Tensor  # [Hv]
    positions: torch.Tensor  # [P+1, Hv]
    pre_norm: LayerNorm
    post_norm: LayerNorm
    layers: tuple[VisionLayerWeights, ...]
    adapter_fc1: Linear  # [Pin, 4Hv]
    adapter_fc2: Linear  # [Pout, Pin]
    projector: Linear  # [H, Pout]


def load_vision_weights(
    reader: CheckpointReader, dtype: torch.dtype, device: torch.device | str = "cpu"
) -> VisionWeights:
    """The tower, adapter and projector from `vision_model.*` / `multi_modal_projector.*`, shapes
    checked against the vision config."""
    cfg = reader.vision_config
    if cfg is None or not reader.has_vision:
        raise CheckpointError(f"{reader.directory}: the checkpoint has no vision tower")
    hv, inter = cfg.hidden_size, cfg.intermediate_size

    def t(name: str, *shape: int) -> torch.Tensor:
        return reader.tensor(name, shape, dtype).to(device)

    def linear(name: str, out: int, inp: int, bias: bool = True) -> Linear:
        return Linear(t(name + ".weight", out, inp), t(name + ".bias", out) if bias else None)

    def norm(name: str) -> LayerNorm:
        return LayerNorm(t(name + ".weight", hv), t(name + ".bias", hv), cfg.norm_eps)

    v = "vision_model."
    layers = []
    for i in range(cfg.num_hidden_layers):
        p = f"{v}model.layers.{i}."
        a = p + "self_attn."
        layers.append(
            VisionLayerWeights(
                input_norm=norm(p + "input_layernorm"),
                q=linear(a + "q_proj", hv, hv),
                k=linear(a + "k_proj", hv, hv),
                v=linear(a + "v_proj", hv, hv),
                o=linear(a + "o_proj", hv, hv),
                post_norm=norm(p + "post_attention_layernorm"),
                fc1=linear(p + "mlp.fc1", inter, hv),
                fc2=linear(p + "mlp.fc2", hv, inter),
            )
        )
    patch_dim = cfg.num_channels * cfg.patch_size**2
    return VisionWeights(
        patch_embed=linear(v + "patch_embedding.linear", hv, patch_dim, bias=False),
        class_embedding=t(v + "class_embedding", hv),
        positions=t(v + "positional_embedding_vlm", cfg.num_patches + 1, hv),
        pre_norm=norm(v + "layernorm_pre"),
        post_norm=norm(v + "layernorm_post"),
        layers=tuple(layers),
        adapter_fc1=linear(
            v + "vision_adapter.mlp.fc1", cfg.projector_input_dim, cfg.adapter_input_dim, bias=False
        ),
        adapter_fc2=linear(
            v + "vision_adapter.mlp.fc2", cfg.projector_output_dim, cfg.projector_input_dim, bias=False
        ),
        projector=linear(
            "multi_modal_projector.linear_1", cfg.text_hidden_size, cfg.vision_output_dim, bias=False
        ),
    )


def vision_rotation(cfg: VisionConfig, device: torch.device | str = "cpu") -> torch.Tensor:
    """Complex rotations [P+1, D/2] of the 2D RoPE (fp32): patch p at column x = p % side and row
    y = p // side turns its first D/4 pairs by (x+1) * f_k and the other D/4 by (y+1) * f_k, with
    f_k = theta^(-2k / (D/2)); the class token (last) is not turned."""
    side, quarter = cfg.patches_per_side, cfg.head_dim // 4
    freq = 1.0 / cfg.rope_theta ** (
        torch.arange(0, cfg.head_dim // 2, 2)[:quarter].float() / (cfg.head_dim // 2)
    )
    patch = torch.arange(cfg.num_patches)
    x, y = (patch % side + 1).float(), (patch // side + 1).float()
    angles = torch.cat([x[:, None] * freq[None, :], y[:, None] * freq[None, :]], dim=-1)
    angles = torch.cat([angles, torch.zeros(1, 2 * quarter)])  # the class token
    return torch.complex(torch.cos(angles), torch.sin(angles)).to(device)


def _rotate(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Interleaved pairs of x [N, S, heads, D] turned by rotation [S, D/2], in fp32."""
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * rotation[None, :, None, :]).flatten(-2).type_as(x)


def pixel_shuffle(x: torch.Tensor, ratio: float) -> torch.Tensor:
    """[N, P, C] -> [N, P * ratio^2, C / ratio^2]: token (h // 2) * side/2 + (w // 2) gathers the
    2 x 2 block of patches at rows h, columns w (ratio 0.5), channel (h % 2) * 2C + (w % 2) * C + c."""
    n, p, c = x.shape
    side = math.isqrt(p)
    small, wide = int(side * ratio), int(c / ratio)
    x = x.view(n, side, small, wide).permute(0, 2, 1, 3).contiguous()  # columns merged
    x = x.view(n, small, small, int(c / ratio**2)).permute(0, 2, 1, 3).contiguous()  # rows merged
    return x.view(n, small * small, -1)


class VisionEncoder:
    """Tiles -> projected features. `encode` takes pixel values of any dtype and device and
    computes in the weights' dtype on the encoder's device."""

    def __init__(self, cfg: VisionConfig, weights: VisionWeights, device: torch.device | str = "cpu") -> None:
        self.cfg = cfg
        self.weights = weights
        self.device = torch.device(device)
        self.dtype = weights.positions.dtype
        self.rotation = vision_rotation(cfg, self.device)

    @classmethod
    def from_checkpoint(
        cls, reader: CheckpointReader, dtype: torch.dtype, device: torch.device | str = "cpu"
    ) -> VisionEncoder:
        return cls(reader.vision_config, load_vision_weights(reader, dtype, device), device)

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N, C, S, S] tiles -> [N * T, H] rows, tile after tile, T = cfg.tokens_per_tile."""
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != self._tile_shape:
            shape = ", ".join(map(str, self._tile_shape))
            raise ValueError(f"pixel values must be [N, {shape}], got {list(pixel_values.shape)}")
        parts = [
            self._forward(chunk.to(self.device, self.dtype))
            for chunk in pixel_values.split(MAX_TILES_PER_BATCH)
        ]
        out = (
            torch.cat(parts)
            if parts
            else pixel_values.new_zeros(0, self.cfg.tokens_per_tile, self.cfg.text_hidden_size)
        )
        return out.reshape(-1, self.cfg.text_hidden_size)

    def encode_images(self, images: Sequence[ProcessedImage]) -> list[torch.Tensor]:
        """One forward over every tile of every image (a batch across requests); features
        [num_tiles * T, H] per image, in order."""
        if not images:
            return []
        rows = self.encode(torch.cat([im.pixel_values for im in images]))
        return list(rows.split([im.num_tiles * self.cfg.tokens_per_tile for im in images]))

    @property
    def _tile_shape(self) -> tuple[int, int, int]:
        return (self.cfg.num_channels, self.cfg.image_size, self.cfg.image_size)

    def _forward(self, pixels: torch.Tensor) -> torch.Tensor:
        cfg, w = self.cfg, self.weights
        n = pixels.shape[0]
        patches = F.unfold(pixels, kernel_size=cfg.patch_size, stride=cfg.patch_size).transpose(1, 2)
        x = w.patch_embed(patches)  # [N, P, Hv]
        x = torch.cat([x, w.class_embedding.expand(n, 1, -1)], dim=1) + w.positions
        x = w.pre_norm(x)
        for lw in w.layers:
            x = x + self._attention(lw, lw.input_norm(x))
            x = x + lw.fc2(F.gelu(lw.fc1(lw.post_norm(x))))
        x = w.post_norm(x)[:, :-1]
        x = pixel_shuffle(x, cfg.pixel_shuffle_ratio)
        x = F.gelu(w.adapter_fc2(F.gelu(w.adapter_fc1(x))))
        return w.projector(x.reshape(-1, x.shape[-1])).view(n, -1, cfg.text_hidden_size)  # [N, T, H]

    def _attention(self, lw: VisionLayerWeights, x: torch.Tensor) -> torch.Tensor:
        n, s, _ = x.shape
        heads, d = self.cfg.num_attention_heads, self.cfg.head_dim
        q = _rotate(lw.q(x).view(n, s, heads, d), self.rotation)
        k = _rotate(lw.k(x).view(n, s, heads, d), self.rotation)
        v = lw.v(x).view(n, s, heads, d)
        # bidirectional, so no mask; spelled out (not SDPA) to sum in transformers' order: its
        # features then agree to the last bits, which random-weight references amplify
        scores = (q.transpose(1, 2) @ k.permute(0, 2, 3, 1)) * d**-0.5  # [N, heads, S, S]
        out = torch.softmax(scores, dim=-1) @ v.transpose(1, 2)
        return lw.o(out.transpose(1, 2).reshape(n, s, heads * d))
