"""`llama4-ep bench dispatch`: the dispatcher's time per MoE layer against bare all_to_all.

It spawns a real world of processes (M attention ranks, N expert ranks, one gloo
group on a free port) and times one MoE layer's exchange three ways, interleaved rep by rep:

- `all_to_all`: the three bare collectives of the protocol (counts, rows out, rows back) with the
  dispatcher's split sizes and nothing else: the transport's floor;
- `dispatch`: `AttentionDispatcher.dispatch(...).wait()` against `ExpertServer.receive` /
  `send_back` with identity experts (the rows go straight back): the dispatcher's transport;
- `dispatch+compute`: the same with the SwiGLU of every slot (what `ExpertServer.serve` does);
  the expert ranks also time their SwiGLU alone (`expert_compute`, slowest rank per layer);
- `sockets` and `sockets+compute`: the dispatcher again, over the sockets transport (the default
  on CPUs, `router.transport`) instead of gloo collectives.

`collective_vs_sockets` = dispatch+compute / sockets+compute: what the sockets transport saves
a MoE layer. `overhead_vs_all_to_all` = dispatch / all_to_all, transport only: the median over reps of each
rep's ratio (a rep runs the modes back to back, so a busy spell of a shared machine lands on both
sides of one ratio). Times are attention rank 0's wall clock per MoE layer; the attention side's
process CPU time (its gloo threads included) comes along as a steadier second opinion.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from experts.swiglu import grouped_swiglu
from model.checkpoint import parse_dtype
from router.dispatcher import AttentionDispatcher, ExpertServer
from router.layout import RankLayout, plan_layout
from router.placement import Placement
from router.transport import SocketTransport

MODES = ("all_to_all", "dispatch", "dispatch+compute", "sockets", "sockets+compute")


@dataclass(frozen=True)
class DispatchSpec:
    num_attention: int = 1
    num_expert_workers: int = 4
    num_experts: int = 128
    hidden_size: int = 256
    intermediate_size: int = 256
    num_tokens: tuple[int, ...] = (32, 256)  # per attention rank and MoE layer
    num_layers: int = 4  # MoE layers timed back to back (one step of bench-maverick)
    reps: int = 50
    dtype: str = "float32"
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("num_attention", "num_expert_workers", "num_experts", "hidden_size", "num_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.reps < 1 or not self.num_tokens or min(self.num_tokens) < 1:
            raise ValueError(f"need reps >= 1 and token counts >= 1, got {self.reps}, {self.num_tokens}")
        if self.num_expert_workers > self.num_experts:
            raise ValueError(f"{self.num_expert_workers} expert workers for {self.num_experts} experts")

    @property
    def world_size(self) -> int:
        return self.num_attention + self.num_expert_workers


def run_dispatch_bench(spec: DispatchSpec) -> list[dict]:
    """Spawn the world, run the interleaved reps, return one row of medians (ms per MoE layer)
    per token count."""
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)  # a free port
    with tempfile.TemporaryDirectory(prefix="llama4-ep-dispatch-") as tmp:
        out = Path(tmp) / "result.json"
        mp.start_processes(
            _rank_main,
            args=(spec, store.port, str(out)),
            nprocs=spec.world_size,
            join=True,
            start_method="spawn",
        )
        samples = json.loads(out.read_text())
    del store
    return [_summarise(t, samples) for t in spec.num_tokens]


def _summarise(num_tokens: int, samples: dict) -> dict:
    """Medians in ms per MoE layer; the ratios are medians of per-rep ratios (a rep's modes run
    back to back, so a slow spell of the machine hits both sides of a ratio alike)."""
    wall = {mode: samples["attention"][f"{num_tokens}/{mode}"] for mode in MODES}
    cpu = {mode: samples["attention"][f"{num_tokens}/{mode}/cpu"] for mode in MODES}
    per_rank = [r[str(num_tokens)] for r in samples["experts"]]
    compute = [max(ranks) for ranks in zip(*per_rank, strict=True)]  # the slowest expert rank

    def ms(values: list[float]) -> float:
        return round(statistics.median(values) * 1e3, 4)

    def ratio(a: list[float], b: list[float]) -> float:
        return round(statistics.median(x / y for x, y in zip(a, b, strict=True)), 3)

    return {
        "num_tokens": num_tokens,
        "all_to_all_ms": ms(wall["all_to_all"]),
        "dispatch_ms": ms(wall["dispatch"]),
        "dispatch_with_compute_ms": ms(wall["dispatch+compute"]),
        "expert_compute_ms": ms(compute),
        "overhead_vs_all_to_all": ratio(wall["dispatch"], wall["all_to_all"]),
        "with_compute_vs_all_to_all": ratio(wall["dispatch+compute"], wall["all_to_all"]),
        "attention_cpu_all_to_all_ms": ms(cpu["all_to_all"]),
        "attention_cpu_dispatch_ms": ms(cpu["dispatch"]),
        "sockets_ms": ms(wall["sockets"]),
        "sockets_with_compute_ms": ms(wall["sockets+compute"]),
        "collective_vs_sockets": ratio(wall["dispatch+compute"], wall["sockets+compute"]),
        "attention_cpu_sockets_ms": ms(cpu["sockets"]),
    }


# -- inside the spawned ranks ----------------------------------------------------------------


def _rank_main(rank: int, spec: DispatchSpec, port: int, out: str) -> None:
    torch.set_num_threads(1)  # the node's cores are shared by every rank
    store = dist.TCPStore("127.0.0.1", port, is_master=False)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=spec.world_size)
    m = spec.num_attention
    peers = range(m, spec.world_size) if rank < m else range(m)
    sockets = SocketTransport.connect(dist.PrefixStore("sockets/", store), rank, peers, timeout_s=300)
    try:
        side = _attention_rank if rank < spec.num_attention else _expert_rank
        mine = side(rank, spec, sockets)
        gathered: list = [None] * spec.world_size
        dist.all_gather_object(gathered, mine)
        if rank == 0:
            result = {"attention": gathered[0], "experts": gathered[spec.num_attention :]}
            Path(out).write_text(json.dumps(result))
    finally:
        sockets.close()
        dist.destroy_process_group()


def _world(spec: DispatchSpec) -> tuple[RankLayout, Placement]:
    return plan_layout(spec.num_layers, spec.num_experts, spec.num_attention, spec.num_expert_workers)


def _schedule(spec: DispatchSpec) -> Iterator[tuple[int, int, str]]:
    """(rep, num_tokens, mode) in the same order on every rank; the mode order rotates per rep."""
    for rep in range(spec.reps):
        for num_tokens in spec.num_tokens:
            for i in range(len(MODES)):
                yield rep, num_tokens, MODES[(rep + i) % len(MODES)]


@dataclass
class _LayerInput:
    x: torch.Tensor  # [T, H] routed rows, token order
    expert_idx: torch.Tensor  # [T]
    counts: torch.Tensor  # [world * S] what the dispatcher sends first
    rows: torch.Tensor  # [T, H] sorted by destination (what the dispatcher sends)
    splits: list[int]  # rows per destination rank


def _layer_input(
    dispatcher: AttentionDispatcher,
    moe_idx: int,
    num_tokens: int,
    hidden: int,
    g: torch.Generator,
    dtype: torch.dtype,
) -> _LayerInput:
    """Random top-1 routing, and the split sizes the dispatcher derives from it (its own `route`)."""
    x = torch.randn(num_tokens, hidden, generator=g).to(dtype)
    expert_idx = torch.randint(0, dispatcher.placement.num_experts, (num_tokens,), generator=g)
    route = dispatcher.route(moe_idx, expert_idx)
    return _LayerInput(x, expert_idx, route.counts, x[route.order].contiguous(), route.splits)


def _attention_rank(rank: int, spec: DispatchSpec, sockets: SocketTransport) -> dict[str, list[float]]:
    layout, placement = _world(spec)
    dtype = parse_dtype(spec.dtype)
    layers, cpu = tuple(range(spec.num_layers)), torch.device("cpu")
    d = AttentionDispatcher(layout, placement, layers, rank, cpu)
    over_sockets = AttentionDispatcher(layout, placement, layers, rank, cpu, sockets)
    g = torch.Generator().manual_seed(spec.seed + rank)
    times: dict[str, list[float]] = {}
    inputs: dict[tuple[int, int], list[_LayerInput]] = {}
    for rep, num_tokens, mode in _schedule(spec):
        key = (rep, num_tokens)
        if key not in inputs:  # one routing per (rep, size), shared by the three modes
            layers = range(spec.num_layers)
            inputs = {key: [_layer_input(d, m, num_tokens, spec.hidden_size, g, dtype) for m in layers]}
        batch = inputs[key]
        dist.barrier()
        t0, c0 = time.perf_counter(), time.process_time()
        for m, inp in enumerate(batch):
            if mode == "all_to_all":
                _bare_attention(layout, spec.hidden_size, inp)
            else:
                (over_sockets if mode.startswith("sockets") else d).dispatch(m, inp.x, inp.expert_idx).wait()
        t1, c1 = time.perf_counter(), time.process_time()
        times.setdefault(f"{num_tokens}/{mode}", []).append((t1 - t0) / spec.num_layers)
        times.setdefault(f"{num_tokens}/{mode}/cpu", []).append((c1 - c0) / spec.num_layers)
    return times


def _bare_attention(layout: RankLayout, hidden: int, inp: _LayerInput) -> None:
    zero = [0] * layout.world_size
    to_experts = [0] * layout.num_attention + [layout.slots_per_worker] * layout.num_expert_workers
    dist.all_to_all_single(inp.counts[:0], inp.counts[layout.first_expert_key :], zero, to_experts)
    dist.all_to_all_single(inp.rows.new_empty((0, hidden)), inp.rows, zero, inp.splits)
    dist.all_to_all_single(torch.empty_like(inp.rows), inp.rows[:0], inp.splits, zero)


def _expert_rank(rank: int, spec: DispatchSpec, sockets: SocketTransport) -> dict[str, list[float]]:
    """Serves every exchange; returns its SwiGLU seconds per MoE layer per rep, by token count."""
    layout, _ = _world(spec)
    dtype = parse_dtype(spec.dtype)
    g = torch.Generator().manual_seed(spec.seed + rank)
    s, h, i = layout.slots_per_worker, spec.hidden_size, spec.intermediate_size
    gate_up = (torch.randn(s, h, 2 * i, generator=g) / h**0.5).to(dtype)
    down = (torch.randn(s, i, h, generator=g) / i**0.5).to(dtype)
    servers = {
        "collective": ExpertServer(layout, h, dtype, torch.device("cpu")),
        "sockets": ExpertServer(layout, h, dtype, torch.device("cpu"), sockets),
    }
    compute: dict[str, list[float]] = {}
    for _, num_tokens, mode in _schedule(spec):
        dist.barrier()
        seconds = 0.0
        server = servers["sockets" if mode.startswith("sockets") else "collective"]
        for m in range(spec.num_layers):
            if mode == "all_to_all":
                _bare_expert(layout, h, dtype)
                continue
            rows, local_slot, splits = server.receive()
            if mode.endswith("+compute"):  # exactly the expert worker's loop, with a clock around SwiGLU
                t0 = time.perf_counter()
                rows = grouped_swiglu(rows, local_slot, gate_up, down)
                seconds += time.perf_counter() - t0
            server.send_back(m, rows, splits)
        if mode == "dispatch+compute":
            compute.setdefault(str(num_tokens), []).append(seconds / spec.num_layers)
    return compute


def _bare_expert(layout: RankLayout, hidden: int, dtype: torch.dtype) -> None:
    m, s = layout.num_attention, layout.slots_per_worker
    zero, no_rows = [0] * layout.world_size, [0] * layout.num_expert_workers
    counts = torch.empty(m * s, dtype=torch.long)
    dist.all_to_all_single(counts, counts[:0], [s] * m + no_rows, zero)
    splits = counts.view(m, s).sum(1).tolist() + no_rows
    rows = torch.empty((sum(splits), hidden), dtype=dtype)
    dist.all_to_all_single(rows, rows[:0], splits, zero)
    dist.all_to_all_single(rows[:0], rows, zero, splits)


# -- the command ----------------------------------------------------------------------------


def print_dispatch(spec: DispatchSpec, rows: list[dict]) -> None:
    print(
        f"dispatch per MoE layer: {spec.num_attention} attention + {spec.num_expert_workers} expert ranks "
        f"(one process each), {spec.num_experts} experts, hidden {spec.hidden_size}, "
        f"{spec.dtype}, random top-1 routing; median of {spec.reps} interleaved reps "
        f"of {spec.num_layers} layers"
    )
    print(
        f"{'':>7} {'gloo: bare a2a':>14} {'dispatch':>9} {'overhead':>9} {'+compute':>9} "
        f"{'sockets: dispatch':>18} {'+compute':>9} {'expert swiglu':>14} {'gloo/sockets':>13}"
    )
    for r in rows:
        print(
            f"{r['num_tokens']:>4} tk {r['all_to_all_ms']:>11.3f} ms {r['dispatch_ms']:>9.3f} "
            f"{r['overhead_vs_all_to_all']:>8.2f}x {r['dispatch_with_compute_ms']:>9.3f} "
            f"{r['sockets_ms']:>18.3f} {r['sockets_with_compute_ms']:>9.3f} {r['expert_compute_ms']:>14.3f} "
            f"{r['collective_vs_sockets']:>12.2f}x"
        )
    print("(ms per MoE layer, attention rank 0's wall clock)")
    figures = {
        **{k: v for k, v in asdict(spec).items() if k not in ("seed",)},
        "overhead_vs_all_to_all": max(r["overhead_vs_all_to_all"] for r in rows),
        "collective_vs_sockets": min(r["collective_vs_sockets"] for r in rows),
        "results": rows,
        "cpus": os.cpu_count(),
    }
    print(json.dumps(figures))


def cmd_dispatch(args: argparse.Namespace) -> int:
    spec = DispatchSpec(
        num_attention=args.attention_ranks,
        num_expert_workers=args.expert_ranks,
        num_experts=args.experts,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_tokens=args.tokens,
        num_layers=args.layers,
        reps=args.reps,
        dtype=args.dtype,
    )
    print_dispatch(spec, run_dispatch_bench(spec))
    return 0
