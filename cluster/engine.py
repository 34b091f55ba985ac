"""The engine: scheduler -> decoder -> sampler, one step at a time.

`EngineCore` is one data-parallel rank: its own scheduler, paged KV cache, decoder and sampler.
With `LocalExperts` it is the whole single-process (colocated) engine; inside an attention
worker it runs with the all-to-all dispatcher as its MoE backend. `LLMEngine` is the
single-process front: add requests, step, collect outputs.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from attention.kv_cache import KVCacheManager
from attention.model import Llama4Decoder, MoEBackend, load_non_expert_weights
from attention.paged import KVPool, SeqChunk, build_batch
from cluster.checkpoint import CheckpointReader, parse_dtype
from cluster.config import ModelConfig
from cluster.request import FinishReason, Request, SamplingParams
from cluster.sampling import make_generator, sample
from cluster.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from cluster.tokenizer import IncrementalDetokenizer, Tokenizer


@dataclass(frozen=True)
class EngineConfig:
    num_kv_blocks: int = 4096  # per rank, shared by all layers
    block_size: int = 16
    max_num_seqs: int = 64
    token_budget: int = 512
    dtype: str = "float32"

    def __post_init__(self) -> None:
        for name in ("num_kv_blocks", "block_size", "max_num_seqs", "token_budget"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        parse_dtype(self.dtype)


@dataclass(frozen=True)
class RequestOutput:
    """What one step produced for one request (streamed to the client)."""

    request_id: str
    new_token_ids: tuple[int, ...]
    finished: bool
    finish_reason: FinishReason | None
    num_prompt_tokens: int
    num_output_tokens: int


@dataclass
class _StopStrings:
    detok: IncrementalDetokenizer
    stop: tuple[str, ...]


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
        dtype = parse_dtype(engine_cfg.dtype)
        self.pool = KVPool(
            engine_cfg.num_kv_blocks, engine_cfg.block_size, cfg.num_key_value_heads, cfg.head_dim, dtype
        )
        chunked = [cfg.is_chunked(i) for i in range(cfg.num_hidden_layers)]
        self.kv = KVCacheManager(
            engine_cfg.num_kv_blocks,
            engine_cfg.block_size,
            chunked,
            cfg.attention_chunk_size,
            self.pool.bytes_per_block,
        )
        self.scheduler = Scheduler(SchedulerConfig(engine_cfg.max_num_seqs, engine_cfg.token_budget), self.kv)
        self._generators: dict[str, torch.Generator] = {}
        self._stops: dict[str, _StopStrings] = {}
        self._requests: dict[str, Request] = {}

    def add_request(self, request: Request) -> None:
        limit = self.cfg.max_position_embeddings
        if request.num_tokens + request.params.max_tokens > limit:
            raise ValueError(
                f"request {request.request_id!r}: prompt ({request.num_tokens} tokens) plus max_tokens "
                f"({request.params.max_tokens}) exceeds the context length {limit}"
            )
        self.scheduler.add(request)
        self._requests[request.request_id] = request
        self._generators[request.request_id] = make_generator(request.params.seed)
        if request.params.stop:
            if self.tokenizer is None:
                raise ValueError("stop strings need a tokenizer")
            self._stops[request.request_id] = _StopStrings(
                IncrementalDetokenizer(self.tokenizer), request.params.stop
            )

    def abort(self, request_id: str) -> RequestOutput | None:
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

    def step(self, run_empty: bool = False) -> list[RequestOutput]:
        """Schedule, run the decoder over the scheduled chunks, sample, update. With `run_empty`
        the decoder runs even with no tokens (a lock-step rank must join every exchange)."""
        sched = self.scheduler.schedule()
        if not sched.chunks and not run_empty:
            return []
        sampled = self._execute(sched)
        before = {c.request_id: len(self._requests[c.request_id].output_token_ids) for c in sched.chunks}
        outputs = []
        for request in self.scheduler.update(sched, sampled):
            new = tuple(request.output_token_ids[before.get(request.request_id, 0) :])
            self._check_stop_strings(request, new)
            outputs.append(_output(request, new))
            if request.is_finished:
                self._forget(request.request_id)
        return outputs

    def _execute(self, sched: SchedulerOutput) -> dict[str, int]:
        chunks = [SeqChunk(c.request_id, c.token_ids, c.start_pos) for c in sched.chunks]
        batch = build_batch(
            chunks,
            self.kv.block_table,
            self._key_start,
            self.cfg.num_hidden_layers,
            self.engine_cfg.block_size,
        )
        hidden = self.decoder.forward(batch, self.pool)
        rows = [i for i, c in enumerate(sched.chunks) if c.sample]
        if not rows:
            return {}
        logits = self.decoder.logits(hidden[batch.last_token_index[rows]])
        ids = [sched.chunks[i].request_id for i in rows]
        tokens = sample(logits, [self._requests[r].params for r in ids], [self._generators[r] for r in ids])
        return dict(zip(ids, tokens, strict=True))

    def _key_start(self, layer_idx: int, start_pos: int) -> int:
        if not self.cfg.is_chunked(layer_idx):
            return 0
        chunk = self.cfg.attention_chunk_size
        return (start_pos // chunk) * chunk

    def _check_stop_strings(self, request: Request, new: tuple[int, ...]) -> None:
        stops = self._stops.get(request.request_id)
        if stops is None or request.is_finished or not new:
            return
        stops.detok.add(new)
        if any(s in stops.detok.text for s in stops.stop):
            self.scheduler.finish(request.request_id, FinishReason.STOP)

    def _forget(self, request_id: str) -> None:
        self._generators.pop(request_id, None)
        self._stops.pop(request_id, None)
        self._requests.pop(request_id, None)


def _output(request: Request, new: tuple[int, ...]) -> RequestOutput:
    return RequestOutput(
        request.request_id,
        new,
        request.is_finished,
        request.finish_reason,
        len(request.prompt_token_ids),
        len(request.output_token_ids),
    )


def build_local_core(
    model_dir: str | Path, engine_cfg: EngineConfig | None = None, experts: MoEBackend | None = None
) -> EngineCore:
    """A colocated engine core from a checkpoint directory (experts local unless given)."""
    from experts.slots import LocalExperts

    engine_cfg = engine_cfg or EngineConfig()
    dtype = parse_dtype(engine_cfg.dtype)
    with CheckpointReader(model_dir) as reader:
        weights = load_non_expert_weights(reader, dtype)
        experts = experts or LocalExperts.from_checkpoint(reader, dtype)
        cfg = reader.config
    decoder = Llama4Decoder(cfg, weights, experts)
    return EngineCore(cfg, decoder, engine_cfg, Tokenizer(model_dir))


@dataclass
class Completion:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None


class LLMEngine:
    """Single-process front: submit prompts, step until done."""

    def __init__(self, core: EngineCore) -> None:
        self.core = core
        self._ids = itertools.count()

    @classmethod
    def from_checkpoint(cls, model_dir: str | Path, engine_cfg: EngineConfig | None = None) -> LLMEngine:
        return cls(build_local_core(model_dir, engine_cfg))

    def add(
        self, prompt_token_ids: Sequence[int], params: SamplingParams, request_id: str | None = None
    ) -> str:
        request_id = request_id or f"req-{next(self._ids)}"
        self.core.add_request(Request(request_id, list(prompt_token_ids), params))
        return request_id

    def abort(self, request_id: str) -> None:
        self.core.abort(request_id)

    def step(self) -> list[RequestOutput]:
        return self.core.step()

    @property
    def has_unfinished(self) -> bool:
        return self.core.has_unfinished

    def metrics(self) -> dict:
        return self.core.metrics()

    def generate(
        self, prompts: Iterable[Sequence[int]], params: SamplingParams | Sequence[SamplingParams]
    ) -> list[Completion]:
        """Run a batch of prompts to completion; results in prompt order."""
        prompts = [list(p) for p in prompts]
        per = list(params) if isinstance(params, Sequence) else [params] * len(prompts)
        results = {}
        for p, sp in zip(prompts, per, strict=True):
            rid = self.add(p, sp)
            results[rid] = Completion(rid, p)
        while self.core.has_unfinished:
            for out in self.step():
                c = results[out.request_id]
                c.token_ids.extend(out.new_token_ids)
                c.finish_reason = out.finish_reason
        return list(results.values())
