"""The vision half of a Llama 4 checkpoint's configuration: the encoder (`vision_config` in
config.json), the multimodal token ids, and the image preprocessing (`preprocessor_config.json`).

A text-only checkpoint (no `vision_config`) has none of these: `VisionConfig.from_file` returns
None. Everything derived (head_dim, patches per tile, tokens per tile) is resolved and checked
once here, so the encoder and the preprocessing never re-derive it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

IMAGE_START = 200080  # <|image_start|>
IMAGE_END = 200081  # <|image_end|>
TILE_X_SEPARATOR = 200084  # <|tile_x_separator|>
TILE_Y_SEPARATOR = 200085  # <|tile_y_separator|>
IMAGE = 200090  # <|image|>: what the chat template emits per image, before expansion
PATCH = 200092  # <|patch|>: the positions that receive image features (Llama4Config.image_token_index)


@dataclass(frozen=True)
class VisionConfig:
    """Llama4VisionConfig plus what the merge needs (the text width and the patch token id)."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    projector_input_dim: int
    projector_output_dim: int
    vision_output_dim: int
    text_hidden_size: int
    image_size: int = 336
    patch_size: int = 14
    num_channels: int = 3
    norm_eps: float = 1e-5
    pixel_shuffle_ratio: float = 0.5
    rope_theta: float = 10000.0
    image_token_id: int = PATCH

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(
                f"vision_config: image_size {self.image_size} is not a multiple of "
                f"patch_size {self.patch_size}"
            )
        if self.head_dim * self.num_attention_heads != self.hidden_size or self.head_dim % 4:
            raise ValueError(
                f"vision_config: hidden_size {self.hidden_size} / num_attention_heads "
                f"{self.num_attention_heads} must be a whole head_dim divisible by 4 (2D RoPE)"
            )
        side = self.patches_per_side * self.pixel_shuffle_ratio
        if side != int(side) or self.shuffle_factor != round(self.shuffle_factor):
            raise ValueError(
                f"vision_config: pixel_shuffle_ratio {self.pixel_shuffle_ratio} does not divide "
                f"{self.patches_per_side} patches per side"
            )
        if self.projector_output_dim != self.vision_output_dim:
            raise ValueError(
                f"vision_config: projector_output_dim {self.projector_output_dim} must equal "
                f"vision_output_dim {self.vision_output_dim} (the projector reads the adapter's output)"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        """Patches per tile, without the class token (24 x 24 = 576 for the real models)."""
        return self.patches_per_side**2

    @property
    def shuffle_factor(self) -> int:
        """Patches merged into one token by the pixel shuffle (4 at ratio 0.5)."""
        return int(round(1 / self.pixel_shuffle_ratio**2))

    @property
    def tokens_per_tile(self) -> int:
        """`<|patch|>` tokens (feature rows) per tile: 576 / 4 = 144 for the real models."""
        return self.num_patches // self.shuffle_factor

    @property
    def adapter_input_dim(self) -> int:
        """Channels after the pixel shuffle: hidden_size * 4 at ratio 0.5."""
        return self.hidden_size * self.shuffle_factor

    @classmethod
    def from_file(cls, path: str | Path) -> VisionConfig | None:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        return cls.from_dict(json.loads(path.read_text()))

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> VisionConfig | None:
        vision = raw.get("vision_config")
        if vision is None:
            return None
        if not isinstance(vision, dict):
            raise ValueError("config field 'vision_config' must be an object")
        text = raw.get("text_config") or {}
        layer = vision.get("vision_feature_layer", -1)
        if layer != -1:
            raise ValueError(f"vision_config: vision_feature_layer {layer} is not supported (only -1)")
        params = vision.get("rope_parameters") or {}
        return cls(
            hidden_size=_positive(vision, "hidden_size"),
            num_hidden_layers=_positive(vision, "num_hidden_layers"),
            num_attention_heads=_positive(vision, "num_attention_heads"),
            intermediate_size=_positive(vision, "intermediate_size"),
            projector_input_dim=_positive(vision, "projector_input_dim"),
            projector_output_dim=_positive(vision, "projector_output_dim"),
            vision_output_dim=_positive(vision, "vision_output_dim"),
            text_hidden_size=_positive(text, "hidden_size", "text_config"),
            image_size=_positive(vision, "image_size"),
            patch_size=_positive(vision, "patch_size"),
            num_channels=int(vision.get("num_channels", 3)),
            norm_eps=float(vision.get("norm_eps", 1e-5)),
            pixel_shuffle_ratio=float(vision.get("pixel_shuffle_ratio", 0.5)),
            rope_theta=float(params.get("rope_theta", vision.get("rope_theta", 10000.0))),
            image_token_id=int(raw.get("image_token_index", PATCH)),
        )


def _positive(section: dict[str, Any], name: str, where: str = "vision_config") -> int:
    value = section.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"config field '{where}.{name}' must be a positive integer, got {value!r}")
    return value


@dataclass(frozen=True)
class ImageProcessingConfig:
    """Llama4ImageProcessorFast's settings: square tiles of `tile_size`, at most `max_patches`
    tiles per image (a global tile comes on top), bilinear resizing, then
    `(x * rescale_factor - mean) / std` in bfloat16."""

    tile_size: int = 336
    max_patches: int = 16
    resize_to_max_canvas: bool = False
    rescale_factor: float = 1 / 255
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def __post_init__(self) -> None:
        if self.tile_size < 1 or self.max_patches < 1:
            raise ValueError(
                f"preprocessor_config: tile size {self.tile_size} and max_patches {self.max_patches} "
                "must be >= 1"
            )

    @classmethod
    def for_checkpoint(cls, directory: str | Path, vision: VisionConfig) -> ImageProcessingConfig:
        """From `preprocessor_config.json` when the checkpoint has one; else the processor's
        defaults with the encoder's tile size."""
        path = Path(directory) / "preprocessor_config.json"
        if not path.exists():
            return cls(tile_size=vision.image_size)
        raw = json.loads(path.read_text())
        size = raw.get("size") or {}
        tile = int(size.get("height", vision.image_size))
        if int(size.get("width", tile)) != tile or tile != vision.image_size:
            raise ValueError(
                f"{path}: tiles must be square and match vision_config.image_size {vision.image_size}, "
                f"got size {size}"
            )
        return cls(
            tile_size=tile,
            max_patches=int(raw.get("max_patches", 16)),
            resize_to_max_canvas=bool(raw.get("resize_to_max_canvas", False)),
            rescale_factor=float(raw.get("rescale_factor", 1 / 255)),
            image_mean=tuple(raw.get("image_mean", (0.5, 0.5, 0.5))),
            image_std=tuple(raw.get("image_std", (0.5, 0.5, 0.5))),
        )

    def to_dict(self) -> dict[str, Any]:
        """The `preprocessor_config.json` that transformers' processor reads."""
        return {
            "image_processor_type": "Llama4ImageProcessorFast",
            "processor_class": "Llama4Processor",
            "size": {"height": self.tile_size, "width": self.tile_size},
            "max_patches": self.max_patches,
            "resize_to_max_canvas": self.resize_to_max_canvas,
            "resample": 2,  # bilinear
            "do_resize": True,
            "do_rescale": True,
            "rescale_factor": self.rescale_factor,
            "do_normalize": True,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
            "do_convert_rgb": True,
        }
