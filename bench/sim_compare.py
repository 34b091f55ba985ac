"""The simulator against a real CPU `ClusterEngine`: same requests, same steps, priced steps.

`python -m bench.sim_compare` drives a real disaggregated cluster on Ray (tiny-maverick, one
attention rank, N expert workers, gloo) and the simulator with the same scheduler config and the
same arrivals (request i joins at step `arrival_step[i]`), then:

1. checks that both take the same number of steps and emit the same tokens at every step;
2. calibrates the CPU profile: matmul FLOP/s and memory bandwidth measured here, the fixed
   costs (per step, per collective, per layer, per sequence-layer, per active slot, per sampled
   row, wire bytes) fitted by non-negative least squares to the first run's step times;
3. prices every run with the calibrated profile and prints real against simulated step times.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import ray
import torch

from cluster.config import ClusterConfig
from cluster.engine import ClusterEngine
from engine.core import EngineConfig
from engine.request import SamplingParams
from engine.scheduler import SchedulerConfig
from model.synthetic import make_checkpoint
from router.balance import balancedness
from sim.cluster import SimCluster, SimConfig
from sim.costmodel import CPU_2CORE, CostModel, Hardware, Precision, RankBatch, StepCost
from sim.models import model_config

# With one attention rank and one model, per-step, per-collective and per-layer costs are all one
# constant per step ("step"); what grows with the world size is fitted per collective and peer.
TERMS = ("roofline", "step", "collective_peer", "slot")


@dataclass(frozen=True)
class Trace:
    """Requests by step: request i joins before step arrival_step[i] (ascending)."""

    arrival_step: tuple[int, ...]
    prompt_len: tuple[int, ...]
    output_len: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.arrival_step)

    def prompt_ids(self, i: int) -> list[int]:
        """Random token ids (fixed per request): identical tokens would all pick the same experts."""
        return np.random.default_rng(i).integers(0, 200000, self.prompt_len[i]).tolist()


def make_trace(num_requests: int, seed: int, last_arrival: int = 40, max_prompt: int = 120) -> Trace:
    rng = np.random.default_rng(seed)
    arrivals = np.sort(rng.integers(0, last_arrival + 1, num_requests))
    return Trace(
        tuple(arrivals.tolist()),
        tuple(rng.integers(4, max_prompt + 1, num_requests).tolist()),
        tuple(rng.integers(4, 41, num_requests).tolist()),
    )


@dataclass
class Run:
    step_seconds: list[float]
    tokens_per_step: list[int]  # tokens emitted (sampled) per step
    worker_rows: list[np.ndarray]  # [L_moe, W] per step
    expert_rows: np.ndarray | None = None  # [L_moe, E] over the run (real runs)


def drive(engine: object, trace: Trace, add: object, timed_step: object) -> int:
    """Add each request at its step, step until all are done; returns the number of steps. An
    idle engine skips to the next arrival (`ClusterEngine.step` does nothing without requests)."""
    step, i, n = 0, 0, len(trace)
    while i < n or engine.has_unfinished:
        if not engine.has_unfinished:
            step = max(step, trace.arrival_step[i])
        while i < n and trace.arrival_step[i] <= step:
            add(i)
            i += 1
        timed_step()
        step += 1
    return step


def run_real(
    model_dir: Path,
    trace: Trace,
    num_expert_workers: int,
    sched: SchedulerConfig,
    num_kv_blocks: int,
    block_size: int,
    repeats: int = 3,
) -> Run:
    """The trace `repeats` times over on one ClusterEngine (each pass starts from an idle engine,
    so each schedules the same steps); a step's time is its median over the passes."""
    cfg = EngineConfig(num_kv_blocks, block_size, sched.max_num_seqs, sched.token_budget, "float32")
    passes = []
    with ClusterEngine(model_dir, ClusterConfig(1, num_expert_workers), cfg) as engine:
        slots = engine.placement.slots_per_worker
        for k in range(repeats):
            run = Run([], [], [])

            def add(i: int, k: int = k) -> None:
                params = SamplingParams(max_tokens=trace.output_len[i], ignore_eos=True)
                engine.add(trace.prompt_ids(i), params, f"p{k}-r{i}")

            def timed_step(run: Run = run) -> None:
                t0 = time.perf_counter()
                outs = engine.step()
                run.step_seconds.append(time.perf_counter() - t0)
                run.tokens_per_step.append(sum(len(o.new_token_ids) for o in outs))
                result = engine.last_results[0]
                slot_load, expert_load = np.array(result.slot_load), np.array(result.expert_load)
                run.worker_rows.append(slot_load.reshape(slot_load.shape[0], -1, slots).sum(-1))
                run.expert_rows = expert_load if run.expert_rows is None else run.expert_rows + expert_load

            drive(engine, trace, add, timed_step)
            passes.append(run)
    first = passes[0]
    if any(p.tokens_per_step != first.tokens_per_step for p in passes):
        raise RuntimeError("the passes over the trace scheduled different steps")
    first.step_seconds = np.median([p.step_seconds for p in passes], axis=0).tolist()
    return first


class _Recorder:
    """Stands in for the simulator's cost model and keeps every step's inputs."""

    def __init__(self, cost: CostModel) -> None:
        self.cost = cost
        self.inputs: list[tuple[RankBatch, np.ndarray]] = []

    def step(self, batch: RankBatch, slot_rows: np.ndarray) -> StepCost:
        self.inputs.append((batch, slot_rows))
        return self.cost.step(batch, slot_rows)


def sim_config(
    num_expert_workers: int,
    sched: SchedulerConfig,
    num_kv_blocks: int,
    block_size: int,
    hw: Hardware = CPU_2CORE,
    shares: np.ndarray | None = None,
) -> SimConfig:
    return SimConfig(
        model=model_config("tiny-maverick"),
        hardware=hw,
        precision=Precision(4, 4, 4),  # the CPU engine runs float32
        num_attention=1,
        num_expert_workers=num_expert_workers,
        scheduler=sched,
        block_size=block_size,
        num_kv_blocks=num_kv_blocks,
        expert_skew=0.0,
        expert_shares=shares,  # the real run's measured popularity (uniform without one)
    )


def run_sim(trace: Trace, cfg: SimConfig) -> tuple[Run, _Recorder]:
    sim = SimCluster(cfg)
    recorder = _Recorder(sim.cost)
    sim.cost = recorder
    run = Run([], [], [])

    def timed_step() -> None:
        record = sim.step()
        run.step_seconds.append(record.cost.seconds)
        run.tokens_per_step.append(int(recorder.inputs[-1][0].samples.sum()))
        run.worker_rows.append(record.worker_rows)

    def add(i: int) -> None:
        sim.add(trace.prompt_len[i], trace.output_len[i], request_id=f"r{i}")

    drive(sim, trace, add, timed_step)
    return run, recorder


# -- calibration ------------------------------------------------------------------------------


def measure_cpu(reps: int = 20) -> tuple[float, float]:
    """(matmul FLOP/s, memory bytes/s) of this CPU in float32, on the shapes that dominate the
    tiny model: the lm_head matmul [16, 64] x [64, 202048], and a read of its weight."""
    torch.set_num_threads(1)  # as in the Ray workers (one CPU each or less: OMP_NUM_THREADS=1)
    w = torch.randn(202048, 64)
    x = torch.randn(16, 64)

    def best(fn: object) -> float:
        fn()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return float(np.median(times))

    flops = 2 * 16 * 64 * 202048 / best(lambda: x @ w.T)
    bandwidth = w.numel() * 4 / best(lambda: w.sum())
    return flops, bandwidth


def terms(cost: CostModel, batch: RankBatch, slot_rows: np.ndarray) -> np.ndarray:
    """The step's amount of each TERMS item: time = coefficients . amounts (one attention rank).
    The roofline amount is the matmul, attention and wire time at the profile's rates."""
    bare = replace(
        cost.hw,
        step_overhead_s=0.0,
        layer_overhead_s=0.0,
        seq_layer_overhead_s=0.0,
        slot_overhead_s=0.0,
        sample_overhead_s=0.0,
        intra_node_latency_s=0.0,
        inter_node_latency_s=0.0,
        peer_latency_s=0.0,
    )
    shape = cost.shape
    bare_cost = CostModel(shape, bare, cost.prec, cost.num_attention, cost.num_workers, cost.slots)
    num_moe = len(shape.moe_layers)
    active = (slot_rows.sum(0) > 0).reshape(num_moe, cost.num_workers, cost.slots).sum(-1)
    collectives = 1 + 3 * num_moe  # the step header, then counts, rows out, rows back per MoE layer
    peers = cost.num_attention + cost.num_workers - 1
    return np.array(
        [
            bare_cost.step(batch, slot_rows).seconds,
            1.0,
            float(collectives * peers),
            float(active.max(axis=1).sum()),
        ]
    )


def nnls(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """min |a x - b| with x >= 0 (active set: drop the most negative coefficient, refit)."""
    keep = np.ones(a.shape[1], dtype=bool)
    while True:
        x = np.zeros(a.shape[1])
        x[keep] = np.linalg.lstsq(a[:, keep], b, rcond=None)[0]
        if (x >= 0).all():
            return x
        keep[np.argmin(np.where(keep, x, np.inf))] = False


def robust_nnls(a: np.ndarray, b: np.ndarray, iterations: int = 20) -> np.ndarray:
    """`nnls` minimising the absolute error instead (iteratively reweighted): a step slowed down by
    another process on the shared box should not pull the constants."""
    x = nnls(a, b)
    floor = 1e-3 * float(np.median(np.abs(b)))
    for _ in range(iterations):
        w = 1.0 / np.sqrt(np.maximum(np.abs(a @ x - b), floor))
        x = nnls(a * w[:, None], b * w)
    return x


def calibrate(
    fits: list[tuple[CostModel, list[tuple[RankBatch, np.ndarray]], list[float]]],
    flops: float,
    bandwidth: float,
    skip: int = 3,
) -> Hardware:
    """A CPU profile: measured rates, fixed costs fitted to the step times of every (cost model,
    step inputs, real step seconds) in `fits` (each run's first `skip` steps, warm-up, left out)."""
    rows, seconds = [], []
    for cost, inputs, secs in fits:
        hw = replace(
            cost.hw,
            peak_flops=flops,
            flops_efficiency=1.0,
            mem_bandwidth=bandwidth,
            mem_efficiency=1.0,
            intra_node_bandwidth=bandwidth,  # loopback gloo: a memory copy (assumption)
            inter_node_bandwidth=bandwidth,
        )
        model = CostModel(cost.shape, hw, cost.prec, cost.num_attention, cost.num_workers, cost.slots)
        rows.append(np.stack([terms(model, b, s) for b, s in inputs])[skip:])
        seconds.append(np.array(secs)[skip:])
    coef = dict(zip(TERMS, robust_nnls(np.concatenate(rows), np.concatenate(seconds)), strict=True))
    print("fitted coefficients: " + ", ".join(f"{k} {v:.4g}" for k, v in coef.items()))
    scale = max(coef["roofline"], 1e-6)  # > 1: slower than the rates measured in isolation
    return replace(
        hw,
        name="cpu-calibrated",
        peak_flops=flops / scale,
        mem_bandwidth=bandwidth / scale,
        intra_node_bandwidth=hw.intra_node_bandwidth / scale,
        inter_node_bandwidth=hw.inter_node_bandwidth / scale,
        intra_node_latency_s=0.0,
        inter_node_latency_s=0.0,
        peer_latency_s=coef["collective_peer"],
        step_overhead_s=coef["step"],
        layer_overhead_s=0.0,
        seq_layer_overhead_s=0.0,
        slot_overhead_s=coef["slot"],
        sample_overhead_s=0.0,
    )


# -- the table --------------------------------------------------------------------------------


def _rows(name: str, real: Run, sim: Run, prefill: np.ndarray, skip: int) -> list[str]:
    """Table rows: all steps, decode-only steps, steps with prefill tokens (warm-up left out)."""
    same = "yes" if real.tokens_per_step == sim.tokens_per_step else "NO"
    head = (
        f"| {name} | {len(real.step_seconds)} / {len(sim.step_seconds)} | {sum(real.tokens_per_step)} / "
        f"{sum(sim.tokens_per_step)} | {same} "
    )
    out = []
    for kind, mask in (("all", np.ones_like(prefill)), ("decode", ~prefill), ("prefill", prefill)):
        keep = mask.copy()
        keep[:skip] = False
        r, s = np.array(real.step_seconds)[keep], np.array(sim.step_seconds)[keep]
        if r.size < 2:
            continue
        err = np.abs(s - r) / r
        out.append(
            f"{head if kind == 'all' else '| | | | '}| {kind} ({r.size}) | {r.sum():.2f} / {s.sum():.2f} | "
            f"{np.median(r) * 1e3:.1f} / {np.median(s) * 1e3:.1f} | {np.percentile(r, 90) * 1e3:.1f} / "
            f"{np.percentile(s, 90) * 1e3:.1f} | {np.median(err):.0%} | {np.corrcoef(r, s)[0, 1]:.2f} |"
        )
    return out


def _balance(rows: list[np.ndarray]) -> float:
    """Balancedness of a run's summed rows per (MoE layer, expert worker)."""
    return float(balancedness(torch.from_numpy(np.sum(rows, axis=0))))


def add_compare_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, default=None, help="tiny-maverick checkpoint (default: make one)")
    p.add_argument("--experts", type=int, nargs="+", default=[2, 4, 8], help="expert worker counts")
    p.add_argument("--fit", type=int, default=2, help="calibrate on the first FIT configurations")
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--max-num-seqs", type=int, default=16)
    p.add_argument("--token-budget", type=int, default=64)
    p.add_argument("--kv-blocks", type=int, default=1024)
    p.add_argument("--block-size", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip", type=int, default=3, help="warm-up steps left out of fit and errors")
    p.add_argument("--repeats", type=int, default=3, help="passes over each trace (median step time)")
    p.add_argument("--save", type=Path, default=None, help="write the real runs here (JSON)")
    p.add_argument("--load", type=Path, default=None, help="use real runs saved by --save (no Ray)")


def real_runs(args: argparse.Namespace, sched: SchedulerConfig) -> tuple[tuple[float, float], list]:
    """The CPU's rates (measured first, on the same box) and a (workers, trace, Run) per config."""
    rates = measure_cpu()
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model or make_checkpoint("tiny-maverick", Path(tmp) / "tiny-maverick", seed=0)
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
        try:
            for k, n in enumerate(args.experts):
                trace = make_trace(args.requests, args.seed + k)
                real = run_real(model_dir, trace, n, sched, args.kv_blocks, args.block_size, args.repeats)
                runs.append((n, trace, real))
        finally:
            ray.shutdown()
    return rates, runs


def save_runs(path: Path, rates: tuple[float, float], runs: list[tuple[int, Trace, Run]]) -> None:
    data = [
        {
            "num_expert_workers": n,
            "trace": [list(trace.arrival_step), list(trace.prompt_len), list(trace.output_len)],
            "step_seconds": real.step_seconds,
            "tokens_per_step": real.tokens_per_step,
            "worker_rows": [w.tolist() for w in real.worker_rows],
            "expert_rows": real.expert_rows.tolist(),
        }
        for n, trace, real in runs
    ]
    path.write_text(json.dumps({"cpu_flops_bandwidth": list(rates), "runs": data}))


def load_runs(path: Path) -> tuple[tuple[float, float], list[tuple[int, Trace, Run]]]:
    saved = json.loads(path.read_text())
    runs = []
    for d in saved["runs"]:
        trace = Trace(*(tuple(x) for x in d["trace"]))
        real = Run(
            d["step_seconds"],
            d["tokens_per_step"],
            [np.array(w) for w in d["worker_rows"]],
            np.array(d["expert_rows"]),
        )
        runs.append((d["num_expert_workers"], trace, real))
    return tuple(saved["cpu_flops_bandwidth"]), runs


def compare_command(args: argparse.Namespace) -> int:
    sched = SchedulerConfig(args.max_num_seqs, args.token_budget)
    (flops, bandwidth), runs = load_runs(args.load) if args.load else real_runs(args, sched)
    if args.save:
        save_runs(args.save, (flops, bandwidth), runs)
    print(f"measured: matmul {flops / 1e9:.1f} GFLOP/s, memory {bandwidth / 1e9:.1f} GB/s (float32)")

    def shares(real: Run) -> np.ndarray:
        return real.expert_rows / real.expert_rows.sum(axis=1, keepdims=True)

    fits = []
    for n, trace, real in runs[: args.fit]:
        _, recorder = run_sim(
            trace, sim_config(n, sched, args.kv_blocks, args.block_size, shares=shares(real))
        )
        fits.append((recorder.cost, recorder.inputs, real.step_seconds))
    hw = calibrate(fits, flops, bandwidth, args.skip)
    _print_profile(hw)
    print(
        "| run | steps real / sim | tokens real / sim | same tokens every step | steps | total s real / sim "
        "| median step ms real / sim | p90 step ms real / sim | median abs error | corr |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    balance = []
    for k, (n, trace, real) in enumerate(runs):
        sim, rec = run_sim(trace, sim_config(n, sched, args.kv_blocks, args.block_size, hw, shares(real)))
        prefill = np.array([float(b.tokens.sum()) > float(b.samples.sum()) for b, _ in rec.inputs])
        tag = "fit" if k < args.fit else "held out"
        print("\n".join(_rows(f"1 attention + {n} experts ({tag})", real, sim, prefill, args.skip)))
        balance.append((n, _balance(real.worker_rows), _balance(sim.worker_rows)))
    for n, real_b, sim_b in balance:
        print(f"balancedness, {n} expert workers: real router {real_b:.3f}, simulated {sim_b:.3f}")
    return 0


def _print_profile(hw: Hardware) -> None:
    def us(x: float) -> str:
        return f"{x * 1e6:.0f} us"

    print(
        f"calibrated: matmul {hw.flops / 1e9:.2f} GFLOP/s, memory {hw.bandwidth / 1e9:.2f} GB/s, "
        f"per step {us(hw.step_overhead_s)}, per collective and peer {us(hw.peer_latency_s)}, "
        f"per active slot {us(hw.slot_overhead_s)}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sim_compare", description=__doc__.split("\n")[0])
    add_compare_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return compare_command(args)
    except ValueError as e:
        parser.exit(2, f"error: {e}\n")


if __name__ == "__main__":
    sys.exit(main())
