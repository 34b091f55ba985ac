"""Continuous-batching scheduler for one data-parallel attention rank.

One rule: each step a request catches up on its uncomputed tokens,
`all_token_ids[num_computed_tokens:]`, under a per-step token budget. Prefill, chunked prefill,
decode and recompute after preemption are all that rule. The engine loop is

    output = scheduler.schedule()
    sampled = run the step (request_id -> token id for chunks with sample=True)
    for request in scheduler.update(output, sampled): stream it
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NoReturn

from engine.kv_cache import KVCacheManager
from engine.request import FinishReason, Request, RequestStatus


class KVCacheTooSmallError(RuntimeError):
    """A request cannot get its next chunk's KV blocks even with every other request preempted."""

    def __init__(self, request_id: str, message: str) -> None:
        super().__init__(message)
        self.request_id = request_id


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64  # running requests (holding KV blocks) at once
    token_budget: int = 512  # tokens computed per step, over all requests

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.token_budget < 1:
            raise ValueError(f"token_budget must be >= 1, got {self.token_budget}")


@dataclass(frozen=True)
class ScheduledChunk:
    request_id: str
    token_ids: tuple[int, ...]  # the tokens computed this step
    start_pos: int  # position of token_ids[0]
    sample: bool  # the chunk reaches the request's last known token: sample the next one


@dataclass(frozen=True)
class SchedulerOutput:
    step_id: int
    chunks: tuple[ScheduledChunk, ...]
    preempted: tuple[str, ...]  # KV freed this step; they recompute from position 0 later

    @property
    def num_tokens(self) -> int:
        return sum(len(chunk.token_ids) for chunk in self.chunks)


class Scheduler:
    """Waiting queue (FIFO, preempted requests at its front) and running list (arrival order).

    Each `schedule()` with chunks must be followed by `update()` before the next `schedule()`.
    """

    def __init__(self, config: SchedulerConfig, kv: KVCacheManager) -> None:
        self.config = config
        self.kv = kv
        self._waiting: deque[Request] = deque()
        self._running: list[Request] = []
        self._requests: dict[str, Request] = {}  # unfinished requests by id
        self._arrival: dict[str, int] = {}  # request id -> arrival order, for preemption
        self._num_arrived = 0
        self._next_step_id = 0
        self._pending_step_id: int | None = None  # scheduled but not yet updated
        self.num_preemptions = 0  # since start, over all requests

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def has_unfinished(self) -> bool:
        return bool(self._requests)

    def add(self, request: Request) -> None:
        if request.request_id in self._requests:
            raise ValueError(f"request {request.request_id!r} is already queued or running")
        if request.status is not RequestStatus.WAITING or request.num_computed_tokens != 0:
            raise ValueError(f"request {request.request_id!r} must be new (WAITING, nothing computed)")
        self._requests[request.request_id] = request
        self._arrival[request.request_id] = self._num_arrived
        self._num_arrived += 1
        self._waiting.append(request)

    def abort(self, request_id: str) -> Request | None:
        """Finish a waiting or running request with ABORT; None when it is unknown or finished."""
        request = self._requests.get(request_id)
        if request is not None:
            self._finish(request, FinishReason.ABORT)
        return request

    def finish(self, request_id: str, reason: FinishReason) -> None:
        """Finish a request from outside (a stop string matched). No-op if already finished."""
        request = self._requests.get(request_id)
        if request is not None:
            self._finish(request, reason)

    def schedule(self) -> SchedulerOutput:
        if self._pending_step_id is not None:
            raise RuntimeError(f"step {self._pending_step_id} was scheduled but never updated")
        budget = self.config.token_budget
        chunks: list[ScheduledChunk] = []
        preempted: list[str] = []
        idx = 0
        while idx < len(self._running) and budget > 0:
            request = self._running[idx]
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            if len(self._running) == 1:  # alone: a shorter chunk may fit where the whole one does not
                num_new = self._fit(request, num_new) or self._raise_too_small(request, num_new)
            if self._try_allocate(request, num_new):
                chunks.append(self._chunk(request, num_new))
                budget -= num_new
                idx += 1
                continue
            victim = self._running[-1]  # the most recently arrived; may be `request` itself
            self._preempt(victim)
            preempted.append(victim.request_id)
        # Admitting right after a preemption would only thrash: the pool just ran dry.
        while not preempted and self._waiting and budget > 0:
            if len(self._running) >= self.config.max_num_seqs:
                break
            request = self._waiting[0]
            num_new = min(request.num_tokens, budget)
            if not self._running:  # alone, as above
                num_new = self._fit(request, num_new) or num_new
            if not self._try_allocate(request, num_new):
                break
            self._waiting.popleft()
            request.status = RequestStatus.RUNNING
            bisect.insort(self._running, request, key=lambda r: self._arrival[r.request_id])
            chunks.append(self._chunk(request, num_new))
            budget -= num_new
        output = SchedulerOutput(self._next_step_id, tuple(chunks), tuple(preempted))
        self._next_step_id += 1
        self._pending_step_id = output.step_id if chunks else None
        return output

    def update(self, output: SchedulerOutput, sampled: Mapping[str, int]) -> list[Request]:
        """Apply a step's results. `sampled` maps request id -> token for chunks with sample=True
        (other entries are ignored). Returns the requests that got a token or finished, in chunk
        order; chunks of requests aborted meanwhile are skipped."""
        if not output.chunks:
            return []
        if output.step_id != self._pending_step_id:
            pending = self._pending_step_id
            raise ValueError(f"update for step {output.step_id}, but the pending step is {pending}")
        self._pending_step_id = None
        changed: list[Request] = []
        for chunk in output.chunks:
            request = self._requests.get(chunk.request_id)
            if request is None or request.status is not RequestStatus.RUNNING:
                continue  # aborted (or aborted and re-added) while the step ran
            request.num_computed_tokens += len(chunk.token_ids)
            if not chunk.sample:
                continue
            if chunk.request_id not in sampled:
                raise ValueError(f"no sampled token for request {chunk.request_id!r} (its chunk samples)")
            token_id = sampled[chunk.request_id]
            request.output_token_ids.append(token_id)
            params = request.params
            if token_id in params.stop_token_ids and not params.ignore_eos:
                self._finish(request, FinishReason.STOP)
            elif len(request.output_token_ids) >= params.max_tokens:
                self._finish(request, FinishReason.LENGTH)
            changed.append(request)
        return changed

    def _fit(self, request: Request, num_new: int) -> int:
        """The longest chunk of at most `num_new` tokens whose blocks the pool can give now (0 if
        not even one token's). Blocks needed grow with the chunk's length, so bisect."""
        start = request.num_computed_tokens

        def fits(n: int) -> bool:
            return self.kv.blocks_needed(request.request_id, start, start + n) <= self.kv.num_free_blocks

        if fits(num_new):
            return num_new
        lo, hi = 0, num_new  # fits(lo) or lo == 0; not fits(hi)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        return lo

    def _try_allocate(self, request: Request, num_new: int) -> bool:
        start = request.num_computed_tokens
        return self.kv.allocate(request.request_id, start, start + num_new)

    def _chunk(self, request: Request, num_new: int) -> ScheduledChunk:
        start = request.num_computed_tokens
        end = start + num_new
        token_ids = tuple(request.all_token_ids[start:end])
        return ScheduledChunk(request.request_id, token_ids, start, sample=end == request.num_tokens)

    def _preempt(self, request: Request) -> None:
        self._running.remove(request)
        self.kv.free(request.request_id)
        request.num_computed_tokens = 0
        request.status = RequestStatus.WAITING
        request.num_preemptions += 1
        self.num_preemptions += 1
        self._waiting.appendleft(request)

    def _finish(self, request: Request, reason: FinishReason) -> None:
        if request.status is RequestStatus.RUNNING:
            self._running.remove(request)
        else:
            self._waiting.remove(request)
        self.kv.free(request.request_id)
        del self._requests[request.request_id]
        del self._arrival[request.request_id]
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason

    def _raise_too_small(self, request: Request, num_new: int) -> NoReturn:
        start = request.num_computed_tokens
        needed = self.kv.blocks_needed(request.request_id, start, start + num_new)
        total = self.kv.usage().blocks_total
        self._finish(request, FinishReason.ABORT)
        raise KVCacheTooSmallError(
            request.request_id,
            f"KV cache too small for request {request.request_id!r}: positions [{start}, "
            f"{start + num_new}) need {needed} blocks with nothing else running, the cache holds "
            f"{total}; raise num_kv_blocks. The request was aborted.",
        )
