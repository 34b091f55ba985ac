"""OpenAI-style request bodies, their validation, the error body, and the engine's parameters.

Known fields are parsed strictly: a field of the wrong JSON type ("max_tokens": "10") or a
value out of range is a 400 with `{"error": {"message", "type", "param", "code"}}`, never a
silent coercion. Unknown fields are accepted and ignored, with one warning log line naming them
(what vLLM does, so SDKs that send newer fields work); `strict=True` (`--strict-requests`)
refuses them with a 400 instead. A `null` for a field that has a default means the default.
The response bodies are built in `serving.openai_responses`.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Sequence
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from engine.guided import GrammarError, grammar_text
from engine.request import MAX_LOGPROBS, STOP_TOKEN_IDS_DEFAULT, Guided, SamplingParams
from model.tokenizer import CHAT_ROLES, Tokenizer

log = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)
MAX_STOP_STRINGS = 4
MAX_SEED = 2**63 - 1
MAX_N = 16  # choices per prompt (n, best_of)
MAX_PROMPTS = 64  # prompts in one completions request
ROLES = (*CHAT_ROLES, "developer")  # developer: OpenAI's newer name for system


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
    """503 with Retry-After: the replica is down or being replaced; another try may land on a good one."""
    return APIError(503, message, type_="server_unavailable", code="engine_unavailable", retry_after_s=5)


def unauthorized() -> APIError:
    return APIError(
        401,
        "Incorrect or missing API key: send it as the header `Authorization: Bearer <key>`.",
        type_="authentication_error",
        code="invalid_api_key",
    )


def internal(request_id: str) -> APIError:
    """What a client sees of a failure inside the server: no internals, a reference for the logs."""
    return APIError(
        500,
        f"The server could not complete the request (request id {request_id}); see the server logs.",
        type_="server_error",
        code="internal_error",
    )


class Lenient(BaseModel):
    """Known fields strict, unknown ones kept aside (see `unknown_fields`), null = default."""

    model_config = ConfigDict(extra="allow", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        defaults = {
            name for name, f in cls.model_fields.items() if f.default is not None or f.default_factory
        }
        return {k: v for k, v in data.items() if not (v is None and k in defaults)}


class StreamOptions(Lenient):
    include_usage: bool = False


class JsonSchemaFormat(Lenient):
    name: str = "response"
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(Lenient):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type json_schema needs the json_schema object (name, schema)")
        return self


class SamplingFields(Lenient):
    """What both endpoints (and the gRPC request) share: the model and how to sample."""

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=-1)  # vLLM's extension; -1 and 0 both disable it
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None  # vLLM's: extra stop ids, beyond the model's
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # vLLM's extension: keep going past the stop token ids
    n: int = Field(default=1, ge=1, le=MAX_N)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=2.0)  # vLLM's
    min_tokens: int = Field(default=0, ge=0)  # vLLM's
    logit_bias: dict[str, float] | None = None  # token id (as a string) -> bias in [-100, 100]
    response_format: ResponseFormat | None = None
    guided_json: dict[str, Any] | str | None = None  # vLLM's guided decoding extensions
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None  # a Lark grammar
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

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for key, bias in (v or {}).items():
            if not key.isdigit():
                raise ValueError(f"keys are token ids as strings, got {key!r}")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"the bias of token {key} must be in [-100, 100], got {bias}")
        return v

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


Prompt = str | list[int] | list[str] | list[list[int]]


class CompletionRequest(SamplingFields):
    prompt: Prompt
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    best_of: int | None = Field(default=None, ge=1, le=MAX_N)

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: Prompt) -> Prompt:
        if isinstance(v, list):
            if not v:
                raise ValueError("give at least one prompt (or one token id)")
            if len(v) > MAX_PROMPTS and not isinstance(v[0], int):
                raise ValueError(f"at most {MAX_PROMPTS} prompts in one request, got {len(v)}")
            if any(isinstance(p, list) and not p for p in v):
                raise ValueError("a list of token ids must hold at least one id")
        return v

    @model_validator(mode="after")
    def _best_of(self) -> CompletionRequest:
        if self.best_of is not None and self.best_of < self.n:
            raise ValueError(f"best_of ({self.best_of}) must be >= n ({self.n})")
        if self.best_of is not None and self.best_of > self.n and self.stream:
            raise ValueError("best_of > n cannot be streamed (the best are known only at the end)")
        return self

    @property
    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: a string or a list of token ids."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)


class TextPart(Lenient):
    type: str
    text: str

    @field_validator("type")
    @classmethod
    def _type(cls, v: str) -> str:
        if v != "text":
            raise ValueError(f"only text content parts are supported, got {v!r}")
        return v


class ImageURL(Lenient):
    url: str = Field(min_length=1)  # data:image/...;base64,..., http(s)://..., or file://...
    detail: Literal["auto", "low", "high"] | None = None  # accepted; Llama 4 always tiles the same way


class ImagePart(Lenient):
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


class FunctionCall(Lenient):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(Lenient):
    id: str = ""
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(Lenient):
    role: str
    # a string, or a list of parts; told apart first, so an error names the part that is wrong
    content: (
        Annotated[
            Annotated[str, Tag(f"{_TAG}text")] | Annotated[list[ContentPart], Tag(f"{_TAG}parts")],
            Discriminator(_content_kind),
        ]
        | None
    ) = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant message that called tools
    tool_call_id: str | None = None  # a tool message: the call it answers

    @field_validator("role")
    @classmethod
    def _role(cls, v: str) -> str:
        if v not in ROLES:
            raise ValueError(f"role {v!r} is not one of {', '.join(ROLES)}")
        return v

    @model_validator(mode="after")
    def _content(self) -> ChatMessage:
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(
                "content is required (it may be null only in an assistant message with tool_calls)"
            )
        return self

    @property
    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content if isinstance(p, TextPart))

    @property
    def has_images(self) -> bool:
        return isinstance(self.content, list) and any(isinstance(p, ImagePart) for p in self.content)


class FunctionDef(Lenient):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z_][A-Za-z0-9_-]*$")
    description: str | None = None
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})


class Tool(Lenient):
    type: Literal["function"] = "function"
    function: FunctionDef


class NamedFunction(Lenient):
    name: str


class NamedToolChoice(Lenient):
    type: Literal["function"] = "function"
    function: NamedFunction


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None

    @model_validator(mode="after")
    def _tools(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        choice = self.tool_choice
        if choice not in (None, "none", "auto") and not self.tools:
            raise ValueError("tool_choice names tools, but the request has no tools")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in self.tool_names:
            raise ValueError(f"tool_choice names {choice.function.name!r}, which is not in tools")
        return self

    @property
    def tool_names(self) -> list[str]:
        return [t.function.name for t in self.tools or ()]

    @property
    def tools_active(self) -> bool:
        """Tools are offered to the model (rendered into the prompt, and its output parsed)."""
        return bool(self.tools) and self.tool_choice != "none"


class TokenizeRequest(Lenient):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True  # prompt: a leading <|begin_of_text|>
    add_generation_prompt: bool = True  # messages: end with the assistant header

    @model_validator(mode="after")
    def _one(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        return self


class DetokenizeRequest(Lenient):
    model: str | None = None
    tokens: list[int]


# -- parsing --------------------------------------------------------------------------------


def parse_body(model: type[M], raw: bytes, strict: bool = False) -> M:
    """Bytes of a JSON body -> a validated request; anything wrong is a 400 saying where."""
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise invalid(f"the request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise invalid(f"the request body must be a JSON object, got {type(data).__name__}")
    return validate(model, data, strict)


def validate(model: type[M], data: dict[str, Any], strict: bool = False) -> M:
    try:
        req = model.model_validate(data)
    except ValidationError as e:
        raise _from_validation_error(e) from None
    except RecursionError:
        raise invalid("the request body is nested too deeply") from None
    unknown = unknown_fields(req)
    if unknown and strict:
        raise invalid(
            f"{unknown[0]}: unknown field (not supported by this server)", unknown[0], "extra_forbidden"
        )
    if unknown:
        log.warning("ignoring unknown request fields: %s", ", ".join(unknown))
    return req


def unknown_fields(obj: Any, prefix: str = "") -> list[str]:
    """Dotted paths of the fields this server does not know, in a validated request."""
    found: list[str] = []
    if isinstance(obj, BaseModel):
        found += [f"{prefix}{k}" for k in obj.model_extra or {}]
        for name in type(obj).model_fields:
            found += unknown_fields(getattr(obj, name), f"{prefix}{name}.")
    elif isinstance(obj, list):
        for i, item in enumerate(obj):
            found += unknown_fields(item, f"{prefix}{i}.")
    return found


def _from_validation_error(e: ValidationError) -> APIError:
    first = e.errors()[0]
    param = (
        ".".join(str(p) for p in first["loc"] if not str(p).startswith(("function-after", "tagged", _TAG)))
        or None
    )
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "missing":
        msg = "this field is required"
    return invalid(f"{param}: {msg}" if param else msg, param=param, code=first["type"])


# -- to the engine ----------------------------------------------------------------------


def prompt_ids(prompt: str | list[int], tokenizer: Tokenizer, param: str = "prompt") -> list[int]:
    """A string is tokenized with a leading <|begin_of_text|>; a list of ids is used as given."""
    if isinstance(prompt, str):
        return tokenizer.encode(prompt)
    return check_token_ids(prompt, tokenizer.vocab_size, param)


def completion_prompt(req: CompletionRequest, tokenizer: Tokenizer) -> list[int]:
    """The first (or only) prompt's ids."""
    return prompt_ids(req.prompts[0], tokenizer)


def check_token_ids(ids: Sequence[int], vocab_size: int, param: str) -> list[int]:
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        message = f"{param}: token ids {bad[:8]} are outside the vocabulary [0, {vocab_size})"
        raise invalid(message, param=param)
    return list(ids)


def guided(req: SamplingFields) -> Guided | None:
    """The grammar a request asks for, checked (a malformed schema or regex is a 400)."""
    asked = []
    rf = req.response_format
    if rf is not None and rf.type == "json_object":
        asked.append(("response_format", Guided("json_schema", json.dumps({"type": "object"}))))
    elif rf is not None and rf.type == "json_schema":
        schema = rf.json_schema.schema_ or {"type": "object"}
        asked.append(("response_format", Guided("json_schema", json.dumps(schema))))
    if req.guided_json is not None:
        schema = req.guided_json if isinstance(req.guided_json, str) else json.dumps(req.guided_json)
        asked.append(("guided_json", Guided("json_schema", schema)))
    if req.guided_regex is not None:
        asked.append(("guided_regex", Guided("regex", req.guided_regex)))
    if req.guided_choice is not None:
        asked.append(("guided_choice", Guided("choice", json.dumps(req.guided_choice))))
    if req.guided_grammar is not None:
        asked.append(("guided_grammar", Guided("lark", req.guided_grammar)))
    if len(asked) > 1:
        names = ", ".join(name for name, _ in asked)
        raise invalid(f"ask for one kind of guided output, got {names}", param=asked[1][0])
    if not asked:
        return None
    param, g = asked[0]
    return check_guided(g, param)


def check_guided(g: Guided, param: str) -> Guided:
    try:
        grammar_text(g)
    except GrammarError as e:
        raise invalid(f"{param}: {e}", param=param, code="invalid_grammar") from None
    return g


def sampling_params(
    req: SamplingFields,
    num_prompt_tokens: int,
    context_length: int,
    max_tokens: int | None,
    **extra: Any,
) -> SamplingParams:
    """The engine's parameters; `max_tokens` None means the rest of the context. `extra`:
    SamplingParams fields set by the endpoint (logprobs, prompt_logprobs, guided, seed).

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
    stop_ids = STOP_TOKEN_IDS_DEFAULT + tuple(
        t for t in req.stop_token_ids or () if t not in STOP_TOKEN_IDS_DEFAULT
    )
    fields: dict[str, Any] = {
        "max_tokens": max_tokens,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "top_k": max(req.top_k, 0),
        "seed": req.seed,
        "stop": req.stop_strings,
        "stop_token_ids": stop_ids,
        "ignore_eos": req.ignore_eos,
        "min_tokens": min(req.min_tokens, max_tokens),
        "presence_penalty": req.presence_penalty,
        "frequency_penalty": req.frequency_penalty,
        "repetition_penalty": req.repetition_penalty,
        "logit_bias": tuple((int(k), v) for k, v in (req.logit_bias or {}).items()),
        "guided": guided(req),
    }
    try:
        return SamplingParams(**{**fields, **extra})
    except ValueError as e:
        raise invalid(str(e)) from None


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def choice_seed(seed: int | None, index: int) -> int | None:
    """Choice `index` of a seeded request with n > 1: its own seed, fixed by the request's."""
    return None if seed is None else (seed + index) % (MAX_SEED + 1)
