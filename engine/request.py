"""Requests and sampling parameters: the typed objects that travel from the API to the scheduler."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from model.image_processing import ProcessedImage

STOP_TOKEN_IDS_DEFAULT = (200001, 200007, 200008)


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

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not 0.0 <= self.temperature <= 100.0:
            raise ValueError(f"temperature must be in [0, 100], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")


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
