"""The step: scheduler -> decoder -> sampler, for one data-parallel rank.

`EngineCore` is one data-parallel rank: its own scheduler, paged KV cache, decoder and sampler.
With `LocalExperts` as its MoE backend it is the whole single-process (colocated) engine
(`engine.llm_engine`); inside an attention worker it runs with the all-to-all dispatcher.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field

import torch

from attention.decoder import Llama4Decoder
from attention.paged import ImageRows, KVPool, SeqChunk, build_batch, kv_bytes_per_block
from attention.threads import PARALLEL_MIN_TOKENS, check_parallel_min_tokens
from attention.vision import VisionEncoder
from engine.detokenizer import IncrementalDetokenizer
from engine.guided import GuidedDecoding
from engine.kv_cache import KVCacheManager
from engine.kv_sizing import KVCapacity, check_kv_cache_memory, plan_kv_cache
from engine.logits import ROWS_PER_SLICE, TokenLogprob, process, token_logprobs
from engine.multimodal import RequestImages
from engine.request import FinishReason, Request
from engine.sampling import new_seed, sample
from engine.scheduler import KVCacheTooSmallError, Scheduler, SchedulerConfig, SchedulerOutput
from model.config import ModelConfig
from model.device import check_device_name, check_dtype_name, free_memory
from model.tokenizer import Tokenizer
from model.vision_config import PATCH

log = logging.getLogger(__name__)


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
    # on a CPU, whether a step's layer stack runs on one intra-op thread or on all
    # (attention.threads): "auto" measures which is faster per size of step; N puts steps of at
    # least N tokens on all, smaller ones on one (1: all steps on all threads)
    parallel_min_tokens: int | str = PARALLEL_MIN_TOKENS

    def __post_init__(self) -> None:
        for name in ("num_kv_blocks", "block_size", "max_num_seqs", "token_budget"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        check_parallel_min_tokens(self.parallel_min_tokens)
        check_dtype_name(self.dtype)
        check_device_name(self.device)
        if self.kv_cache_memory is not None:
            check_kv_cache_memory(self.kv_cache_memory)


def check_fits(
    cfg: ModelConfig,
    engine_cfg: EngineConfig,
    num_prompt_tokens: int,
    max_tokens: int,
    num_blocks: int | None = None,
) -> None:
    """Raise ValueError, with the numbers, for a request that can never finish on one rank: past
    the context length, or needing more KV blocks than the rank's pool (`num_blocks`, default
    `engine_cfg.num_kv_blocks`) holds even alone (where the scheduler shortens chunks to what
    fits, so one token per step is the least it needs)."""
    limit = cfg.max_position_embeddings
    if num_prompt_tokens + max_tokens > limit:
        raise ValueError(
            f"prompt ({num_prompt_tokens} tokens) plus max_tokens ({max_tokens}) exceeds the context "
            f"length {limit}"
        )
    chunked = [cfg.is_chunked(i) for i in range(cfg.num_hidden_layers)]
    kv = KVCacheManager(1, engine_cfg.block_size, chunked, cfg.attention_chunk_size)
    needed = kv.max_blocks_alone(num_prompt_tokens + max_tokens - 1, token_budget=1)
    num_blocks = engine_cfg.num_kv_blocks if num_blocks is None else num_blocks
    if needed > num_blocks:
        raise ValueError(
            f"prompt ({num_prompt_tokens} tokens) plus max_tokens ({max_tokens}) needs up to {needed} KV "
            f"blocks of {engine_cfg.block_size} tokens ({cfg.num_hidden_layers} layers), but an attention "
            f"worker's KV cache holds {num_blocks}; shorten the prompt or max_tokens (or give the KV "
            "cache more memory)"
        )


@dataclass(frozen=True)
class RequestOutput:
    """What one step produced for one request (streamed to the client)."""

    request_id: str
    new_token_ids: tuple[int, ...]
    finished: bool
    finish_reason: FinishReason | None
    num_prompt_tokens: int
    num_output_tokens: int
    logprobs: tuple[TokenLogprob, ...] = ()  # one per new token, when the request asked for them
    # prompt positions reported this step (the first prompt token's entry is None)
    prompt_logprobs: tuple[TokenLogprob | None, ...] = ()

    def then(self, later: RequestOutput) -> RequestOutput:
        """This output and the same request's next one as one (streaming several steps at once)."""
        return RequestOutput(
            self.request_id,
            self.new_token_ids + later.new_token_ids,
            later.finished,
            later.finish_reason,
            later.num_prompt_tokens,
            later.num_output_tokens,
            self.logprobs + later.logprobs,
            self.prompt_logprobs + later.prompt_logprobs,
        )


@dataclass
class StepSamples:
    """What `_execute` produced: the sampled tokens, and the logprobs asked for."""

    tokens: dict[str, int] = field(default_factory=dict)
    logprobs: dict[str, TokenLogprob] = field(default_factory=dict)
    prompt_logprobs: dict[str, tuple[list[TokenLogprob | None], int]] = field(default_factory=dict)


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
        self._prompt_lp_next: dict[str, int] = {}  # next prompt index whose logprob is due
        self._guided: GuidedDecoding | None = None  # made for the first guided request
        self._images: dict[str, RequestImages] = {}
        self._pending: SchedulerOutput | None = None  # a step that ran into an error, to replay
        self._deferred_aborts: list[str] = []

    def add_request(self, request: Request) -> None:
        """Queue a request. One that already has output tokens (re-admitted after its attention
        worker was lost) catches up on prompt and outputs, then continues where it stopped."""
        check_fits(
            self.cfg,
            self.engine_cfg,
            len(request.prompt_token_ids),
            request.params.max_tokens,
            self.kv_capacity.num_blocks,
        )
        if (request.params.stop or request.params.guided) and self.tokenizer is None:
            raise ValueError("stop strings and guided decoding need a tokenizer")
        images = self._place_images(request)
        if request.params.guided is not None:
            self._guided = self._guided or GuidedDecoding(self.tokenizer, self.cfg.vocab_size)
            self._guided.add(request.request_id, request.params.guided, request.output_token_ids)
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
        """Gauges for /metrics: requests and KV blocks of this rank, and the layers' thread count
        per size of step (`parallel_min_tokens` auto: what it measured and chose)."""
        usage = self.kv.usage()
        return {
            "num_running": self.scheduler.num_running,
            "num_waiting": self.scheduler.num_waiting,
            "kv_blocks_used": usage.blocks_used,
            "kv_blocks_total": usage.blocks_total,
            "kv_bytes_used": usage.bytes_used,
            "num_preemptions": self.scheduler.num_preemptions,
            "layer_threads": {0: self.decoder.thread_policy.chosen()},  # attention rank -> choices
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
        sched = self._pending or self._schedule()
        if not sched.chunks and not run_empty:
            return []
        self._pending = sched
        samples = self._execute(sched)
        self._pending = None
        before = {c.request_id: len(self._requests[c.request_id].output_token_ids) for c in sched.chunks}
        outputs = []
        for request in self.scheduler.update(sched, samples.tokens):
            new = tuple(request.output_token_ids[before.get(request.request_id, 0) :])
            self._check_stop_strings(request, new)
            if self._guided is not None:
                self._guided.advance(request.request_id, new)
            outputs.append(self._output_with_logprobs(request, new, samples))
            if request.is_finished:
                self._forget(request.request_id)
        for request_id in list(samples.prompt_logprobs):  # a prefill chunk that samples nothing yet
            request = self._requests.get(request_id)
            if request is not None and not request.is_finished:
                outputs.append(self._output_with_logprobs(request, (), samples))
        for request_id in self._deferred_aborts:
            self.abort(request_id)
        self._deferred_aborts.clear()
        return outputs

    def _schedule(self) -> SchedulerOutput:
        """The next schedule. A request that cannot fit the KV cache even alone (admission keeps
        them out: `check_fits`) is aborted by the scheduler; the others are scheduled anyway, so a
        lock-step rank still joins every exchange."""
        while True:
            try:
                return self.scheduler.schedule()
            except KVCacheTooSmallError as e:
                log.warning("%s", e)
                self._forget(e.request_id)

    def _output_with_logprobs(
        self, request: Request, new: tuple[int, ...], samples: StepSamples
    ) -> RequestOutput:
        rid = request.request_id
        logprobs = (samples.logprobs[rid],) if new and rid in samples.logprobs else ()
        prompt, upto = samples.prompt_logprobs.pop(rid, ((), 0))
        if upto:
            self._prompt_lp_next[rid] = max(self._prompt_lp_next.get(rid, 0), upto)
        return _output(request, new, logprobs, tuple(prompt))

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

    def _execute(self, sched: SchedulerOutput) -> StepSamples:
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
            self.device,
        )
        hidden = self.decoder.forward(batch, self.pool)
        samples = StepSamples(prompt_logprobs=self._prompt_logprobs(sched, batch.last_token_index, hidden))
        rows = [i for i, c in enumerate(sched.chunks) if c.sample]
        if not rows:
            return samples
        sampled_rows = torch.tensor(rows, dtype=torch.long).to(self.device, non_blocking=True)
        logits = self.decoder.logits(hidden[batch.last_token_index[sampled_rows]])
        ids = [sched.chunks[i].request_id for i in rows]
        requests = [self._requests[r] for r in ids]
        allowed = self._guided.allowed(ids) if self._guided is not None else None
        tokens = sample(
            process(logits, requests, allowed),
            [r.params for r in requests],
            [self._seeds[r] for r in ids],
            [len(r.output_token_ids) for r in requests],
        )
        samples.tokens = dict(zip(ids, tokens, strict=True))
        wanted = [j for j, r in enumerate(requests) if r.params.logprobs is not None]
        if wanted:
            k = [requests[j].params.logprobs for j in wanted]
            found = token_logprobs(logits[wanted], [tokens[j] for j in wanted], k)
            samples.logprobs = {ids[j]: lp for j, lp in zip(wanted, found, strict=True)}
        return samples

    def _prompt_logprobs(
        self, sched: SchedulerOutput, last_token_index: torch.Tensor, hidden: torch.Tensor
    ) -> dict[str, tuple[list[TokenLogprob | None], int]]:
        """For requests that asked for prompt logprobs: the entries of the prompt tokens this
        step's chunk predicts (token t from position t - 1), and the prompt index reached. Tokens
        reported before (a chunk recomputed after preemption) are not reported again."""
        out = {}
        for i, c in enumerate(sched.chunks):
            request = self._requests[c.request_id]
            k = request.params.prompt_logprobs
            if k is None:
                continue
            prompt = request.prompt_token_ids
            first = self._prompt_lp_next.get(c.request_id, 0)
            end_pos = c.start_pos + len(c.token_ids)
            lo, hi = max(first, c.start_pos + 1, 1), min(len(prompt), end_pos + 1)
            entries: list[TokenLogprob | None] = [None] if first == 0 and c.start_pos == 0 else []
            last_row = int(last_token_index[i])
            for t0 in range(lo, hi, ROWS_PER_SLICE):
                targets = range(t0, min(hi, t0 + ROWS_PER_SLICE))
                rows = [last_row - (end_pos - t) for t in targets]  # position t - 1 predicts t
                logits = self.decoder.logits(hidden[rows])
                entries += token_logprobs(logits, [prompt[t] for t in targets], [k] * len(rows))
            if entries:
                out[c.request_id] = (entries, max(hi, 1))
        return out

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
        self._prompt_lp_next.pop(request_id, None)
        if self._guided is not None:
            self._guided.forget(request_id)
        self._seeds.pop(request_id, None)
        self._stops.pop(request_id, None)
        self._requests.pop(request_id, None)
        self._images.pop(request_id, None)


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


def _output(
    request: Request,
    new: tuple[int, ...],
    logprobs: tuple[TokenLogprob, ...] = (),
    prompt_logprobs: tuple[TokenLogprob | None, ...] = (),
) -> RequestOutput:
    return RequestOutput(
        request.request_id,
        new,
        request.is_finished,
        request.finish_reason,
        len(request.prompt_token_ids),
        len(request.output_token_ids),
        logprobs,
        prompt_logprobs,
    )
