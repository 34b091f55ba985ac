"""The cost model: how long one lock-step of the disaggregated cluster takes on stated hardware.

Every matmul-like piece is a roofline, `max(FLOPs / achieved FLOP/s, bytes / achieved bandwidth)`,
so small decode batches pay for reading the weights and large prefill batches pay for the math.
A step runs every layer in lock-step: attention ranks meet the expert workers at every MoE layer,
so each layer costs what its slowest attention rank costs, and each exchange costs what its
busiest endpoint moves (bytes / link bandwidth + one latency per collective). One MoE layer is

    attention (slowest rank) + max(shared expert, dispatch) + expert SwiGLU (busiest worker)
    + combine + the counts exchange,

the shared expert overlapping the dispatch as in the engine. Dense layers are attention + MLP.
The step ends with lm_head and sampling on each rank, plus fixed per-step and per-layer costs.

Constants and their sources are in `docs/simulator.md`; `HARDWARE` holds the named profiles.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from sim.models import Shape

GB = 1e9
# The block pool is a Python deque: a tiny model on an 80 GB device would ask for tens of millions
# of blocks that no run fills. Real Llama 4 shapes stay below this (Maverick bf16: ~666k of 16).
MAX_KV_BLOCKS = 1 << 21


@dataclass(frozen=True)
class Hardware:
    """Rates and fixed costs of one device kind and its interconnect (SI units: s, B/s, FLOP/s)."""

    name: str
    peak_flops: float  # dense bf16 matmul FLOP/s per device
    flops_efficiency: float  # achieved fraction of peak_flops for matmuls and attention
    mem_bandwidth: float  # device memory bytes/s
    mem_efficiency: float  # achieved fraction of mem_bandwidth
    mem_bytes: float  # device memory capacity
    mem_utilization: float  # fraction of mem_bytes the engine may use (weights + KV)
    intra_node_bandwidth: float  # achieved all-to-all bytes/s per device, inside a node
    inter_node_bandwidth: float  # achieved all-to-all bytes/s per device, across nodes
    intra_node_latency_s: float  # fixed cost of one collective inside a node
    inter_node_latency_s: float  # fixed cost of one collective that spans nodes
    devices_per_node: int
    staging_bandwidth: float  # bytes/s to load replica weights into a slot (host -> device)
    step_overhead_s: float = 0.0  # scheduling, launch, driver round trip: once per step
    layer_overhead_s: float = 0.0  # per layer per worker (kernel launches, Python)
    seq_layer_overhead_s: float = 0.0  # per scheduled sequence per layer (batch metadata)
    slot_overhead_s: float = 0.0  # per expert slot that has rows, per layer
    sample_overhead_s: float = 0.0  # per sampled row
    peer_latency_s: float = 0.0  # per collective and per peer (gloo sends to each peer in turn)

    def __post_init__(self) -> None:
        for name in (
            "peak_flops",
            "flops_efficiency",
            "mem_bandwidth",
            "mem_efficiency",
            "mem_bytes",
            "mem_utilization",
            "intra_node_bandwidth",
            "inter_node_bandwidth",
            "staging_bandwidth",
        ):
            if not getattr(self, name) > 0:
                raise ValueError(f"hardware {self.name!r}: {name} must be > 0, got {getattr(self, name)}")
        if self.devices_per_node < 1:
            raise ValueError(f"hardware {self.name!r}: devices_per_node must be >= 1")
        for name in ("flops_efficiency", "mem_efficiency", "mem_utilization"):
            if getattr(self, name) > 1:
                raise ValueError(f"hardware {self.name!r}: {name} must be <= 1, got {getattr(self, name)}")

    @property
    def flops(self) -> float:
        return self.peak_flops * self.flops_efficiency

    @property
    def bandwidth(self) -> float:
        return self.mem_bandwidth * self.mem_efficiency


H100_SXM = Hardware(
    name="h100",
    peak_flops=989e12,  # H100 SXM5 datasheet, dense BF16 tensor core (1979 is with sparsity)
    flops_efficiency=0.6,  # assumption
    mem_bandwidth=3.35e12,  # H100 SXM5 80 GB datasheet, HBM3
    mem_efficiency=0.8,  # assumption
    mem_bytes=80 * GB,
    mem_utilization=0.9,  # vLLM's default gpu_memory_utilization
    intra_node_bandwidth=340 * GB,  # NVLink 4: 450 GB/s per direction x 0.75 (assumption)
    inter_node_bandwidth=45 * GB,  # DeepEP internode, 400 Gb/s CX7 per GPU: 43-58 GB/s measured
    intra_node_latency_s=15e-6,  # assumption
    inter_node_latency_s=30e-6,  # assumption
    devices_per_node=8,
    staging_bandwidth=50 * GB,  # PCIe Gen5 x16 64 GB/s per direction x ~0.8 (assumption)
    step_overhead_s=1e-3,  # assumption: scheduler + launch, CUDA graphs for decode
    layer_overhead_s=20e-6,  # assumption: a handful of kernel launches per layer
)

H200 = replace(H100_SXM, name="h200", mem_bandwidth=4.8e12, mem_bytes=141 * GB)  # H200 datasheet

# The project's shared 2-core CPU box, float32: `python -m bench.sim_compare` measured the rates
# (1 thread) and fitted the fixed costs to a real ClusterEngine (tiny-maverick, 1 attention + 2 and
# 4 expert workers); see docs/simulator.md. One host: every link is "intra-node" (gloo over
# loopback, priced as a memory copy), and a collective's cost grows with the number of peers.
# Fitted with gloo collectives, what the cluster used then (now `transport="collective"`); the
# sockets transport, the default on CPUs since, costs less per exchange and is not fitted here.
CPU_2CORE = Hardware(
    name="cpu",
    peak_flops=6.5e9,
    flops_efficiency=1.0,
    mem_bandwidth=4.9e9,
    mem_efficiency=1.0,
    mem_bytes=64 * GB,
    mem_utilization=1.0,
    intra_node_bandwidth=4.9 * GB,
    inter_node_bandwidth=4.9 * GB,
    intra_node_latency_s=0.0,
    inter_node_latency_s=0.0,
    devices_per_node=1024,
    staging_bandwidth=1 * GB,  # assumption: not measured
    step_overhead_s=58.8e-3,
    slot_overhead_s=436e-6,
    peer_latency_s=242e-6,
)

HARDWARE: dict[str, Hardware] = {hw.name: hw for hw in (H100_SXM, H200, CPU_2CORE)}


@dataclass(frozen=True)
class Precision:
    """Bytes per element of the weights, the activations on the wire and the KV cache."""

    weight_bytes: int = 2  # bf16; 1 for fp8 weights (then matmuls run at twice the peak)
    act_bytes: int = 2
    kv_bytes: int = 2

    def __post_init__(self) -> None:
        if (
            self.weight_bytes not in (1, 2, 4)
            or self.act_bytes not in (1, 2, 4)
            or self.kv_bytes not in (1, 2, 4)
        ):
            raise ValueError(f"bytes per element must be 1, 2 or 4, got {self}")


@dataclass(frozen=True)
class RankBatch:
    """What each attention rank computes this step, summed over its scheduled chunks. All [M]."""

    tokens: np.ndarray
    seqs: np.ndarray
    samples: np.ndarray
    visible_global: np.ndarray  # sum over queries of the keys each sees, full-attention layers
    visible_chunked: np.ndarray  # the same for chunked (local) layers
    keys_global: np.ndarray  # keys read per sequence, summed, full-attention layers
    keys_chunked: np.ndarray

    @classmethod
    def from_chunks(
        cls,
        num_ranks: int,
        rank: np.ndarray,
        start: np.ndarray,
        length: np.ndarray,
        sample: np.ndarray,
        chunk_size: int | None,
    ) -> RankBatch:
        """One entry per scheduled chunk: its rank, start position, token count and sample flag."""
        start, length = start.astype(np.float64), length.astype(np.float64)
        end = start + length
        vis_g = length * start + length * (length + 1) / 2
        if chunk_size is None:
            vis_c, keys_c = vis_g, end
        else:
            vis_c = _local_visible(end, chunk_size) - _local_visible(start, chunk_size)
            keys_c = end - np.floor(start / chunk_size) * chunk_size

        def per_rank(values: np.ndarray) -> np.ndarray:
            return np.bincount(rank, weights=values, minlength=num_ranks)

        return cls(
            per_rank(length),
            per_rank(np.ones_like(length)),
            per_rank(sample.astype(np.float64)),
            per_rank(vis_g),
            per_rank(vis_c),
            per_rank(end),
            per_rank(keys_c),
        )


def _local_visible(x: np.ndarray, chunk: int) -> np.ndarray:
    """sum over positions p < x of (p mod chunk + 1): keys a chunked-attention query sees."""
    q, r = np.floor(x / chunk), np.mod(x, chunk)
    return q * chunk * (chunk + 1) / 2 + r * (r + 1) / 2


@dataclass(frozen=True)
class StepCost:
    seconds: float
    attention_s: float  # attention and dense layers, slowest rank per layer
    shared_or_dispatch_s: float  # max(shared expert, dispatch) over MoE layers
    expert_s: float  # busiest expert worker per MoE layer
    combine_s: float  # combine and counts exchanges
    head_s: float  # lm_head and sampling
    fixed_s: float  # per-step overhead and the step header


class CostModel:
    def __init__(
        self,
        shape: Shape,
        hw: Hardware,
        precision: Precision,
        num_attention: int,
        num_expert_workers: int,
        slots_per_worker: int,
    ) -> None:
        self.shape, self.hw, self.prec = shape, hw, precision
        self.num_attention, self.num_workers, self.slots = num_attention, num_expert_workers, slots_per_worker
        # fp8 weights run the tensor cores at twice the bf16 rate (H100 datasheet: 1979 vs 989)
        self.flops = hw.flops * (2 if precision.weight_bytes == 1 else 1)
        node = np.arange(num_attention + num_expert_workers) // hw.devices_per_node
        self.same_node = node[:num_attention, None] == node[None, num_attention:]  # [M, W]
        multi = node[-1] > 0
        self.latency = hw.inter_node_latency_s if multi else hw.intra_node_latency_s
        self.latency += hw.peer_latency_s * (num_attention + num_expert_workers - 1)
        moe = np.zeros(shape.num_layers, dtype=bool)
        moe[list(shape.moe_layers)] = True
        self.is_moe = moe
        self.is_chunked = np.array(shape.chunked, dtype=bool)

    # -- pieces ---------------------------------------------------------------------------

    def roofline(self, flops: np.ndarray, nbytes: np.ndarray) -> np.ndarray:
        return np.maximum(flops / self.flops, nbytes / self.hw.bandwidth)

    def _matmul(self, tokens: np.ndarray, params: int, act_width: int) -> np.ndarray:
        """tokens x [params] weights: read the weights once when there is any token."""
        p = self.prec
        nbytes = (tokens > 0) * params * p.weight_bytes + tokens * act_width * p.act_bytes
        return self.roofline(2.0 * tokens * params, nbytes)

    def attention_layers(self, b: RankBatch) -> tuple[np.ndarray, np.ndarray]:
        """Per rank and layer [M, L]: attention + (dense MLP | router); and the shared expert [M]."""
        s, p, hw = self.shape, self.prec, self.hw
        proj = self._matmul(b.tokens, s.attn_params, 2 * s.hidden + s.q_dim + 2 * s.kv_dim)
        kv_row = 2 * s.kv_dim * p.kv_bytes

        def core(visible: np.ndarray, keys: np.ndarray) -> np.ndarray:
            return self.roofline(4.0 * s.q_dim * visible, (keys + b.tokens) * kv_row)

        core_g, core_c = core(b.visible_global, b.keys_global), core(b.visible_chunked, b.keys_chunked)
        dense = self._matmul(b.tokens, s.dense_mlp_params, 2 * s.hidden)
        router = self._matmul(b.tokens, s.router_params, s.hidden)
        per_layer = (
            proj[:, None]
            + np.where(self.is_chunked[None, :], core_c[:, None], core_g[:, None])
            + np.where(self.is_moe[None, :], router[:, None], dense[:, None])
            + hw.layer_overhead_s
            + b.seqs[:, None] * hw.seq_layer_overhead_s
        )
        shared = self._matmul(b.tokens, s.expert_params, 2 * s.hidden)
        return per_layer, shared

    def expert_layers(self, slot_rows: np.ndarray) -> np.ndarray:
        """slot_rows [L_moe, W*S] rows per physical slot -> busiest worker's seconds per MoE layer."""
        s, hw = self.shape, self.hw
        per_slot = (
            self._matmul(slot_rows, s.expert_params, 2 * s.hidden) + (slot_rows > 0) * hw.slot_overhead_s
        )
        per_worker = per_slot.reshape(slot_rows.shape[0], self.num_workers, self.slots).sum(-1)
        return per_worker.max(axis=1) + hw.layer_overhead_s

    def exchange(self, rows: np.ndarray, bytes_per_row: int) -> np.ndarray:
        """rows [M, L_moe, W] from attention rank to expert worker -> seconds per MoE layer of one
        all-to-all of those rows: the busiest endpoint's bytes over its links, plus one latency."""
        nbytes = rows * float(bytes_per_row)
        intra = nbytes * self.same_node[:, None, :]
        inter = nbytes - intra
        hw = self.hw

        def endpoint(intra_b: np.ndarray, inter_b: np.ndarray) -> np.ndarray:
            return np.maximum(intra_b / hw.intra_node_bandwidth, inter_b / hw.inter_node_bandwidth)

        senders = endpoint(intra.sum(2), inter.sum(2)).max(axis=0)  # [L]
        receivers = endpoint(intra.sum(0), inter.sum(0)).max(axis=1)  # [L]
        return np.maximum(senders, receivers) + self.latency

    # -- one step -------------------------------------------------------------------------

    def step(self, batch: RankBatch, slot_rows: np.ndarray) -> StepCost:
        """batch: per-rank sums; slot_rows int [M, L_moe, W*S] rows per (rank, MoE layer, slot)."""
        s, hw = self.shape, self.hw
        layers, shared = self.attention_layers(batch)
        attention = float(layers.max(axis=0).sum())
        worker_rows = slot_rows.reshape(*slot_rows.shape[:2], self.num_workers, self.slots).sum(-1)
        row_bytes = s.hidden * self.prec.act_bytes
        dispatch = self.exchange(worker_rows, row_bytes)
        overlap = float(np.maximum(shared.max(), dispatch).sum())
        experts = float(self.expert_layers(slot_rows.sum(0)).sum())
        combine = float((dispatch + self.latency).sum())  # rows back (same bytes) + counts exchange
        head = self._matmul(batch.samples, s.head_params, s.hidden) + batch.samples * hw.sample_overhead_s
        head_s = float(head.max())
        fixed = hw.step_overhead_s + self.latency  # the step header broadcast
        total = attention + overlap + experts + combine + head_s + fixed
        return StepCost(total, attention, overlap, experts, combine, head_s, fixed)

    def stage_seconds(self, changed_slots_per_worker: np.ndarray) -> float:
        """Loading new replicas: the worker with the most changed slots sets the pace."""
        nbytes = changed_slots_per_worker.max(initial=0) * self.shape.expert_params * self.prec.weight_bytes
        return float(nbytes / self.hw.staging_bandwidth)


@dataclass(frozen=True)
class MemoryPlan:
    attention_weight_bytes: float
    expert_weight_bytes: float  # per expert worker, all its slots of all MoE layers
    kv_block_bytes: int  # one block of one layer
    num_kv_blocks: int  # per attention rank, what fits after the weights


def memory_plan(
    shape: Shape, hw: Hardware, prec: Precision, slots_per_worker: int, block_size: int
) -> MemoryPlan:
    """Weights per device and the KV blocks that fit; raises ValueError when the weights do not fit."""
    usable = hw.mem_bytes * hw.mem_utilization
    attn = shape.non_expert_params * prec.weight_bytes
    experts = len(shape.moe_layers) * slots_per_worker * shape.expert_params * prec.weight_bytes
    if experts > usable:
        raise ValueError(
            f"{slots_per_worker} expert slots x {len(shape.moe_layers)} MoE layers need "
            f"{experts / GB:.1f} GB per expert worker; {hw.name} offers {usable / GB:.1f} GB. Use more "
            f"expert workers, fewer redundant slots or fp8 weights (--weight-bytes 1)"
        )
    block = block_size * 2 * shape.kv_dim * prec.kv_bytes
    num_blocks = min(int((usable - attn) // block), MAX_KV_BLOCKS)
    if num_blocks < 1:
        raise ValueError(
            f"the non-expert weights ({attn / GB:.1f} GB) leave no room for KV cache on {hw.name} "
            f"({usable / GB:.1f} GB usable)"
        )
    return MemoryPlan(attn, experts, block, num_blocks)
