"""Run a workload through the simulated cluster and summarise it; the `python -m sim` CLI.

    result = simulate(SimConfig(...), make_workload(...))
    print(format_summary(result.summary()))

Time advances by the simulated step durations only: a request that arrives while a step runs
joins at the next step, and an idle cluster jumps to the next arrival.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from engine.scheduler import SchedulerConfig
from router.balance import balancedness
from router.rebalancing import RebalanceConfig
from sim.cluster import Rearrangement, RequestTimes, SimCluster, SimConfig, StepRecord
from sim.costmodel import HARDWARE, Precision
from sim.models import model_config
from sim.tiers import add_tiers_arguments, tiers_command
from sim.workload import ArrivalSpec, LengthSpec, Workload, make_workload


@dataclass
class SimResult:
    cfg: SimConfig
    steps: list[StepRecord]
    requests: dict[str, RequestTimes]
    rearrangements: list[Rearrangement]
    num_preemptions: int
    slots_per_worker: int
    wall_s: float

    def step_seconds(self) -> np.ndarray:
        return np.array([s.cost.seconds for s in self.steps])

    def balancedness_per_step(self) -> np.ndarray:
        """Balancedness of each step's rows per (MoE layer, expert worker) (`router.balance`)."""
        rows = torch.from_numpy(np.stack([s.worker_rows for s in self.steps]))  # [steps, L, W]
        return balancedness(rows).numpy()

    def balancedness_over_time(self, num_buckets: int) -> list[tuple[float, float]]:
        """(bucket end in simulated seconds, balancedness of the bucket's summed loads)."""
        if not self.steps:
            return []
        starts = np.array([s.start_s for s in self.steps])
        edges = np.linspace(0.0, starts[-1] + self.steps[-1].cost.seconds, num_buckets + 1)
        bucket = np.clip(np.searchsorted(edges, starts, side="right") - 1, 0, num_buckets - 1)
        out = []
        for b in range(num_buckets):
            picked = [s.worker_rows for s, k in zip(self.steps, bucket, strict=True) if k == b]
            if picked:
                loads = torch.from_numpy(np.sum(picked, axis=0).astype(np.float64))
                out.append((float(edges[b + 1]), float(balancedness(loads))))
        return out

    def summary(self, num_buckets: int = 8) -> dict:
        reqs = list(self.requests.values())
        finished = [r for r in reqs if r.finish_s is not None]
        arrival = min((r.arrival_s for r in reqs), default=0.0)
        end = max((r.finish_s for r in finished), default=0.0)
        span = max(end - arrival, 1e-12)
        ttft = np.array([r.first_token_s - r.arrival_s for r in finished])
        tpot = np.array(
            [(r.finish_s - r.first_token_s) / (r.output_len - 1) for r in finished if r.output_len > 1]
        )
        secs = self.step_seconds()
        cost = {
            k: float(sum(getattr(s.cost, k) for s in self.steps) / max(secs.sum(), 1e-12))
            for k in ("attention_s", "shared_or_dispatch_s", "expert_s", "combine_s", "head_s", "fixed_s")
        }
        rows = sum(s.worker_rows for s in self.steps) if self.steps else None
        overall = float(balancedness(torch.from_numpy(rows))) if self.steps else 1.0
        return {
            "requests": len(reqs),
            "finished": len(finished),
            "preemptions": self.num_preemptions,
            "steps": len(self.steps),
            "simulated_s": end,
            "wall_s": self.wall_s,
            "prompt_tokens": int(sum(r.prompt_len for r in reqs)),
            "output_tokens": int(sum(r.output_len for r in finished)),
            "output_tok_per_s": sum(r.output_len for r in finished) / span,
            "total_tok_per_s": sum(r.output_len + r.prompt_len for r in finished) / span,
            "ttft_s": _percentiles(ttft),
            "tpot_ms": {k: v * 1e3 for k, v in _percentiles(tpot).items()},
            "step_ms": {k: v * 1e3 for k, v in _percentiles(secs).items()},
            "step_time_share": cost,
            "balancedness": overall,
            "balancedness_over_time": self.balancedness_over_time(num_buckets),
            "rearrangements": len(self.rearrangements),
            "slots_moved": sum(r.slots_moved for r in self.rearrangements),
            "stage_s": [round(r.stage_s, 4) for r in self.rearrangements],
        }


def _percentiles(x: np.ndarray) -> dict[str, float]:
    if x.size == 0:
        return {"mean": float("nan"), "p50": float("nan"), "p90": float("nan"), "p99": float("nan")}
    p50, p90, p99 = np.percentile(x, [50, 90, 99])
    return {"mean": float(x.mean()), "p50": float(p50), "p90": float(p90), "p99": float(p99)}


@contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    """The per-step tensors are tiny: thread pools only add contention (badly so on a busy box)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def simulate(cfg: SimConfig, workload: Workload) -> SimResult:
    """Every request of `workload` through a fresh simulated cluster, arrivals on the simulated clock."""
    t0 = time.perf_counter()
    with _torch_threads(1):
        sim = SimCluster(cfg)
        arrival, prompt, output = workload.arrival_s, workload.prompt_len, workload.output_len
        i, n = 0, len(workload)
        while i < n or sim.has_unfinished:
            if not sim.has_unfinished and arrival[i] > sim.now:
                sim.now = float(arrival[i])  # idle: jump to the next arrival
            while i < n and arrival[i] <= sim.now:
                sim.add(int(prompt[i]), int(output[i]), float(arrival[i]))
                i += 1
            sim.step()
    return SimResult(
        cfg,
        sim.steps,
        sim.requests,
        sim.rearrangements,
        sim.num_preemptions,
        sim.slots_per_worker,
        time.perf_counter() - t0,
    )


def format_summary(s: dict) -> str:
    def pct(d: dict, unit: str) -> str:
        return f"p50 {d['p50']:.3f} / p90 {d['p90']:.3f} / p99 {d['p99']:.3f} {unit} (mean {d['mean']:.3f})"

    share = ", ".join(f"{k.removesuffix('_s')} {v:.0%}" for k, v in s["step_time_share"].items())
    over_time = "  ".join(f"{t:.0f}s:{b:.2f}" for t, b in s["balancedness_over_time"])
    lines = [
        f"requests        {s['finished']}/{s['requests']} finished, {s['preemptions']} preemptions",
        f"simulated       {s['simulated_s']:.2f} s in {s['steps']} steps (wall {s['wall_s']:.1f} s)",
        f"throughput      {s['output_tok_per_s']:.0f} output tok/s, {s['total_tok_per_s']:.0f} total tok/s",
        f"TTFT            {pct(s['ttft_s'], 's')}",
        f"TPOT            {pct(s['tpot_ms'], 'ms')}",
        f"step            {pct(s['step_ms'], 'ms')}",
        f"step time       {share}",
        f"balancedness    {s['balancedness']:.3f} overall; over time {over_time}",
        f"rearrangements  {s['rearrangements']} ({s['slots_moved']} slots moved)",
    ]
    return "\n".join(lines)


# -- command line ---------------------------------------------------------------------------


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="maverick", help="maverick, scout or a tiny preset")
    p.add_argument("--hardware", default="h100", choices=sorted(HARDWARE))
    p.add_argument(
        "--attention", type=int, default=4, help="attention (data-parallel) ranks, one device each"
    )
    p.add_argument("--experts", type=int, default=12, help="expert workers, one device each")
    p.add_argument("--redundant", type=int, default=0, help="redundant slots per expert worker")
    p.add_argument("--weight-bytes", type=int, default=2, choices=(1, 2), help="2: bf16, 1: fp8")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--token-budget", type=int, default=8192)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--kv-blocks", type=int, default=None, help="per rank (default: what fits in memory)")
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument(
        "--arrival",
        default="poisson:20",
        help="constant:R poisson:R step:R0:R1:T ramp:R0:R1:T bursty:R0:R1:ON:PERIOD (requests/s)",
    )
    p.add_argument("--prompt", default="lognormal:1024:0.6", help="const:N uniform:A:B lognormal:MEAN:SIGMA")
    p.add_argument("--output", default="lognormal:256:0.6")
    p.add_argument("--max-len", type=int, default=16384, help="cap on prompt and output lengths")
    p.add_argument("--skew", type=float, default=1.2, help="Zipf exponent of expert popularity")
    p.add_argument("--skew-seed", type=int, default=0)
    p.add_argument("--reshuffle-every", type=float, default=None, help="new hot experts every S seconds")
    p.add_argument("--rebalance", action="store_true", help="re-plan the placement through RouterService")
    # SGLang re-plans every 1000 forward passes; vLLM keeps a 1000-step window (reference notes)
    p.add_argument("--window", type=int, default=1000, help="rebalance window (steps)")
    p.add_argument("--interval", type=int, default=1000, help="rebalance interval (steps)")
    p.add_argument("--report-every", type=int, default=50)
    p.add_argument("--imbalance-threshold", type=float, default=0.25)
    p.add_argument("--min-gain", type=float, default=0.05)
    p.add_argument("--shift-steps", type=int, default=8, help="newest steps tested for new hot experts")
    p.add_argument(
        "--shift-threshold", type=_number_or_off, default=3.0, help="x sampling noise; 'off': no shift test"
    )
    p.add_argument("--plan-seconds", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write the summary as JSON here")


def _number_or_off(text: str) -> float | None:
    if text == "off":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"need a number or 'off', got {text!r}") from None


def config_from_args(args: argparse.Namespace) -> SimConfig:
    policy = RebalanceConfig(
        enabled=args.rebalance,
        window_steps=args.window,
        interval_steps=args.interval,
        imbalance_threshold=args.imbalance_threshold,
        min_gain=args.min_gain,
        report_every=args.report_every,
        shift_steps=args.shift_steps,
        shift_threshold=args.shift_threshold,
    )
    return SimConfig(
        model=model_config(args.model),
        hardware=HARDWARE[args.hardware],
        precision=Precision(weight_bytes=args.weight_bytes),
        num_attention=args.attention,
        num_expert_workers=args.experts,
        redundant_slots_per_worker=args.redundant,
        scheduler=SchedulerConfig(args.max_num_seqs, args.token_budget),
        block_size=args.block_size,
        num_kv_blocks=args.kv_blocks,
        expert_skew=args.skew,
        skew_seed=args.skew_seed,
        reshuffle_every_s=args.reshuffle_every,
        rebalance=policy,
        plan_seconds=args.plan_seconds,
        seed=args.seed,
    )


def run_command(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    workload = make_workload(
        args.requests,
        ArrivalSpec.parse(args.arrival),
        LengthSpec.parse(args.prompt, args.max_len),
        LengthSpec.parse(args.output, args.max_len),
        args.seed,
    )
    result = simulate(cfg, workload)
    summary = result.summary()
    print(format_summary(summary))
    if args.json is not None:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m sim run ...` (the comparison with a real cluster is `python -m bench.sim_compare`)."""
    parser = argparse.ArgumentParser(prog="python -m sim", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    add_run_arguments(sub.add_parser("run", help="simulate a workload on a modelled GPU cluster"))
    add_tiers_arguments(sub.add_parser("tiers", help="elastic tiers against whole-replica autoscaling"))
    args = parser.parse_args(argv)
    try:
        return (tiers_command if args.command == "tiers" else run_command)(args)
    except ValueError as e:
        parser.exit(2, f"error: {e}\n")
