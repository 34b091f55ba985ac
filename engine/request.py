"""Requests and sampling parameters: the typed objects that travel from the API to the scheduler."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from model.image_processing import ProcessedImage

STOP_TOKEN_IDS_DEFAULT = (200001, 200007, 200008)
MAX_LOGPROBS = 20  # top alternatives per token, as OpenAI allows
GUIDED_KINDS = ("json_schema", "regex", "choice", "lark")


@dataclass(frozen=True)
class Guided:
    """A grammar the output must follow (`engine.guided` compiles it). `spec` is the JSON schema
    as JSON text, the regular expression, a JSON list of the choices, or a Lark grammar."""

    kind: str
    spec: str

    def __post_init__(self) -> None:
        if self.kind not in GUIDED_KINDS:
            raise ValueError(f"guided kind must be one of {', '.join(GUIDED_KINDS)}, got {self.kind!r}")


@dataclass(frozen=True)
class SamplingParams:
    """How one request samples and when it stops. temperature 0 means greedy."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = STOP_TOKEN_IDS_DEFAULT
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0  # stop token ids are masked until this many tokens are out
    presence_penalty: float = 0.0  # OpenAI's: subtracted once from every token already generated
    frequency_penalty: float = 0.0  # OpenAI's: subtracted per occurrence in the output
    repetition_penalty: float = 1.0  # CTRL's, over prompt and output: > 1 discourages repeats
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit)
    logprobs: int | None = None  # None: none; k: the sampled token's plus the top k
    prompt_logprobs: int | None = None  # the same for every prompt token after the first
    guided: Guided | None = None

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not 0.0 <= self.temperature <= 100.0:
            raise ValueError(f"temperature must be in [0, 100], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(
                f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}"
            )
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if not 0.0 < self.repetition_penalty <= 2.0:
            raise ValueError(f"repetition_penalty must be in (0, 2], got {self.repetition_penalty}")
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(self, name)
            if k is not None and not 0 <= k <= MAX_LOGPROBS:
                raise ValueError(f"{name} must be in [0, {MAX_LOGPROBS}], got {k}")
        for token_id, bias in self.logit_bias:
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"logit_bias for token {token_id} must be in [-100, 100], got {bias}")

    @property
    def needs_processing(self) -> bool:
        """Anything that changes the logits before sampling."""
        return bool(
            self.min_tokens
            or self.presence_penalty
            or self.frequency_penalty
            or self.repetition_penalty != 1.0
            or self.logit_bias
            or self.guided
        )


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(enum.StrEnum):
    STOP = "stop"  # a stop token id or stop string
    LENGTH = "length"  # max_tokens reached
    ABORT = "abort"  # cancelled by the client


@dataclass
class Request:
    """One sequence. `all_token_ids` = prompt + generated; the scheduler catches a request up on
    `all_token_ids[num_computed_tokens:]` (prefill, chunked prefill, decode and recompute after
    preemption are all that one rule)."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    arrival_step: int = 0
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    num_preemptions: int = 0
    # Images of the prompt (its `<|image|>` placeholders already expanded): the pixels, encoded by
    # the rank that admits the request, or their features, rows [P, H] for the prompt's P
    # `<|patch|>` tokens (a torch tensor, or a handle such as a Ray object ref that the attention
    # worker resolves before admission). Either one survives re-admission on another rank.
    images: tuple[ProcessedImage, ...] = ()
    image_features: Any = None

    def __post_init__(self) -> None:
        if not self.prompt_token_ids:
            raise ValueError(f"request {self.request_id!r}: prompt must hold at least one token")

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED
