"""A chat's images, from content parts to the engine: counted, fetched, decoded, tiled, and the
prompt expanded with each image's tokens, exactly as transformers' Llama4Processor does.

Both fronts use it: the HTTP chat route (`image_url` parts) and gRPC (image bytes or URLs in
a message's parts). Bad input is an `APIError` 400 whose `param` names the image.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from model.image_processing import ImageError, ImageProcessor, ProcessedImage
from model.tokenizer import Tokenizer
from serving.media import MediaConfig, MediaFetcher
from serving.openai_protocol import APIError, ChatCompletionRequest, ImagePart, invalid


@dataclass(frozen=True)
class ImageSource:
    """One image of a chat: a URL to fetch, or the bytes themselves; `param` names it in errors."""

    param: str
    url: str | None = None
    data: bytes | None = None


@dataclass(frozen=True)
class ChatInput:
    """Messages for the chat template (image parts as `{"type": "image"}`) and their images."""

    messages: list[dict[str, Any]]
    images: list[ImageSource]


def openai_chat_input(req: ChatCompletionRequest) -> ChatInput:
    """The OpenAI chat request's messages, with `image_url` parts in order."""
    messages, images = [], []
    for i, m in enumerate(req.messages):
        if isinstance(m.content, str):
            messages.append({"role": m.role, "content": m.content})
            continue
        parts = []
        for j, part in enumerate(m.content):
            if isinstance(part, ImagePart):
                images.append(ImageSource(f"messages.{i}.content.{j}.image_url", url=part.image_url.url))
                parts.append({"type": "image"})
            else:
                parts.append({"type": "text", "text": part.text})
        messages.append({"role": m.role, "content": parts})
    return ChatInput(messages, images)


class ImageInputs:
    """What the ingress needs for images: the checkpoint's processor (None: a text-only model),
    the fetcher and the limits."""

    def __init__(self, processor: ImageProcessor | None, cfg: MediaConfig) -> None:
        self.processor = processor
        self.cfg = cfg
        self.fetcher = MediaFetcher(cfg)

    async def chat_prompt(
        self, chat: ChatInput, tokenizer: Tokenizer
    ) -> tuple[list[int], list[ProcessedImage]]:
        """Prompt ids (each `<|image|>` expanded) and the processed images, in prompt order. An
        error's message starts with the image it is about (gRPC carries only the message)."""
        try:
            return await self._chat_prompt(chat, tokenizer)
        except APIError as e:
            if e.param and not e.message.startswith(e.param):
                e.message = f"{e.param}: {e.message}"
            raise

    async def _chat_prompt(
        self, chat: ChatInput, tokenizer: Tokenizer
    ) -> tuple[list[int], list[ProcessedImage]]:
        if not chat.images:
            return _template(tokenizer, chat.messages), []
        self._check(chat)
        fetched = await asyncio.gather(*(self._bytes(src) for src in chat.images), return_exceptions=True)
        for result in fetched:  # the first bad image, in prompt order
            if isinstance(result, BaseException):
                raise result
        images = await asyncio.to_thread(self._process, fetched, chat.images)
        return self.processor.expand(_template(tokenizer, chat.messages), images), images

    def _check(self, chat: ChatInput) -> None:
        first = chat.images[0].param
        if self.processor is None:
            raise invalid("this model does not take images (its checkpoint has no vision tower)", param=first)
        for m, src in zip(_image_roles(chat.messages), chat.images, strict=True):
            if m != "user":
                raise invalid(
                    f"images are taken in user messages only, not in a {m!r} message", param=src.param
                )
        n, limit = len(chat.images), self.cfg.max_images_per_prompt
        if n > limit:
            raise invalid(
                f"{n} images in one request; at most {limit}", param="messages", code="too_many_images"
            )

    async def _bytes(self, src: ImageSource) -> bytes:
        if src.data is not None:
            if len(src.data) > self.cfg.max_image_bytes:
                raise invalid(
                    f"the image is larger than {self.cfg.max_image_bytes} bytes",
                    param=src.param,
                    code="image_too_large",
                )
            return src.data
        return await self.fetcher.fetch(src.url or "", src.param)

    def _process(self, datas: Sequence[bytes], sources: Sequence[ImageSource]) -> list[ProcessedImage]:
        images = []
        for data, src in zip(datas, sources, strict=True):
            try:
                images.append(self.processor.decode_and_preprocess(data, self.cfg.max_image_pixels))
            except ImageError as e:
                raise invalid(str(e), param=src.param, code="invalid_image") from None
        return images


def _image_roles(messages: list[dict[str, Any]]) -> list[str]:
    """The role of each image part's message, in order."""
    return [
        m["role"]
        for m in messages
        if not isinstance(m["content"], str)
        for part in m["content"]
        if part.get("type") == "image"
    ]


def _template(tokenizer: Tokenizer, messages: list[dict[str, Any]]) -> list[int]:
    try:
        return tokenizer.apply_chat_template(messages)
    except ValueError as e:
        raise invalid(str(e), param="messages") from None
