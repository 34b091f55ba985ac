"""The step: scheduler -> decoder -> sampler, for one data-parallel rank.

`EngineCore` is one data-parallel rank: its own scheduler, paged KV cache, decoder and sampler.
With `LocalExperts` as its MoE backend it is the whole single-process (colocated) engine
(`engine.llm_engine`); inside an attention worker it runs with the all-to-all dispatcher.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from attention.decoder import Llama4Decoder
from attention.paged import KVPool, SeqChunk, build_batch, kv_bytes_per_block
from engine.detokenizer import IncrementalDetokenizer
from engine.kv_cache import KVCacheManager
from engine.kv_sizing import KVCapacity, check_kv_cache_memory, peak_blocks, plan_kv_cache
from engine.request import FinishReason, Request
from engine.sampling import new_seed, sample
from engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from model.config import ModelConfig
from model.device import check_device_name, check_dtype_name, free_memory
from model.tokenizer import Tokenizer


@dataclass(frozen=True)
class EngineConfig:
    num_kv_blocks: int = 4096  # per rank, shared by all layers (unless kv_cache_memory is set)
    block_size: int = 16
    max_num_seqs: int = 64
    token_budget: int = 512
    dtype: str = "auto"  # bfloat16 on a GPU, float32 on a CPU
    device: str = "cpu"  # the single-process engine's; cluster workers take ClusterConfig.device
    # per rank: a fraction in (0, 1] of the memory free after the weights, or bytes; sizes the
    # pool instead of num_kv_blocks (engine.kv_sizing)
    kv_cache_memory: float | None = None

    def __post_init__(self) -> None:
        for name in ("num_kv_blocks", "block_size", "max_num_seqs", "token_budget"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        check_dtype_name(self.dtype)
        check_device_name(self.device)
        if self.kv_cache_memory is not None:
            check_kv_cache_memory(self.kv_cache_memory)


@dataclass(frozen=True)
class RequestOutput:
    """What one step produced for one request (streamed to the client)."""

    request_id: str
    new_token_ids: tuple[int, ...]
    finished: bool
    finish_reason: FinishReason | None
    num_prompt_tokens: int
    num_output_tokens: int


class EngineCore:
    """One data-parallel rank: everything but the routed experts, plus a MoE backend."""

    def __init__(
        self,
        cfg: ModelConfig,
        decoder: Llama4Decoder,
        engine_cfg: EngineConfig,
        tokenizer: Tokenizer | None = None,
    ) -> None:
        self.cfg = cfg
        self.decoder = decoder
        self.engine_cfg = engine_cfg
        self.tokenizer = tokenizer
        self.device = decoder.device  # the pool, the batch and sampling live with the weights
        chunked = [cfg.is_chunked(i) for i in range(cfg.num_hidden_layers)]
        self.kv_capacity = _size_kv_cache(cfg, engine_cfg, decoder, chunked)
        print(f"llama4-ep: {self.kv_capacity.describe()}", file=sys.stderr, flush=True)
        self.pool = KVPool(
            self.kv_capacity.num_blocks,
            engine_cfg.block_size,
            cfg.num_key_value_heads,
            cfg.head_dim,
            decoder.dtype,
            self.device,
        )
        self.kv = KVCacheManager(
            self.kv_capacity.num_blocks,
            engine_cfg.block_size,
            chunked,
            cfg.attention_chunk_size,
            self.pool.bytes_per_block,
        )
        self.scheduler = Scheduler(SchedulerConfig(engine_cfg.max_num_seqs, engine_cfg.token_budget), self.kv)
        self._seeds: dict[str, int] = {}
        self._stops: dict[str, IncrementalDetokenizer] = {}
        self._requests: dict[str, Request] = {}
        self._pending: SchedulerOutput | None = None  # a step that ran into an error, to replay
        self._deferred_aborts: list[str] = []

    def add_request(self, request: Request) -> None:
        """Queue a request. One that already has output tokens (re-admitted after its attention
        worker was lost) catches up on prompt and outputs, then continues where it stopped."""
        limit = self.cfg.max_position_embeddings
        if request.num_tokens + request.params.max_tokens > limit:
            raise ValueError(
                f"request {request.request_id!r}: prompt ({request.num_tokens} tokens) plus max_tokens "
                f"({request.params.max_tokens}) exceeds the context length {limit}"
            )
        self._check_kv_room(request)
        if request.params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer")
        self.scheduler.add(request)
        self._requests[request.request_id] = request
        seed = request.params.seed
        self._seeds[request.request_id] = seed if seed is not None else new_seed()
        if request.params.stop:
            detok = IncrementalDetokenizer(self.tokenizer, request.params.stop)
            detok.add(request.output_token_ids)
            self._stops[request.request_id] = detok

    def _check_kv_room(self, request: Request) -> None:
        """Refuse, at once, a request whose KV cannot fit this rank's pool even alone: left in, it
        would end the step loop with KVCacheTooSmallError once it ran."""
        e, cfg = self.engine_cfg, self.cfg
        remaining = request.params.max_tokens - len(request.output_token_ids)
        chunked = [cfg.is_chunked(i) for i in range(cfg.num_hidden_layers)]
        need = peak_blocks(
            request.num_tokens, remaining, e.block_size, chunked, cfg.attention_chunk_size, e.token_budget
        )
        room = self.kv_capacity
        if need > room.num_blocks:
            raise ValueError(
                f"request {request.request_id!r}: prompt ({request.num_tokens} tokens) plus max_tokens "
                f"({request.params.max_tokens}) needs {need} KV blocks, more than this rank's "
                f"{room.num_blocks} (one sequence of up to {room.max_sequence_tokens} tokens); a larger "
                "kv_cache_memory or a smaller request fits"
            )

    def abort(self, request_id: str) -> RequestOutput | None:
        """Finish a request with ABORT. While a step waits to be replayed the abort waits too (the
        replay reads the request's KV blocks)."""
        if self._pending is not None:
            self._deferred_aborts.append(request_id)
            return None
        request = self.scheduler.abort(request_id)
        if request is None:
            return None
        self._forget(request_id)
        return _output(request, ())

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished

    def metrics(self) -> dict:
        """Gauges for /metrics: requests and KV blocks of this rank."""
        usage = self.kv.usage()
        return {
            "num_running": self.scheduler.num_running,
            "num_waiting": self.scheduler.num_waiting,
            "kv_blocks_used": usage.blocks_used,
            "kv_blocks_total": usage.blocks_total,
            "kv_bytes_used": usage.bytes_used,
        }

    @property
    def has_pending_step(self) -> bool:
        """A step was scheduled and its execution failed (a lost peer); `step()` replays it."""
        return self._pending is not None

    def step(self, run_empty: bool = False) -> list[RequestOutput]:
        """Schedule, run the decoder over the scheduled chunks, sample, update. With `run_empty`
        the decoder runs even with no tokens (a lock-step rank must join every exchange).

        A step is atomic: if running it raises (a collective broke), scheduler and KV state stay
        where the schedule left them and the next call runs the same schedule again; its KV
        writes are for the same positions and are rewritten with the same values."""
        sched = self._pending or self.scheduler.schedule()
        if not sched.chunks and not run_empty:
            return []
        self._pending = sched
        sampled = self._execute(sched)
        self._pending = None
        before = {c.request_id: len(self._requests[c.request_id].output_token_ids) for c in sched.chunks}
        outputs = []
        for request in self.scheduler.update(sched, sampled):
            new = tuple(request.output_token_ids[before.get(request.request_id, 0) :])
            self._check_stop_strings(request, new)
            outputs.append(_output(request, new))
            if request.is_finished:
                self._forget(request.request_id)
        for request_id in self._deferred_aborts:
            self.abort(request_id)
        self._deferred_aborts.clear()
        return outputs

    def _execute(self, sched: SchedulerOutput) -> dict[str, int]:
        chunks = [SeqChunk(c.request_id, c.token_ids, c.start_pos) for c in sched.chunks]
        batch = build_batch(
            chunks,
            self.kv.block_table,
            self._key_start,
            self.cfg.num_hidden_layers,
            self.engine_cfg.block_size,
            self.device,
        )
        hidden = self.decoder.forward(batch, self.pool)
        rows = [i for i, c in enumerate(sched.chunks) if c.sample]
        if not rows:
            return {}
        sampled_rows = torch.tensor(rows, dtype=torch.long).to(self.device, non_blocking=True)
        logits = self.decoder.logits(hidden[batch.last_token_index[sampled_rows]])
        ids = [sched.chunks[i].request_id for i in rows]
        requests = [self._requests[r] for r in ids]
        tokens = sample(
            logits,
            [r.params for r in requests],
            [self._seeds[r] for r in ids],
            [len(r.output_token_ids) for r in requests],
        )
        return dict(zip(ids, tokens, strict=True))

    def _key_start(self, layer_idx: int, start_pos: int) -> int:
        if not self.cfg.is_chunked(layer_idx):
            return 0
        chunk = self.cfg.attention_chunk_size
        return (start_pos // chunk) * chunk

    def _check_stop_strings(self, request: Request, new: tuple[int, ...]) -> None:
        detok = self._stops.get(request.request_id)
        if detok is None or request.is_finished or not new:
            return
        detok.add(new)
        if detok.stopped:
            self.scheduler.finish(request.request_id, FinishReason.STOP)

    def _forget(self, request_id: str) -> None:
        self._seeds.pop(request_id, None)
        self._stops.pop(request_id, None)
        self._requests.pop(request_id, None)


def _size_kv_cache(
    cfg: ModelConfig, engine_cfg: EngineConfig, decoder: Llama4Decoder, chunked: list[bool]
) -> KVCapacity:
    """The rank's pool: measured after the weights are on the device (they are: the decoder holds
    them), so a fraction of the free memory is a fraction of what the weights left."""
    return plan_kv_cache(
        engine_cfg.num_kv_blocks,
        engine_cfg.kv_cache_memory,
        engine_cfg.block_size,
        kv_bytes_per_block(engine_cfg.block_size, cfg.num_key_value_heads, cfg.head_dim, decoder.dtype),
        chunked,
        cfg.attention_chunk_size,
        engine_cfg.token_budget,
        cfg.max_position_embeddings,
        lambda: free_memory(decoder.device),
    )


def _output(request: Request, new: tuple[int, ...]) -> RequestOutput:
    return RequestOutput(
        request.request_id,
        new,
        request.is_finished,
        request.finish_reason,
        len(request.prompt_token_ids),
        len(request.output_token_ids),
    )
