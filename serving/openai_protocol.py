"""OpenAI-style request bodies, their validation, and the error body.

Requests are parsed strictly: a field of the wrong JSON type ("max_tokens": "10"), an unknown
field, or a value out of range is a 400 with `{"error": {"message", "type", "param", "code"}}`,
never a silent coercion. The response bodies are plain dicts built by the `*_response` and
`*_chunk` helpers below, in the shapes the `openai` client parses.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, field_validator

from engine.request import SamplingParams
from model.tokenizer import CHAT_ROLES, Tokenizer

M = TypeVar("M", bound=BaseModel)
MAX_STOP_STRINGS = 4
MAX_SEED = 2**63 - 1


class APIError(Exception):
    """An error answered to the client: an HTTP status (and a gRPC code) plus OpenAI's body."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        retry_after_s: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code
        self.retry_after_s = retry_after_s

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def queue_full(message: str) -> APIError:
    return APIError(429, message, type_="server_overloaded", code="queue_full", retry_after_s=1)


def unavailable(message: str) -> APIError:
    return APIError(503, message, type_="server_unavailable", code="engine_unavailable")


_STRICT = ConfigDict(extra="forbid", strict=True)


class StreamOptions(BaseModel):
    model_config = _STRICT
    include_usage: bool = False


class SamplingFields(BaseModel):
    """What both endpoints (and the gRPC request) share: the model and how to sample."""

    model_config = _STRICT

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=-1)  # vLLM's extension; -1 and 0 both disable it
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # vLLM's extension: keep going past the stop token ids
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> str | list[str] | None:
        stops = [v] if isinstance(v, str) else v or []
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}")
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        return v

    @field_validator("n")
    @classmethod
    def _n(cls, v: int) -> int:
        if v != 1:
            raise ValueError(f"only n=1 is supported, got {v}")
        return v

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _penalty(cls, v: float) -> float:
        if v != 0.0:
            raise ValueError(f"penalties are not supported (only 0), got {v}")
        return v

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(SamplingFields):
    prompt: str | list[int]
    echo: bool = False
    logprobs: int | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: str | list[int]) -> str | list[int]:
        if isinstance(v, list) and not v:
            raise ValueError("a list of token ids must hold at least one id")
        return v

    @field_validator("echo")
    @classmethod
    def _echo(cls, v: bool) -> bool:
        if v:
            raise ValueError("echo is not supported")
        return v

    @field_validator("logprobs")
    @classmethod
    def _logprobs(cls, v: int | None) -> int | None:
        if v:
            raise ValueError("logprobs are not supported")
        return v


class TextPart(BaseModel):
    model_config = _STRICT
    type: str
    text: str

    @field_validator("type")
    @classmethod
    def _type(cls, v: str) -> str:
        if v != "text":
            raise ValueError(f"only text content parts are supported, got {v!r}")
        return v


class ImageURL(BaseModel):
    model_config = _STRICT
    url: str = Field(min_length=1)  # data:image/...;base64,..., http(s)://..., or file://...
    detail: Literal["auto", "low", "high"] | None = None  # accepted; Llama 4 always tiles the same way


class ImagePart(BaseModel):
    model_config = _STRICT
    type: Literal["image_url"]
    image_url: ImageURL


# Tags of the unions below; they are left out of the `param` an error names
_TAG = "union:"


def _part_type(part: Any) -> str | None:
    kind = part.get("type") if isinstance(part, dict) else getattr(part, "type", None)
    return f"{_TAG}{kind}" if isinstance(kind, str) else None


ContentPart = Annotated[
    Annotated[TextPart, Tag(f"{_TAG}text")] | Annotated[ImagePart, Tag(f"{_TAG}image_url")],
    Discriminator(
        _part_type,
        custom_error_type="invalid_content_part",
        custom_error_message="a content part's type must be 'text' or 'image_url'",
    ),
]


def _content_kind(content: Any) -> str:
    return f"{_TAG}parts" if isinstance(content, list) else f"{_TAG}text"


class ChatMessage(BaseModel):
    model_config = _STRICT
    role: str
    # a string, or a list of parts; told apart first, so an error names the part that is wrong
    content: Annotated[
        Annotated[str, Tag(f"{_TAG}text")] | Annotated[list[ContentPart], Tag(f"{_TAG}parts")],
        Discriminator(_content_kind),
    ]
    name: str | None = None

    @field_validator("role")
    @classmethod
    def _role(cls, v: str) -> str:
        if v not in CHAT_ROLES:
            raise ValueError(f"role {v!r} is not one of {', '.join(CHAT_ROLES)}")
        return v

    @property
    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content if isinstance(p, TextPart))

    @property
    def has_images(self) -> bool:
        return not isinstance(self.content, str) and any(isinstance(p, ImagePart) for p in self.content)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False

    @field_validator("logprobs")
    @classmethod
    def _logprobs(cls, v: bool) -> bool:
        if v:
            raise ValueError("logprobs are not supported")
        return v


def parse_body(model: type[M], raw: bytes) -> M:
    """Bytes of a JSON body -> a validated request; anything wrong is a 400 saying where."""
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise invalid(f"the request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise invalid(f"the request body must be a JSON object, got {type(data).__name__}")
    return validate(model, data)


def validate(model: type[M], data: dict[str, Any]) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise _from_validation_error(e) from None


def _from_validation_error(e: ValidationError) -> APIError:
    first = e.errors()[0]
    param = ".".join(str(p) for p in first["loc"] if not str(p).startswith(_TAG)) or None
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "missing":
        msg = "this field is required"
    elif first["type"] == "extra_forbidden":
        msg = "unknown field (not supported by this server)"
    return invalid(f"{param}: {msg}" if param else msg, param=param, code=first["type"])


# -- to the engine ----------------------------------------------------------------------


def completion_prompt(req: CompletionRequest, tokenizer: Tokenizer) -> list[int]:
    """A string is tokenized with a leading <|begin_of_text|>; a list of ids is used as given."""
    if isinstance(req.prompt, str):
        return tokenizer.encode(req.prompt)
    return check_token_ids(req.prompt, tokenizer.vocab_size, "prompt")


def chat_prompt(req: ChatCompletionRequest, tokenizer: Tokenizer) -> list[int]:
    messages = [{"role": m.role, "content": m.text} for m in req.messages]
    return tokenizer.apply_chat_template(messages)


def check_token_ids(ids: Sequence[int], vocab_size: int, param: str) -> list[int]:
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        message = f"{param}: token ids {bad[:8]} are outside the vocabulary [0, {vocab_size})"
        raise invalid(message, param=param)
    return list(ids)


def sampling_params(
    req: SamplingFields, num_prompt_tokens: int, context_length: int, max_tokens: int | None
) -> SamplingParams:
    """The engine's parameters; `max_tokens` None means the rest of the context.

    Prompt plus max_tokens beyond the context is a 400 that says the numbers."""
    if num_prompt_tokens >= context_length:
        raise invalid(
            f"This model's maximum context length is {context_length} tokens, and the prompt has "
            f"{num_prompt_tokens} tokens: no room for a completion. Shorten the prompt.",
            param="prompt" if isinstance(req, CompletionRequest) else "messages",
            code="context_length_exceeded",
        )
    if max_tokens is None:
        max_tokens = context_length - num_prompt_tokens
    if num_prompt_tokens + max_tokens > context_length:
        raise invalid(
            f"This model's maximum context length is {context_length} tokens. However, you requested "
            f"{num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in the prompt, {max_tokens} "
            f"for the completion). Reduce the prompt or max_tokens.",
            param="max_tokens",
            code="context_length_exceeded",
        )
    try:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=req.temperature,
            top_p=req.top_p,
            top_k=max(req.top_k, 0),
            seed=req.seed,
            stop=req.stop_strings,
            ignore_eos=req.ignore_eos,
        )
    except ValueError as e:
        raise invalid(str(e)) from None


# -- responses --------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(num_prompt_tokens: int, num_output_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": num_prompt_tokens,
        "completion_tokens": num_output_tokens,
        "total_tokens": num_prompt_tokens + num_output_tokens,
    }


def model_list(model_id: str, created: int) -> dict[str, Any]:
    card = {"id": model_id, "object": "model", "created": created, "owned_by": "llama4-ep"}
    return {"object": "list", "data": [card]}


def completion_response(
    rid: str, model: str, text: str, finish_reason: str | None, use: dict[str, int]
) -> dict[str, Any]:
    choice = {"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}
    return {
        "id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
        "choices": [choice], "usage": use,
    }  # fmt: skip


def completion_chunk(
    rid: str, model: str, text: str, finish_reason: str | None, use: dict[str, int] | None = None
) -> dict[str, Any]:
    choices = [] if use else [{"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}]
    return {
        "id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
        "choices": choices, "usage": use,
    }  # fmt: skip


def chat_response(
    rid: str, model: str, text: str, finish_reason: str | None, use: dict[str, int]
) -> dict[str, Any]:
    message = {"role": "assistant", "content": text}
    return {
        "id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish_reason, "logprobs": None}],
        "usage": use,
    }  # fmt: skip


def chat_chunk(
    rid: str, model: str, delta: dict[str, str], finish_reason: str | None, use: dict[str, int] | None = None
) -> dict[str, Any]:
    choices = [] if use else [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]
    return {
        "id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
        "choices": choices, "usage": use,
    }  # fmt: skip
