"""The step: scheduler -> decoder -> sampler, for one data-parallel rank.

`EngineCore` is one data-parallel rank: its own scheduler, paged KV cache, decoder and sampler.
With `LocalExperts` as its MoE backend it is the whole single-process (colocated) engine
(`engine.llm_engine`); inside an attention worker it runs with the all-to-all dispatcher.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attention.decoder import Llama4Decoder
from attention.paged import ImageRows, KVPool, SeqChunk, build_batch
from attention.vision import VisionEncoder
from engine.detokenizer import IncrementalDetokenizer
from engine.kv_cache import KVCacheManager
from engine.multimodal import RequestImages
from engine.request import FinishReason, Request
from engine.sampling import new_seed, sample
from engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from model.checkpoint import parse_dtype
from model.config import ModelConfig
from model.tokenizer import Tokenizer
from model.vision_config import PATCH


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


class EngineCore:
    """One data-parallel rank: everything but the routed experts, plus a MoE backend."""

    def __init__(
        self,
        cfg: ModelConfig,
        decoder: Llama4Decoder,
        engine_cfg: EngineConfig,
        tokenizer: Tokenizer | None = None,
        vision: VisionEncoder | None = None,
        image_token_id: int = PATCH,
    ) -> None:
        """`vision`: encodes the pixels of requests that bring images rather than features (None:
        such requests are refused)."""
        self.cfg = cfg
        self.decoder = decoder
        self.engine_cfg = engine_cfg
        self.tokenizer = tokenizer
        self.vision = vision
        self.image_token_id = image_token_id
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
        self._seeds: dict[str, int] = {}
        self._stops: dict[str, IncrementalDetokenizer] = {}
        self._requests: dict[str, Request] = {}
        self._images: dict[str, RequestImages] = {}
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
        if request.params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer")
        images = self._place_images(request)
        self.scheduler.add(request)
        if images is not None:
            self._images[request.request_id] = images
        self._requests[request.request_id] = request
        seed = request.params.seed
        self._seeds[request.request_id] = seed if seed is not None else new_seed()
        if request.params.stop:
            detok = IncrementalDetokenizer(self.tokenizer, request.params.stop)
            detok.add(request.output_token_ids)
            self._stops[request.request_id] = detok

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

    def _place_images(self, request: Request) -> RequestImages | None:
        """The request's image features (encoded here when it brings pixels), on the decoder's
        device and dtype, paired with its `<|patch|>` positions."""
        if not request.images and request.image_features is None:
            return None
        features = request.image_features
        if features is None:
            if self.vision is None:
                raise ValueError(
                    f"request {request.request_id!r} has images, but this engine has no vision encoder "
                    "(the checkpoint has no vision tower)"
                )
            features = torch.cat(self.vision.encode_images(request.images))
        if not isinstance(features, torch.Tensor):
            raise ValueError(f"request {request.request_id!r}: image features must be a tensor")
        embed = self.decoder.weights.embed
        features = features.to(embed.device, embed.dtype)
        placed = RequestImages.place(request.prompt_token_ids, features, self.image_token_id)
        request.images, request.image_features = (), features  # the pixels are not needed again
        return placed

    def _image_rows(self, request_id: str, start: int, num_tokens: int) -> ImageRows | None:
        images = self._images.get(request_id)
        return None if images is None else images.rows(start, start + num_tokens)

    def _execute(self, sched: SchedulerOutput) -> dict[str, int]:
        chunks = [
            SeqChunk(
                c.request_id,
                c.token_ids,
                c.start_pos,
                self._image_rows(c.request_id, c.start_pos, len(c.token_ids)),
            )
            for c in sched.chunks
        ]
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
        self._images.pop(request_id, None)


def _output(request: Request, new: tuple[int, ...]) -> RequestOutput:
    return RequestOutput(
        request.request_id,
        new,
        request.is_finished,
        request.finish_reason,
        len(request.prompt_token_ids),
        len(request.output_token_ids),
    )
