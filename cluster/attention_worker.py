"""The attention worker: a Ray actor, one data-parallel rank.

It owns the non-expert weights, its share of the running sequences and their paged KV cache, and
samples locally; only token ids leave it. Its MoE backend is the all-to-all dispatcher. One Ray
call per step (`step`), carrying the requests that join and the ones cancelled.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import ray
import torch
from ray.exceptions import RayError

from attention.decoder import Llama4Decoder, load_non_expert_weights
from attention.threads import compute_threads
from attention.vision import VisionEncoder
from cluster.membership import StoreAddress
from cluster.rendezvous import CONTROL, ProcessGroupMember, first_line
from cluster.vision_worker import resolve_features
from engine.core import EngineConfig, EngineCore, RequestOutput
from engine.request import Request
from model.checkpoint import CheckpointReader
from model.device import resolve_dtype
from model.tokenizer import Tokenizer
from router.dispatcher import AttentionDispatcher
from router.layout import RankLayout
from router.placement import Placement

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepInput:
    step_id: int
    new_requests: tuple[Request, ...] = ()
    aborts: tuple[str, ...] = ()
    placement: Placement | None = None  # a new map, used from this step on


@dataclass(frozen=True)
class StepResult:
    dp_rank: int
    outputs: tuple[RequestOutput, ...]
    rejected: tuple[tuple[str, str], ...] = ()  # (request_id, reason) for requests it could not take
    num_running: int = 0
    num_waiting: int = 0
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    expert_load: torch.Tensor | None = None  # int64 [L, E] tokens per logical expert this step
    slot_load: torch.Tensor | None = None  # int64 [L, W*S] tokens per physical slot this step
    num_preemptions: int = 0  # since the rank started
    failed: str = ""  # the step did not complete (its group broke); nothing of it was applied
    layer_threads: dict[int, int] = field(default_factory=dict)  # auto's choice per size of step
    seconds: float = 0.0  # the step on this rank, from its call arriving to its result

    def __getstate__(self) -> dict:
        """The loads travel as numpy arrays: Ray pickles a torch tensor through torch.save, about
        20x the time of a numpy array (180 against 10 us for this pair, once a step each way)."""
        state = dict(self.__dict__)
        for name in ("expert_load", "slot_load"):
            if state[name] is not None:
                state[name] = state[name].numpy()
        return state

    def __setstate__(self, state: dict) -> None:
        for name in ("expert_load", "slot_load"):
            if state[name] is not None:
                state[name] = torch.from_numpy(state[name].copy())  # Ray's zero-copy arrays are read-only
        self.__dict__.update(state)


class AttentionWorker(ProcessGroupMember):
    def __init__(
        self,
        model_dir: str,
        dp_rank: int,
        layout: RankLayout,
        placement: Placement,
        engine_cfg: EngineConfig,
        device: str,
        load_vision: bool = True,
        threads: int = 1,
    ) -> None:
        """`load_vision`: encode the images of this rank's requests here (no vision tier).
        `threads`: intra-op threads on a CPU (`cluster.placement_groups.attention_threads`);
        LLAMA4_EP_ATTENTION_THREADS overrides it."""
        super().__init__(device)  # loads on one intra-op thread: the step's thread gets `threads`
        self.threads = int(os.environ.get("LLAMA4_EP_ATTENTION_THREADS", threads))
        self.dp_rank = dp_rank
        dtype = resolve_dtype(engine_cfg.dtype, self.device)
        with CheckpointReader(Path(model_dir)) as reader:
            cfg = reader.config
            weights = load_non_expert_weights(reader, dtype, self.device)
            has_vision = load_vision and reader.has_vision
            vision = VisionEncoder.from_checkpoint(reader, dtype, self.device) if has_vision else None
        self.moe_layers = cfg.moe_layers
        self.dispatcher = AttentionDispatcher(layout, placement, cfg.moe_layers, dp_rank, self.device)
        decoder = Llama4Decoder(cfg, weights, self.dispatcher, engine_cfg.parallel_min_tokens)
        self.core = EngineCore(cfg, decoder, engine_cfg, Tokenizer(model_dir), vision=vision)
        self._admitted_step = -1

    @ray.method(concurrency_group=CONTROL)
    def join_epoch(
        self,
        store: StoreAddress,
        epoch: int,
        dp_rank: int,
        layout: RankLayout,
        placement: Placement,
        collective_timeout_s: float,
        transport: str = "auto",
    ) -> int:
        """Join `epoch`'s group as attention rank `dp_rank` of `layout`, routing by `placement`.
        Requests, KV cache and a step waiting to be replayed stay as they are."""
        self.dp_rank = dp_rank
        experts = range(layout.num_attention, layout.world_size)
        self.join(store, epoch, dp_rank, layout.world_size, experts, collective_timeout_s, transport)
        self.dispatcher = AttentionDispatcher(
            layout, placement, self.moe_layers, dp_rank, self.device, self.transport
        )
        self.core.decoder.experts = self.dispatcher
        return dp_rank

    def step(self, step: StepInput) -> StepResult:
        """One lock-step across the world: every attention rank runs the layers, with or without
        tokens, so every exchange has all its members. A step whose collectives break (a peer was
        lost) leaves the group and reports `failed`; the engine replays it in the next epoch."""
        start = time.perf_counter()
        if self.device.type == "cpu":
            compute_threads(self.threads)  # on the work thread, the same one every step
        rejected = self._admit(step)
        if step.placement is not None:
            self.dispatcher.placement = step.placement  # between steps: a step uses one version
        self.dispatcher.step_id = step.step_id
        try:
            outputs = self.core.step(run_empty=True)
        except Exception as e:
            self.dispatcher.end_step(completed=False)
            self.leave()  # at once: peers still blocked on this rank wake up with an error
            log.warning(
                "attention rank %d left epoch %d at step %d: %s", self.dp_rank, self.epoch, step.step_id, e
            )
            seconds = time.perf_counter() - start
            return StepResult(self.dp_rank, (), tuple(rejected), failed=first_line(e), seconds=seconds)
        self.dispatcher.end_step(completed=True)
        usage, sched = self.core.kv.usage(), self.core.scheduler
        expert_load, slot_load = self.dispatcher.take_load()
        return StepResult(
            self.dp_rank,
            tuple(outputs),
            tuple(rejected),
            sched.num_running,
            sched.num_waiting,
            usage.blocks_used,
            usage.blocks_total,
            expert_load,
            slot_load,
            sched.num_preemptions,
            layer_threads=self.core.decoder.thread_policy.chosen(),
            seconds=time.perf_counter() - start,
        )

    def _admit(self, step: StepInput) -> list[tuple[str, str]]:
        """Apply a step's aborts and new requests once (a replay of the same step id skips them)."""
        if step.step_id == self._admitted_step:
            return []
        self._admitted_step = step.step_id
        rejected = []
        for request_id in step.aborts:
            self.core.abort(request_id)
        for request in step.new_requests:
            try:
                self.core.add_request(resolve_features(request))
            except ValueError as e:
                rejected.append((request.request_id, str(e)))
            except RayError as e:  # its images' encoding failed (a vision worker died or raised)
                rejected.append((request.request_id, f"encoding its images failed: {e}"))
        return rejected

    def load_routers(self, model_dir: str) -> None:
        """Swap in the router weights [E, H] of every MoE layer from another checkpoint of the same
        shape (e.g. the same weights made with another --skew-seed), so other experts turn hot.
        It runs on the work thread (not a control call), so the swap lands between two steps. A missing
        router or one of another shape raises CheckpointError and changes nothing."""
        weights, cfg = self.core.decoder.weights, self.core.cfg
        shape = (cfg.num_local_experts, cfg.hidden_size)
        with CheckpointReader(Path(model_dir)) as reader:
            layers = tuple(
                lw
                if lw.router is None
                else replace(
                    lw,
                    router=reader.tensor(
                        f"layers.{i}.feed_forward.router.weight", shape, lw.router.dtype, lw.router.device
                    ),
                )
                for i, lw in enumerate(weights.layers)
            )
        self.core.decoder.weights = replace(weights, layers=layers)

    @ray.method(concurrency_group=CONTROL)
    def kv_blocks(self) -> int:
        """The blocks of this rank's KV pool (sized from memory when kv_cache_memory is set)."""
        return self.core.kv_capacity.num_blocks

    @ray.method(concurrency_group=CONTROL)
    def stats(self) -> dict:
        return {
            "dp_rank": self.dp_rank,
            "epoch": self.epoch,
            "transport": self.transport_in_use(),
            "threads": self.threads if self.device.type == "cpu" else torch.get_num_threads(),
            # this epoch's rows, over the steps that completed (the row-count invariant is per epoch)
            "rows_sent_per_layer": dict(self.dispatcher.sent.per_layer),
            "rows_returned_per_layer": dict(self.dispatcher.returned.per_layer),
        }
