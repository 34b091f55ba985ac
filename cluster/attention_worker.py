"""The attention worker: a Ray actor, one data-parallel rank.

It owns the non-expert weights, its share of the running sequences and their paged KV cache, and
samples locally; only token ids leave it. Its MoE backend is the all-to-all dispatcher. One Ray
call per step (`step`), carrying the requests that join and the ones cancelled.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from attention.decoder import Llama4Decoder, load_non_expert_weights
from cluster.rendezvous import ProcessGroupMember
from engine.core import EngineConfig, EngineCore, RequestOutput
from engine.request import Request
from model.checkpoint import CheckpointReader
from model.device import resolve_dtype
from model.tokenizer import Tokenizer
from router.dispatcher import AttentionDispatcher, Command, Header, exchange_header
from router.layout import RankLayout
from router.placement import Placement


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
    extra: dict = field(default_factory=dict)


class AttentionWorker(ProcessGroupMember):
    def __init__(
        self,
        model_dir: str,
        dp_rank: int,
        layout: RankLayout,
        placement: Placement,
        engine_cfg: EngineConfig,
        device: str,
    ) -> None:
        super().__init__(device)
        self.dp_rank = self.rank = dp_rank
        dtype = resolve_dtype(engine_cfg.dtype, self.device)
        with CheckpointReader(Path(model_dir)) as reader:
            cfg = reader.config
            weights = load_non_expert_weights(reader, dtype, self.device)
        self.dispatcher = AttentionDispatcher(layout, placement, cfg.moe_layers, dp_rank, self.device)
        decoder = Llama4Decoder(cfg, weights, self.dispatcher)
        self.core = EngineCore(cfg, decoder, engine_cfg, Tokenizer(model_dir))

    def step(self, step: StepInput) -> StepResult:
        """One lock-step across the world: every attention rank runs the layers, with or without
        tokens, so every exchange has all its members."""
        rejected = self._admit(step)
        if step.placement is not None:
            self.dispatcher.placement = step.placement  # between steps: a step uses one version
        header = Header(step.step_id, self.dispatcher.placement.version, Command.STEP)
        exchange_header(header if self.dp_rank == 0 else None, self.device)
        self.dispatcher.step_id = step.step_id
        outputs = self.core.step(run_empty=True)
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
        )

    def _admit(self, step: StepInput) -> list[tuple[str, str]]:
        rejected = []
        for request_id in step.aborts:
            self.core.abort(request_id)
        for request in step.new_requests:
            try:
                self.core.add_request(request)
            except ValueError as e:
                rejected.append((request.request_id, str(e)))
        return rejected

    def load_routers(self, model_dir: str) -> None:
        """Swap in the router weights [E, H] of every MoE layer from another checkpoint of the same
        shape (e.g. the same weights made with another --skew-seed), so other experts turn hot.
        Ray runs one call at a time on this actor, so the swap lands between two steps. A missing
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

    def stop_experts(self) -> None:
        """Every attention rank joins the STOP broadcast; rank 0's header ends the expert loops."""
        header = Header(-1, self.dispatcher.placement.version, Command.STOP)
        exchange_header(header if self.dp_rank == 0 else None, self.device)

    def stats(self) -> dict:
        return {
            "dp_rank": self.dp_rank,
            "rows_sent_per_layer": dict(self.dispatcher.sent.per_layer),
            "rows_returned_per_layer": dict(self.dispatcher.returned.per_layer),
        }
