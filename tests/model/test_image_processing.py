"""Image preprocessing and prompt expansion against transformers' Llama 4 processor.

Pixel values: transformers' Llama4ImageProcessorFast needs torchvision, which does not install
beside this project's torch; its results for the test images of `processor_golden.py` were
recorded there (shape, aspect ratio, SHA-256 of the bfloat16 pixels) and must match bit for bit.
Prompt expansion: transformers' own `Llama4Processor._prompt_split_image`, which runs here.
"""

from __future__ import annotations

import io
import json
import re

import jinja2
import numpy as np
import pytest
from llama_models.llama4.tokenizer import Tokenizer as MetaTokenizer
from PIL import Image
from transformers.models.llama4.processing_llama4 import Llama4Processor, chat_template

from model.image_processing import (
    ImageError,
    ImageProcessor,
    decode_image,
    expand_image_placeholders,
    image_prompt,
)
from model.tokenizer import Tokenizer
from model.vision_config import IMAGE, PATCH, ImageProcessingConfig
from tests.model.processor_golden import GOLDEN, case_bytes, digest

PROCESSOR = ImageProcessor(ImageProcessingConfig(), tokens_per_tile=144)


def test_pixel_values_equal_transformers_bit_for_bit():
    golden = json.loads(GOLDEN.read_text())["cases"]
    cases = case_bytes()
    assert [name for name, _ in cases] == list(golden)
    for name, data in cases:
        image = PROCESSOR.decode_and_preprocess(data)
        expected = golden[name]
        assert list(image.pixel_values.shape) == expected["shape"], name
        assert list(image.aspect_ratio) == expected["aspect_ratio"], name
        assert digest(image.pixel_values) == expected["sha256"], name


def _ids(text: str) -> list[int]:
    """transformers' prompt string (special tokens only) as ids of the real tokenizer."""
    special = MetaTokenizer.get_instance().special_tokens
    pieces = re.findall(r"<\|[a-z_]+\|>", text)
    assert "".join(pieces) == text
    return [special[p] for p in pieces]


@pytest.mark.parametrize("ratio", [(1, 1), (1, 2), (2, 1), (4, 4), (16, 1), (3, 5)])
def test_prompt_expansion_equals_transformers(ratio):
    expected = _ids(Llama4Processor._prompt_split_image(None, ratio, 144))
    assert image_prompt(ratio, 144) == expected
    assert image_prompt(ratio, 144).count(PATCH) == 144 * (ratio[0] * ratio[1] + (ratio != (1, 1)))


def test_placeholders_expand_in_order_and_must_match_the_images():
    prompt = [1, IMAGE, 2, IMAGE, 3]
    out = expand_image_placeholders(prompt, [(1, 1), (1, 2)], 4)
    assert out == [1, *image_prompt((1, 1), 4), 2, *image_prompt((1, 2), 4), 3]
    with pytest.raises(ValueError, match="2 <\\|image\\|> placeholders for 1 images"):
        expand_image_placeholders(prompt, [(1, 1)], 4)


def _encode(array: np.ndarray, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_jpeg_decodes_to_rgb():
    array = np.full((20, 30, 3), 200, dtype=np.uint8)
    image = decode_image(_encode(array, "JPEG"))
    assert image.shape == (3, 20, 30) and abs(int(image.float().mean()) - 200) <= 2


@pytest.mark.parametrize(
    "data, message",
    [
        (b"definitely not an image", "not an image in a supported format"),
        (b"", "not an image"),
        (_encode(np.zeros((8, 8, 3), np.uint8), "BMP"), "format BMP is not supported"),
        (_encode(np.zeros((64, 64, 3), np.uint8), "PNG")[:-40], "truncated or corrupt"),
        (_encode(np.zeros((10, 2000, 3), np.uint8), "PNG"), "too many pixels: 2000x10 = 20000, at most 1"),
    ],
)
def test_bad_images_raise_image_error(data, message):
    with pytest.raises(ImageError, match=message):
        decode_image(data, max_pixels=10_000)


def test_chat_template_with_image_parts_equals_transformers_template():
    """transformers' Llama 4 chat template (rendered with jinja2) tokenized with the special
    tokens read as such, then the processor's expansion: the same ids as ours."""
    messages = [
        {"role": "system", "content": "Describe images."},
        {
            "role": "user",
            "content": [
                {"type": "image"},
                {"type": "text", "text": "What is in this picture, and"},
                {"type": "image"},
                {"type": "text", "text": " this one?"},
            ],
        },
    ]
    text = (
        jinja2.Environment()
        .from_string(chat_template)
        .render(messages=messages, bos_token="<|begin_of_text|>", add_generation_prompt=True)
    )
    for ratio in ((1, 1), (2, 2)):
        text = text.replace(
            "<|image|>", Llama4Processor._prompt_split_image(None, ratio, 144).replace("<|image|>", "\0"), 1
        )
    expected = MetaTokenizer.get_instance().encode(
        text.replace("\0", "<|image|>"), bos=False, eos=False, allowed_special="all"
    )
    ids = Tokenizer().apply_chat_template(messages)
    assert expand_image_placeholders(ids, [(1, 1), (2, 2)], 144) == expected
