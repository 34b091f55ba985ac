"""The simulated cluster: the engine's own scheduling, routing and placement code on a clock.

M attention ranks each run a real `Scheduler` over a real `KVCacheManager`; requests go to a
rank by the cluster engine's own policy (`engine.data_parallel.least_loaded_rank`). Each `step()`
is one lock-step of all ranks: schedule, route every scheduled token at every MoE layer (Zipf
popularity, then the dispatcher's replica choice, `router.routing.ReplicaTable`), price the step
with the cost model, advance the clock by that price, and update the schedulers with a dummy
sampled token. Per-step loads feed a real `RouterService` through the engine's rebalancing state
machine (`router.rebalancing.Rebalancing`); a new map is staged (changed slots x expert bytes /
staging bandwidth) on the simulated clock while steps go on, and switches between two steps.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
import torch

from engine.data_parallel import least_loaded_rank
from engine.kv_cache import KVCacheManager
from engine.request import Request, SamplingParams
from engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from model.config import ModelConfig
from router.layout import plan_layout
from router.placement import Placement, changed_slots
from router.rebalancing import RebalanceConfig, Rebalancing
from router.routing import ReplicaTable
from router.service import RouterService
from sim.costmodel import H100_SXM, CostModel, Hardware, Precision, RankBatch, StepCost, memory_plan
from sim.models import Shape, model_config
from sim.routing import Router, popularity

DUMMY_TOKEN = 0  # what the simulated sampler "samples": never a stop id, so requests end by length


class _DummyTokens:
    """A request's token ids when every one is DUMMY_TOKEN: slicing costs the slice, not the
    whole sequence (the scheduler slices `all_token_ids` for every chunk it schedules)."""

    def __init__(self, n: int) -> None:
        self._n = n

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, s: slice) -> list[int]:
        return [DUMMY_TOKEN] * len(range(*s.indices(self._n)))


class _SimRequest(Request):
    @property
    def all_token_ids(self) -> _DummyTokens:
        return _DummyTokens(self.num_tokens)


@dataclass(frozen=True)
class SimConfig:
    model: ModelConfig = field(default_factory=lambda: model_config("maverick"))
    hardware: Hardware = H100_SXM
    precision: Precision = field(default_factory=Precision)
    num_attention: int = 4
    num_expert_workers: int = 12
    redundant_slots_per_worker: int = 0
    scheduler: SchedulerConfig = field(
        default_factory=lambda: SchedulerConfig(max_num_seqs=256, token_budget=8192)
    )
    block_size: int = 64  # coarser than vLLM's 16: the block manager does Python work per block
    num_kv_blocks: int | None = None  # per rank; None: what fits in device memory after the weights
    expert_skew: float = 1.2  # Zipf exponent of expert popularity (0: uniform)
    # measured popularity instead of Zipf: float [L_moe, E], rows summing to 1 (e.g. a real run's)
    expert_shares: np.ndarray | None = field(default=None, compare=False)
    skew_seed: int = 0
    reshuffle_every_s: float | None = None  # draw new hot experts every this many simulated seconds
    rebalance: RebalanceConfig = field(default_factory=lambda: RebalanceConfig(enabled=False))
    plan_seconds: float = 0.05  # the policy's own run time before staging starts (assumption)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1 or None, got {self.num_kv_blocks}")
        if self.reshuffle_every_s is not None and self.reshuffle_every_s <= 0:
            raise ValueError(f"reshuffle_every_s must be > 0 or None, got {self.reshuffle_every_s}")
        if self.plan_seconds < 0:
            raise ValueError(f"plan_seconds must be >= 0, got {self.plan_seconds}")
        if self.expert_shares is not None:
            shape = (len(self.model.moe_layers), self.model.num_local_experts)
            shares = np.asarray(self.expert_shares)
            if shares.shape != shape or (shares < 0).any() or not np.allclose(shares.sum(axis=1), 1.0):
                raise ValueError(
                    f"expert_shares must be [L_moe, E] = {list(shape)} rows of shares summing to 1"
                )


@dataclass
class StepRecord:
    """One simulated step."""

    step_id: int
    start_s: float
    cost: StepCost
    tokens_per_rank: np.ndarray  # [M]
    chunks: tuple[tuple[str, int], ...]  # (request id, tokens) in schedule order, ranks in order
    worker_rows: np.ndarray  # [L_moe, W] rows each expert worker computed per MoE layer
    placement_version: int
    num_running: int  # over all ranks, after the step
    num_waiting: int
    kv_used_fraction: float


@dataclass
class RequestTimes:
    arrival_s: float
    dp_rank: int
    prompt_len: int
    output_len: int
    first_token_s: float | None = None
    finish_s: float | None = None
    tokens_scheduled: int = 0
    tokens_recomputed: int = 0  # computed again after a preemption
    computed_since_start: int = 0  # since the last (re)start; a preemption throws these away


@dataclass(frozen=True)
class Rearrangement:
    planned_s: float
    switched_s: float
    version: int
    slots_moved: int
    stage_s: float


class _KVCache(KVCacheManager):
    """`KVCacheManager` with a shortcut for the common decode step that needs no new block and
    releases none. `allocate` itself does nothing in that case either, but it walks every layer's
    table (and frees an empty list per chunked layer) to find that out; at simulated scale that
    walk is most of the run time. The test is `_plan`'s: no entry to add (ceil(end / block) is
    within the table) and nothing to release (the query's chunk starts in the first live block).
    Every other call goes to the real method."""

    def allocate(self, request_id: str, start_pos: int, end_pos: int) -> bool:
        seq = self._seqs.get(request_id)
        if seq is not None and -(-end_pos // self.block_size) <= len(seq.tables[0]):
            chunk = self.chunk_size
            if chunk is None or start_pos // chunk * chunk // self.block_size == seq.num_released:
                return True
        return super().allocate(request_id, start_pos, end_pos)


class SimCluster:
    """Same verbs as the engines: add, step, has_unfinished; plus a clock (`now`)."""

    def __init__(self, cfg: SimConfig) -> None:
        self.cfg = cfg
        model = cfg.model
        self.shape = Shape.of(model)
        layout, placement = plan_layout(
            len(model.moe_layers),
            model.num_local_experts,
            cfg.num_attention,
            cfg.num_expert_workers,
            cfg.redundant_slots_per_worker,
        )
        self.slots_per_worker = layout.slots_per_worker
        plan = memory_plan(self.shape, cfg.hardware, cfg.precision, self.slots_per_worker, cfg.block_size)
        self.num_kv_blocks = cfg.num_kv_blocks or plan.num_kv_blocks
        chunked = list(self.shape.chunked)
        self.schedulers = [
            Scheduler(
                cfg.scheduler,
                _KVCache(
                    self.num_kv_blocks,
                    cfg.block_size,
                    chunked,
                    model.attention_chunk_size,
                    plan.kv_block_bytes,
                ),
            )
            for _ in range(cfg.num_attention)
        ]
        self.cost = CostModel(
            self.shape,
            cfg.hardware,
            cfg.precision,
            cfg.num_attention,
            cfg.num_expert_workers,
            self.slots_per_worker,
        )
        self.router = Router(self._shares(0), cfg.seed)
        self.rebalancing = Rebalancing(cfg.rebalance, placement)
        self._replicas = ReplicaTable(placement)
        self.service = RouterService(placement, cfg.rebalance)
        self.now = 0.0
        self.step_id = 0
        self.requests: dict[str, RequestTimes] = {}
        self.steps: list[StepRecord] = []
        self.rearrangements: list[Rearrangement] = []
        self.num_preemptions = 0
        self.rows_routed = np.zeros(len(self.shape.moe_layers), dtype=np.int64)  # per MoE layer
        self.rows_computed = np.zeros((len(self.shape.moe_layers), cfg.num_expert_workers), dtype=np.int64)
        self._unfinished = [0] * cfg.num_attention
        self._ids = itertools.count()
        self._staging: _Staging | None = None
        self._loads: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
        self.reshuffles = 0  # times the hot experts moved (`reshuffle_every_s`)

    # -- requests -------------------------------------------------------------------------

    def add(
        self, prompt_len: int, output_len: int, arrival_s: float | None = None, request_id: str | None = None
    ) -> str:
        """A request of `prompt_len` tokens that generates exactly `output_len` tokens."""
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        limit = self.cfg.model.max_position_embeddings
        if prompt_len < 1 or output_len < 1 or prompt_len + output_len > limit:
            raise ValueError(
                f"request {request_id!r}: need prompt >= 1 and output >= 1 tokens within the context "
                f"length {limit}, got {prompt_len} + {output_len}"
            )
        rank = self._pick_rank()
        params = SamplingParams(max_tokens=output_len, ignore_eos=True)
        self.schedulers[rank].add(_SimRequest(request_id, [DUMMY_TOKEN] * prompt_len, params))
        self._unfinished[rank] += 1
        arrival = self.now if arrival_s is None else arrival_s
        self.requests[request_id] = RequestTimes(arrival, rank, prompt_len, output_len)
        return request_id

    def _pick_rank(self) -> int:
        return least_loaded_rank(self._unfinished)

    @property
    def has_unfinished(self) -> bool:
        return any(self._unfinished)

    @property
    def num_unfinished(self) -> int:
        return sum(self._unfinished)

    # -- one step -------------------------------------------------------------------------

    def step(self) -> StepRecord:
        self._before_step()
        outs = [s.schedule() for s in self.schedulers]
        self._check_progress(outs)
        batch, chunks, tokens = self._collect(outs)
        slot_rows, expert_rows = self._route(tokens)
        cost = self.cost.step(batch, slot_rows)
        start, self.now = self.now, self.now + cost.seconds
        for rank, out in enumerate(outs):
            self._update(rank, out)
        worker_rows = self._account(slot_rows, expert_rows)
        record = StepRecord(
            self.step_id,
            start,
            cost,
            tokens,
            chunks,
            worker_rows,
            self.placement.version,
            sum(s.num_running for s in self.schedulers),
            sum(s.num_waiting for s in self.schedulers),
            sum(s.kv.usage().blocks_used for s in self.schedulers)
            / (self.num_kv_blocks * len(self.schedulers)),
        )
        self.steps.append(record)
        self.step_id += 1
        return record

    def _collect(
        self, outs: list[SchedulerOutput]
    ) -> tuple[RankBatch, tuple[tuple[str, int], ...], np.ndarray]:
        rank, start, length, sample, chunks = [], [], [], [], []
        for r, out in enumerate(outs):
            for request_id in out.preempted:
                times = self.requests[request_id]
                times.tokens_recomputed += times.computed_since_start
                times.computed_since_start = 0
                self.num_preemptions += 1
            for c in out.chunks:
                n = len(c.token_ids)
                rank.append(r)
                start.append(c.start_pos)
                length.append(n)
                sample.append(c.sample)
                chunks.append((c.request_id, n))
                times = self.requests[c.request_id]
                times.tokens_scheduled += n
                times.computed_since_start += n
        arrays = [np.array(x, dtype=np.int64) for x in (rank, start, length, sample)]
        batch = RankBatch.from_chunks(self.cfg.num_attention, *arrays, self.cfg.model.attention_chunk_size)
        tokens = np.bincount(arrays[0], weights=arrays[2], minlength=self.cfg.num_attention).astype(np.int64)
        return batch, tuple(chunks), tokens

    def _route(self, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows per (rank, MoE layer, slot) int64 [M, L, N] and per (MoE layer, expert) [L, E]."""
        counts = self.router.sample(tokens)
        if self._replicas.placement is not self.placement:
            self._replicas = ReplicaTable(self.placement)
        return self._replicas.slot_rows(counts, self.step_id), counts.sum(axis=0)

    def _update(self, rank: int, out: SchedulerOutput) -> None:
        sampled = {c.request_id: DUMMY_TOKEN for c in out.chunks if c.sample}
        for request in self.schedulers[rank].update(out, sampled):
            times = self.requests[request.request_id]
            if times.first_token_s is None:
                times.first_token_s = self.now
            if request.is_finished:
                times.finish_s = self.now
                self._unfinished[rank] -= 1

    def _account(self, slot_rows: np.ndarray, expert_rows: np.ndarray) -> np.ndarray:
        """Conservation counters and the load report; returns rows per expert worker [L, W]."""
        per_slot = slot_rows.sum(axis=0)
        worker_rows = per_slot.reshape(per_slot.shape[0], self.cfg.num_expert_workers, -1).sum(-1)
        self.rows_routed += expert_rows.sum(axis=1)
        self.rows_computed += worker_rows
        self._loads[0].append(torch.from_numpy(expert_rows))
        self._loads[1].append(torch.from_numpy(per_slot))
        action = self.rebalancing.after_step()
        if action.report:
            self.service.record(*self._loads)
            self._loads = ([], [])
        if action.ask_plan:
            self._plan()
        return worker_rows

    def _check_progress(self, outs: list[SchedulerOutput]) -> None:
        for rank, (sched, out) in enumerate(zip(self.schedulers, outs, strict=True)):
            if self._unfinished[rank] and not out.chunks and sched.num_running == 0:
                raise RuntimeError(
                    f"attention rank {rank} cannot admit its next request: its prompt needs more KV blocks "
                    f"than the rank's {self.num_kv_blocks}; raise num_kv_blocks or lower the prompt length"
                )

    # -- rebalancing and popularity shifts -------------------------------------------------

    def _shares(self, shuffle: int) -> np.ndarray:
        cfg = self.cfg
        if cfg.expert_shares is not None:
            return cfg.expert_shares
        return popularity(
            self.shape.moe_layers, self.shape.num_experts, cfg.expert_skew, cfg.skew_seed + shuffle
        )

    @property
    def placement(self) -> Placement:
        """The map steps use now."""
        return self.rebalancing.placement

    def _before_step(self) -> None:
        every = self.cfg.reshuffle_every_s
        if every is not None and self.now >= (self.reshuffles + 1) * every:
            self.reshuffles = int(self.now // every)
            self.router.set_shares(self._shares(self.reshuffles))
        if self._staging is not None and self.now >= self._staging.ready_s:
            staging, self._staging = self._staging, None
            new = self.rebalancing.staged()
            self.service.commit(new)
            self.rearrangements.append(
                Rearrangement(staging.planned_s, self.now, new.version, staging.slots_moved, staging.stage_s)
            )

    def _plan(self) -> None:
        """The service plans at once here (the engine asks its actor and polls); the staging of a
        new map takes the cost model's time on the simulated clock."""
        new = self.service.maybe_replan(self.step_id)
        changes = self.rebalancing.planned(new)
        if changes is None:
            return
        changed = changed_slots(self.placement, new).numpy()
        per_worker = changed.reshape(changed.shape[0], new.num_workers, -1).sum(axis=(0, 2))
        stage_s = self.cost.stage_seconds(per_worker)
        ready = self.now + self.cfg.plan_seconds + stage_s
        self._staging = _Staging(ready, self.now, int(changed.sum()), stage_s)


@dataclass(frozen=True)
class _Staging:
    ready_s: float  # when every worker has staged (the switch happens at the first step after)
    planned_s: float
    slots_moved: int
    stage_s: float
