"""Reference figures of transformers' Llama4ImageProcessorFast for `test_image_processing.py`.

transformers' Llama 4 image processor needs torchvision, which does not install beside this
project's torch pin. So its results for a fixed set of test images (made below from seeded
numpy noise and gradients, encoded losslessly) are recorded once, in a virtual environment that
has torchvision, as the shape, aspect ratio and SHA-256 of each image's bfloat16 pixel values:

    python -m venv /tmp/tvref && /tmp/tvref/bin/pip install torch==2.14.1 torchvision==0.29.1 \
        transformers==5.23.0 pillow numpy
    PYTHONPATH=. /tmp/tvref/bin/python -m tests.model.processor_golden   # rewrites the JSON

The same run also compares this project's processor with transformers' there, image by image.
"""

from __future__ import annotations

import hashlib
import io
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

GOLDEN = Path(__file__).parent / "data" / "llama4_processor_golden.json"

# (name with the canvas transformers picks, height, width, mode, format): 1 tile, 2x1 and 1x2,
# 4x4 and 16x1 (the maximum of 16 tiles), upscaled and downscaled images, transparency, grey
# and palette images
CASES = (
    ("square-1x1", 336, 336, "RGB", "PNG"),
    ("small-upscaled-1x1", 40, 57, "RGB", "PNG"),
    ("wide-1x2", 300, 650, "RGB", "PNG"),
    ("tall-2x1", 672, 336, "RGB", "WEBP"),
    ("tall-3x2", 700, 340, "RGB", "PNG"),
    ("max-4x4", 1344, 1300, "RGB", "PNG"),
    ("max-strip-16x1", 5376, 336, "RGB", "PNG"),
    ("downscaled-3x5", 1100, 1900, "RGB", "PNG"),
    ("transparent-3x5", 999, 1677, "RGBA", "PNG"),
    ("grey-2x2", 500, 401, "L", "PNG"),
    ("palette-gif-1x2", 257, 515, "P", "GIF"),
)


def make_image_bytes(height: int, width: int, mode: str, fmt: str, seed: int) -> bytes:
    """Seeded noise over smooth gradients, encoded losslessly (the decoded pixels are exact)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.int32)
    base = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 256], -1)
    noise = rng.integers(0, 64, size=(height, width, 3), dtype=np.int32)
    rgb = ((base + noise) % 256).astype(np.uint8)
    image = Image.fromarray(rgb, "RGB")
    if mode == "RGBA":
        alpha = rng.integers(0, 256, size=(height, width), dtype=np.uint8)
        image = Image.fromarray(np.dstack([rgb, alpha]), "RGBA")
    elif mode in ("L", "P"):
        image = image.convert(mode)
    buf = io.BytesIO()
    options = {"WEBP": {"lossless": True, "method": 0}, "PNG": {"compress_level": 1}}.get(fmt, {})
    image.save(buf, format=fmt, **options)
    return buf.getvalue()


def case_bytes() -> list[tuple[str, bytes]]:
    return [
        (name, make_image_bytes(h, w, mode, fmt, seed)) for seed, (name, h, w, mode, fmt) in enumerate(CASES)
    ]


def digest(pixel_values: torch.Tensor) -> str:
    return hashlib.sha256(pixel_values.contiguous().view(torch.int16).numpy().tobytes()).hexdigest()


def main() -> int:
    from transformers import Llama4ImageProcessor  # needs torchvision

    from model.image_processing import ImageProcessor
    from model.vision_config import ImageProcessingConfig

    ours = ImageProcessor(ImageProcessingConfig(), tokens_per_tile=144)
    theirs = Llama4ImageProcessor()
    golden, failed = {}, 0
    for name, data in case_bytes():
        ref = theirs(images=[Image.open(io.BytesIO(data))], return_tensors="pt")
        pixels, ratio = ref["pixel_values"], tuple(int(v) for v in ref["aspect_ratios"][0])
        mine = ours.decode_and_preprocess(data)
        same = mine.pixel_values.shape == pixels.shape and torch.equal(mine.pixel_values, pixels)
        print(f"{name:20s} {tuple(pixels.shape)} {ratio}: {'equal' if same else 'DIFFERENT'}")
        failed += not (same and mine.aspect_ratio == ratio)
        golden[name] = {"shape": list(pixels.shape), "aspect_ratio": list(ratio), "sha256": digest(pixels)}
    cases = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in golden.items())
    GOLDEN.write_text(f'{{"made_with": {json.dumps(_versions())},\n "cases": {{\n{cases}\n}}}}\n')
    print(f"wrote {GOLDEN}; {failed} cases differ from this project's processor")
    return 1 if failed else 0


def _versions() -> dict[str, str]:
    import PIL
    import torchvision
    import transformers

    return {
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "pillow": PIL.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }


if __name__ == "__main__":
    sys.exit(main())
