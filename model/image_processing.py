"""Images as Llama 4 takes them: decoding, tiling and normalising, and the prompt expansion.

The same result as transformers' `Llama4ImageProcessorFast` and `Llama4Processor`:

1. decode with Pillow (JPEG, PNG, WebP, GIF's first frame); transparency is composited onto
   white, everything else converted to RGB;
2. pick the canvas: among grids of at most `max_patches` square tiles, the smallest upscale
   that fits (or the least downscale when none does), the smaller area on a tie;
3. resize without distortion (bilinear, antialiased, on uint8), never upscaling beyond one
   tile's size, then pad bottom-right with zeros to the canvas;
4. `(x * rescale_factor - mean) / std` in bfloat16, then the canvas is cut into tiles in
   row-major order; with more than one tile the whole image resized to one tile comes last;
5. in the prompt, each `<|image|>` the chat template emitted becomes
   `<|image_start|>` [rows of `<|patch|>` x T per tile, `<|tile_x_separator|>` between the
   tiles of a row, `<|tile_y_separator|>` after each row] `<|image|>` `<|patch|>` x T
   `<|image_end|>` (the bracket only with more than one tile; T = tokens per tile, 144).

Torch does the arithmetic; where transformers computes in float32 (its canvas table is a
tensor), so does this module, so the same canvas and size come out to the last bit.
"""

from __future__ import annotations

import io
import math
import platform
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from model.vision_config import (
    IMAGE,
    IMAGE_END,
    IMAGE_START,
    PATCH,
    TILE_X_SEPARATOR,
    TILE_Y_SEPARATOR,
    ImageProcessingConfig,
    VisionConfig,
)

FORMATS = ("JPEG", "PNG", "WEBP", "GIF")
DEFAULT_MAX_PIXELS = 40_000_000  # decoded width x height; a small file can decode to gigabytes


class ImageError(ValueError):
    """The bytes are not an image this server takes (the message says why)."""


@dataclass(frozen=True)
class ProcessedImage:
    """One image, ready for the encoder.

    pixel_values: bfloat16 [num_tiles, 3, tile, tile] (local tiles row-major, then the global
    tile when there is more than one); aspect_ratio: the canvas in tiles, (rows, cols)."""

    pixel_values: torch.Tensor
    aspect_ratio: tuple[int, int]

    @property
    def num_tiles(self) -> int:
        return self.pixel_values.shape[0]


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """Encoded bytes -> uint8 [3, H, W] RGB, or ImageError naming what is wrong."""
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise ImageError(f"the image has too many pixels ({e})") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise ImageError(f"the data is not an image in a supported format ({', '.join(FORMATS)})") from None
    with image:
        if image.format not in FORMATS:
            raise ImageError(f"image format {image.format} is not supported (allowed: {', '.join(FORMATS)})")
        width, height = image.size
        if width * height > max_pixels:
            raise ImageError(
                f"the image has too many pixels: {width}x{height} = {width * height}, at most {max_pixels}"
            )
        try:
            image.load()  # GIFs open at their first frame
            rgb = _to_rgb(image)
        except (OSError, ValueError, SyntaxError, EOFError) as e:
            raise ImageError(f"the image data is truncated or corrupt ({e})") from None
    return torch.from_numpy(_as_array(rgb)).permute(2, 0, 1).contiguous()


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB as transformers makes it: transparent pixels over a white background."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _as_array(image: Image.Image) -> np.ndarray:
    return np.array(image, dtype=np.uint8)


# -- the canvas ---------------------------------------------------------------------------------


def supported_canvases(max_patches: int, tile: int) -> torch.Tensor:
    """int64 [K, 2] canvases (height, width) in pixels: every grid of at most `max_patches`
    tiles, grouped by aspect ratio in the order transformers lists them (its tie-break)."""
    by_ratio: dict[float, list[tuple[int, int]]] = {}
    for num_tiles in range(max_patches, 0, -1):
        for rows in sorted(d for d in range(1, num_tiles + 1) if num_tiles % d == 0):
            by_ratio.setdefault(rows / (num_tiles // rows), []).append((rows, num_tiles // rows))
    grids = [grid for group in by_ratio.values() for grid in group]
    return torch.tensor(grids, dtype=torch.long) * tile


def best_canvas(height: int, width: int, canvases: torch.Tensor, to_max: bool = False) -> tuple[int, int]:
    """The canvas (height, width) to resize an image onto without distortion: the smallest
    upscale >= 1 (the largest with `to_max`), else the least downscale; ties: smallest area."""
    scales = torch.minimum(canvases[:, 0] / height, canvases[:, 1] / width)  # float32, as transformers
    up = scales[scales >= 1]
    chosen = (up.max() if to_max else up.min()) if len(up) else scales[scales < 1].max()
    candidates = canvases[scales == chosen]
    best = candidates[torch.argmin(candidates[:, 0] * candidates[:, 1])]
    return int(best[0]), int(best[1])


def resized_size(
    height: int, width: int, canvas: tuple[int, int], tile: int, to_max: bool
) -> tuple[int, int]:
    """The size the image is resized to before padding: it fits the canvas with its aspect
    ratio, and (unless `to_max`) grows no side beyond max(its size, one tile).

    The arithmetic follows transformers' types: a bound that comes from the canvas table is a
    float32 tensor quantity there, one that comes from the image is a Python float."""
    bound_h = _bound(height, canvas[0], tile, to_max)
    bound_w = _bound(width, canvas[1], tile, to_max)
    scale_w, scale_h = _ratio(bound_w, width), _ratio(bound_h, height)
    if scale_w < scale_h:
        new_h, new_w = min(math.floor(_times(height, scale_w)), _value(bound_h)), _value(bound_w)
    else:
        new_h, new_w = _value(bound_h), min(math.floor(_times(width, scale_h)), _value(bound_w))
    return max(new_h, 1), max(new_w, 1)


def _bound(size: int, canvas_side: int, tile: int, to_max: bool) -> int | torch.Tensor:
    """min(max(size, tile), canvas side); the canvas side stays a tensor when it is the minimum."""
    if to_max:
        return torch.tensor(canvas_side)
    limit = max(size, tile)
    return torch.tensor(canvas_side) if canvas_side < limit else limit


def _ratio(bound: int | torch.Tensor, size: int) -> float | torch.Tensor:
    return bound / size  # a tensor bound gives float32, an int a Python float


def _times(size: int, scale: float | torch.Tensor) -> float:
    return float(size * scale)


def _value(bound: int | torch.Tensor) -> int:
    return int(bound)


# -- pixels -------------------------------------------------------------------------------------


def resize_bilinear(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """uint8 [C, H, W] -> uint8 [C, height, width], bilinear with antialiasing.

    On CPUs with AVX2/AVX512 (and ARM) torch resizes uint8 natively; elsewhere (and on GPUs) in
    float32, rounded back. Both as torchvision does, so the pixels agree with transformers'."""
    if tuple(image.shape[-2:]) == (height, width):
        return image
    batch = image[None]
    if image.device.type == "cpu" and _native_uint8_resize():
        out = F.interpolate(batch, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
    else:
        out = F.interpolate(
            batch.float(), size=(height, width), mode="bilinear", align_corners=False, antialias=True
        )
        out = out.round_().to(torch.uint8)
    return out[0]


def _native_uint8_resize() -> bool:
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") or platform.machine() in (
        "aarch64",
        "arm64",
    )


def normalize(image: torch.Tensor, cfg: ImageProcessingConfig) -> torch.Tensor:
    """uint8 [..., C, H, W] -> bfloat16 (x * rescale_factor - mean) / std, each step in bfloat16."""
    x = image.to(torch.bfloat16) * cfg.rescale_factor
    mean = torch.tensor(cfg.image_mean, dtype=torch.bfloat16, device=image.device).view(-1, 1, 1)
    std = torch.tensor(cfg.image_std, dtype=torch.bfloat16, device=image.device).view(-1, 1, 1)
    return (x - mean) / std


def split_tiles(canvas: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """[C, rows*t, cols*t] -> [rows*cols, C, t, t], row-major."""
    c, h, w = canvas.shape
    tiles = canvas.view(c, rows, h // rows, cols, w // cols).permute(1, 3, 0, 2, 4)
    return tiles.reshape(rows * cols, c, h // rows, w // cols)


class ImageProcessor:
    """Decoded images -> `ProcessedImage`s, and prompt expansion, for one checkpoint."""

    def __init__(self, cfg: ImageProcessingConfig, tokens_per_tile: int) -> None:
        self.cfg = cfg
        self.tokens_per_tile = tokens_per_tile
        self.canvases = supported_canvases(cfg.max_patches, cfg.tile_size)

    @classmethod
    def for_checkpoint(cls, directory: str | Path) -> ImageProcessor | None:
        """None for a text-only checkpoint (no vision_config)."""
        vision = VisionConfig.from_file(directory)
        if vision is None:
            return None
        return cls(ImageProcessingConfig.for_checkpoint(directory, vision), vision.tokens_per_tile)

    def preprocess(self, image: torch.Tensor) -> ProcessedImage:
        """uint8 [3, H, W] RGB -> pixel values and the canvas's aspect ratio."""
        cfg, tile = self.cfg, self.cfg.tile_size
        height, width = image.shape[-2:]
        canvas = best_canvas(height, width, self.canvases, cfg.resize_to_max_canvas)
        new_h, new_w = resized_size(height, width, canvas, tile, cfg.resize_to_max_canvas)
        resized = resize_bilinear(image, new_h, new_w)
        padded = F.pad(resized, (0, canvas[1] - new_w, 0, canvas[0] - new_h), value=0)
        rows, cols = canvas[0] // tile, canvas[1] // tile
        tiles = split_tiles(normalize(padded, cfg), rows, cols)
        if rows * cols > 1:
            whole = normalize(resize_bilinear(image, tile, tile), cfg)
            tiles = torch.cat([tiles, whole[None]])
        return ProcessedImage(tiles.contiguous(), (rows, cols))

    def decode_and_preprocess(self, data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> ProcessedImage:
        return self.preprocess(decode_image(data, max_pixels))

    def image_prompt(self, aspect_ratio: tuple[int, int]) -> list[int]:
        return image_prompt(aspect_ratio, self.tokens_per_tile)

    def expand(self, prompt: Sequence[int], images: Sequence[ProcessedImage]) -> list[int]:
        return expand_image_placeholders(prompt, [i.aspect_ratio for i in images], self.tokens_per_tile)


def image_prompt(aspect_ratio: tuple[int, int], tokens_per_tile: int) -> list[int]:
    """The token ids one image becomes in the prompt (see the module docstring)."""
    rows, cols = aspect_ratio
    ids = [IMAGE_START]
    if rows * cols > 1:
        for _ in range(rows):
            for col in range(cols):
                ids += [PATCH] * tokens_per_tile
                if col < cols - 1:
                    ids.append(TILE_X_SEPARATOR)
            ids.append(TILE_Y_SEPARATOR)
    return [*ids, IMAGE, *([PATCH] * tokens_per_tile), IMAGE_END]


def expand_image_placeholders(
    prompt: Sequence[int], aspect_ratios: Sequence[tuple[int, int]], tokens_per_tile: int
) -> list[int]:
    """Replace the i-th `<|image|>` of `prompt` by image i's tokens; the counts must agree."""
    count = sum(1 for t in prompt if t == IMAGE)
    if count != len(aspect_ratios):
        raise ValueError(f"the prompt has {count} <|image|> placeholders for {len(aspect_ratios)} images")
    out: list[int] = []
    images = iter(aspect_ratios)
    for t in prompt:
        out += image_prompt(next(images), tokens_per_tile) if t == IMAGE else [t]
    return out
