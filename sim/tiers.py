"""Elastic tiers against whole-replica autoscaling, simulated: GPUs held against SLO attainment.

    python -m sim tiers            # a diurnal and a bursty load over 600 simulated seconds

Every policy serves the same requests on the simulated clock (`sim.cluster`: the engine's own
scheduler, KV manager and router on the cost model):

- `fixed-N`: N replicas of one engine of `attention + experts` GPUs, always there.
- `serve`: replicas of that engine added and removed as Ray Serve's default autoscaling policy
  does: ongoing requests averaged over `look_back_s`, divided by `target_ongoing_requests`,
  rounded up, held for `upscale_delay_s` / `downscale_delay_s` (`serve_decide`). A new replica
  holds its GPUs from the decision and serves once every worker has started and loaded its
  weights (`ResizeCosts`); requests go to the ready replica with the fewest ongoing; a removed
  replica takes no new requests and holds its GPUs until it has finished its own.
- `tiers`: one engine whose tiers `engine.autoscale.TierAutoscaler` sizes (the code a Serve
  replica runs, not a copy), fed from the simulated steps through its `TierWindow` and resizing
  as `sim.elastic` does (new workers start and load, leaving ranks drain).

A GPU is held by one worker; worker-seconds are summed over everything held, including workers
that start or drain. The figures are the cost model's (docs/simulator.md), not measurements.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from engine.autoscale import AutoscalerConfig, TierAutoscaler, TierBounds
from engine.scheduler import SchedulerConfig
from sim.cluster import RequestTimes, SimCluster, SimConfig
from sim.costmodel import GB, HARDWARE, Precision
from sim.elastic import ElasticCluster, ResizeCosts
from sim.models import Shape, model_config
from sim.workload import ArrivalSpec, LengthSpec, Workload

# -- Serve's replica policy -----------------------------------------------------------------


@dataclass(frozen=True)
class ServePolicy:
    """Ray Serve's `autoscaling_config` fields that its default policy reads."""

    min_replicas: int = 1
    max_replicas: int = 4
    target_ongoing_requests: float = 256.0
    upscale_delay_s: float = 5.0
    downscale_delay_s: float = 30.0
    look_back_s: float = 10.0
    interval_s: float = 1.0

    def __post_init__(self) -> None:
        if not 1 <= self.min_replicas <= self.max_replicas or self.target_ongoing_requests <= 0:
            raise ValueError(f"need 1 <= min_replicas <= max_replicas and target > 0, got {self}")


@dataclass(frozen=True)
class ServeState:
    want: int = 0  # the direction held since `since_s`
    since_s: float = 0.0


def serve_decide(
    p: ServePolicy, ongoing: float, current: int, now: float, s: ServeState
) -> tuple[int, ServeState]:
    """Replicas to have: ceil(ongoing / target) within the bounds, once the direction has held
    for its delay (then in one jump, as Serve does)."""
    desired = max(p.min_replicas, min(p.max_replicas, math.ceil(ongoing / p.target_ongoing_requests)))
    direction = (desired > current) - (desired < current)
    if direction == 0:
        return current, ServeState(0, now)
    if s.want != direction:
        return current, ServeState(direction, now)
    delay = p.upscale_delay_s if direction > 0 else p.downscale_delay_s
    return (desired, ServeState(0, now)) if now - s.since_s >= delay else (current, s)


# -- one run --------------------------------------------------------------------------------


@dataclass
class PolicyRun:
    """One policy on one load: every request, and what it held over time."""

    policy: str
    load: str
    requests: list[RequestTimes]
    held: list[tuple[float, int]]  # (time, GPUs held from then on)
    sizes: list[tuple[float, int, int]]  # (time, attention ranks, expert workers), all replicas
    wall_s: float = 0.0

    @property
    def end_s(self) -> float:
        return max((r.finish_s for r in self.requests if r.finish_s is not None), default=0.0)

    def worker_seconds(self) -> float:
        points = [*self.held, (self.end_s, 0)]
        spans = zip(points[:-1], points[1:], strict=True)
        return float(sum(n * max(0.0, t1 - t0) for (t0, n), (t1, _) in spans))

    def summary(self, ttft_s: float, tpot_s: float) -> dict:
        done = [r for r in self.requests if r.finish_s is not None]
        ttft = np.array([r.first_token_s - r.arrival_s for r in done])
        tpot = np.array([(r.finish_s - r.first_token_s) / max(r.output_len - 1, 1) for r in done])
        good = (ttft <= ttft_s) & (tpot <= tpot_s)
        span = max(self.end_s, 1e-9)
        ws = self.worker_seconds()

        def pct(x: np.ndarray, q: float) -> float:
            return float(np.percentile(x, q)) if x.size else math.nan

        return {
            "policy": self.policy,
            "load": self.load,
            "requests": len(self.requests),
            "finished": len(done),
            "gpu_hours": ws / 3600,
            "gpus_mean": ws / span,
            "gpus_max": max(n for _, n in self.held),
            "slo_attainment": float(good.mean()) if done else math.nan,
            "ttft_ok": float((ttft <= ttft_s).mean()) if done else math.nan,
            "tpot_ok": float((tpot <= tpot_s).mean()) if done else math.nan,
            "goodput_rps": float(good.sum()) / span,
            "ttft_p50_s": pct(ttft, 50),
            "ttft_p99_s": pct(ttft, 99),
            "tpot_p50_ms": pct(tpot, 50) * 1e3,
            "tpot_p99_ms": pct(tpot, 99) * 1e3,
            "resizes": len(self.sizes) - 1,
            "wall_s": self.wall_s,
        }


def run_tiers(
    cfg: SimConfig, auto: AutoscalerConfig, costs: ResizeCosts, workload: Workload, load: str = ""
) -> tuple[PolicyRun, ElasticCluster, TierAutoscaler]:
    """One engine, its tiers sized by the tier autoscaler every `auto.interval_s` simulated seconds."""
    t0 = time.perf_counter()
    sim, scaler = ElasticCluster(cfg, costs), TierAutoscaler(auto)
    num_moe = len(sim.shape.moe_layers)
    arrival, prompt, output = workload.arrival_s, workload.prompt_len, workload.output_len
    i, n, next_tick = 0, len(workload), auto.interval_s
    while i < n or sim.has_unfinished:
        if not sim.has_unfinished and arrival[i] > sim.now:  # idle: on to the next event
            ready = sim.pending.ready_s if sim.pending is not None else math.inf
            sim.now = max(sim.now, min(float(arrival[i]), next_tick, ready))
            sim.maybe_switch()
        else:
            while i < n and arrival[i] <= sim.now:
                sim.add(int(prompt[i]), int(output[i]), float(arrival[i]))
                i += 1
            step = sim.step()
            scaler.window.add_step(
                float(step.worker_rows.sum()), num_moe, sim.kv_usage_busiest(), step.num_waiting
            )
        while next_tick <= sim.now:
            decision = scaler.tick(next_tick, *sim.sizes, resizing=sim.resizing)
            if decision is not None:
                sim.resize(decision.num_attention, decision.num_expert)
            next_tick += auto.interval_s
    sizes = [(0.0, cfg.num_attention, cfg.num_expert_workers)]
    sizes += [(r.switched_s, *r.after) for r in sim.resizes]
    run = PolicyRun("tiers", load, list(sim.requests.values()), sim.held, sizes, time.perf_counter() - t0)
    return run, sim, scaler


@dataclass
class _Replica:
    sim: SimCluster
    ready_s: float
    leaving: bool = False
    stopped: bool = False


@dataclass
class _Fleet:
    """Serve's side: the replicas, the ongoing-request samples, the GPUs held."""

    cfg: SimConfig
    policy: ServePolicy
    start_s: float  # a new replica's seconds from the decision to serving
    replicas: list[_Replica] = field(default_factory=list)
    samples: list[tuple[float, int]] = field(default_factory=list)
    held: list[tuple[float, int]] = field(default_factory=list)
    state: ServeState = field(default_factory=ServeState)

    @property
    def gpus_per_replica(self) -> int:
        return self.cfg.num_attention + self.cfg.num_expert_workers

    def add(self, now: float, ready_s: float) -> None:
        seed = self.cfg.seed + len(self.replicas)  # replicas draw their routing independently
        self.replicas.append(_Replica(SimCluster(replace(self.cfg, seed=seed)), ready_s))
        self._record(now)

    def _record(self, now: float) -> None:
        self.held.append((now, self.gpus_per_replica * sum(not r.stopped for r in self.replicas)))

    def live(self) -> list[_Replica]:
        return [r for r in self.replicas if not r.leaving and not r.stopped]

    def route(self, now: float) -> _Replica:
        ready = [r for r in self.live() if r.ready_s <= now]
        return min(ready, key=lambda r: r.sim.num_unfinished)

    def tick(self, now: float) -> None:
        """Serve's controller: sample, decide, add or remove replicas."""
        self.samples.append((now, sum(r.sim.num_unfinished for r in self.replicas if not r.stopped)))
        window = [x for t, x in self.samples if t > now - self.policy.look_back_s]
        live = self.live()
        want, self.state = serve_decide(self.policy, float(np.mean(window)), len(live), now, self.state)
        for _ in range(want - len(live)):
            self.add(now, now + self.start_s)
        surplus = max(0, len(live) - want)
        for r in sorted(live, key=lambda r: (r.ready_s <= now, r.sim.num_unfinished))[:surplus]:
            r.leaving = True  # a starting one goes first, then the least busy
        self.stop_drained(now)

    def stop_drained(self, now: float) -> None:
        changed = False
        for r in self.replicas:
            if r.leaving and not r.stopped and not r.sim.has_unfinished:
                r.stopped, changed = True, True
        if changed:
            self._record(now)


def replica_start_s(cfg: SimConfig, costs: ResizeCosts) -> float:
    """A new replica serves once its slowest worker has started and loaded its weights."""
    shape = Shape.of(cfg.model)
    slots = math.ceil(shape.num_experts / cfg.num_expert_workers) + cfg.redundant_slots_per_worker
    expert_bytes = len(shape.moe_layers) * slots * shape.expert_params
    nbytes = max(shape.non_expert_params, expert_bytes) * cfg.precision.weight_bytes
    return costs.worker_start_s + nbytes / costs.load_bandwidth


def run_serve(
    cfg: SimConfig,
    policy: ServePolicy,
    costs: ResizeCosts,
    workload: Workload,
    load: str = "",
    name: str = "",
) -> PolicyRun:
    """Replicas of one fixed-size engine, scaled by `serve_decide` every `policy.interval_s`."""
    t0 = time.perf_counter()
    fleet = _Fleet(cfg, policy, replica_start_s(cfg, costs))
    for _ in range(policy.min_replicas):
        fleet.add(0.0, 0.0)
    arrival, prompt, output = workload.arrival_s, workload.prompt_len, workload.output_len
    i, n, next_tick = 0, len(workload), policy.interval_s
    while True:
        busy = [r for r in fleet.replicas if r.sim.has_unfinished]
        step_at = min((r.sim.now for r in busy), default=math.inf)
        arrive_at = float(arrival[i]) if i < n else math.inf
        if step_at == arrive_at == math.inf:
            break
        if arrive_at <= step_at and arrive_at <= next_tick:
            r = fleet.route(arrive_at)
            r.sim.now = max(r.sim.now, arrive_at)  # an idle replica waits for it
            r.sim.add(int(prompt[i]), int(output[i]), arrive_at, request_id=f"req-{i}")
            i += 1
        elif next_tick <= step_at:
            if policy.min_replicas != policy.max_replicas:
                fleet.tick(next_tick)
            next_tick += policy.interval_s
        else:
            r = min(busy, key=lambda r: r.sim.now)
            r.sim.step()
            if r.leaving and not r.sim.has_unfinished:
                fleet.stop_drained(r.sim.now)
    requests = [t for r in fleet.replicas for t in r.sim.requests.values()]
    per = fleet.gpus_per_replica
    sizes = [
        (t, held // per * cfg.num_attention, held // per * cfg.num_expert_workers) for t, held in fleet.held
    ]
    label = name or (
        "serve" if policy.min_replicas != policy.max_replicas else f"fixed-{policy.min_replicas}"
    )
    return PolicyRun(label, load, requests, fleet.held, sizes, time.perf_counter() - t0)


# -- the comparison and its command line ----------------------------------------------------


def workload_for(
    arrival: ArrivalSpec, duration_s: float, prompt: LengthSpec, output: LengthSpec, seed: int
) -> Workload:
    """Every arrival in [0, duration_s) (the policies are compared over a time, not a count)."""
    rng = np.random.default_rng(seed)
    times = arrival.times_within(duration_s, rng)
    return Workload(times, prompt.sample(len(times), rng), output.sample(len(times), rng))


COLUMNS = (
    ("policy", "policy", "{}"),
    ("load", "load", "{}"),
    ("finished", "requests", "{}"),
    ("gpu_hours", "GPU-hours", "{:.2f}"),
    ("gpus_mean", "GPUs mean", "{:.1f}"),
    ("gpus_max", "GPUs max", "{}"),
    ("slo_attainment", "SLO met", "{:.1%}"),
    ("ttft_ok", "TTFT ok", "{:.1%}"),
    ("tpot_ok", "TPOT ok", "{:.1%}"),
    ("goodput_rps", "goodput req/s", "{:.1f}"),
    ("ttft_p99_s", "TTFT p99 s", "{:.2f}"),
    ("tpot_p50_ms", "TPOT p50 ms", "{:.1f}"),
    ("tpot_p99_ms", "TPOT p99 ms", "{:.1f}"),
    ("resizes", "resizes", "{}"),
)


def format_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(title for _, title, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        lines.append("| " + " | ".join(fmt.format(r[key]) for key, _, fmt in COLUMNS) + " |")
    return "\n".join(lines)


def format_sizes(rows: list[dict], most: int = 24) -> str:
    """Workers per tier over time, one line per run: `t s attention+expert` at every change."""
    lines = ["", "attention ranks + expert workers over time (all replicas):"]
    for r in rows:
        points = [f"{t:.0f}s {m}+{w}" for t, m, w in r["sizes"]]
        more = f", ... ({len(points) - most} more)" if len(points) > most else ""
        lines.append(f"  {r['policy']} {r['load']}: " + ", ".join(points[:most]) + more)
    return "\n".join(lines)


def add_tiers_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="maverick")
    p.add_argument("--hardware", default="h100", choices=sorted(HARDWARE))
    p.add_argument("--weight-bytes", type=int, default=1, choices=(1, 2), help="1: fp8 (default), 2: bf16")
    p.add_argument(
        "--attention", type=int, default=4, help="attention ranks of one replica (and the tiers' floor)"
    )
    p.add_argument(
        "--experts", type=int, default=12, help="expert workers of one replica (and the tiers' floor)"
    )
    p.add_argument("--max-replicas", type=int, default=4, help="Serve's ceiling; the tiers' is the same GPUs")
    p.add_argument(
        "--load", action="append", help="arrivals (repeatable); default a diurnal and a bursty load"
    )
    p.add_argument("--duration", type=float, default=600.0, help="simulated seconds of arrivals")
    p.add_argument("--prompt", default="lognormal:1024:0.5")
    p.add_argument("--output", default="lognormal:96:0.5")
    p.add_argument("--max-len", type=int, default=8192)
    p.add_argument("--max-num-seqs", type=int, default=128, help="per attention rank")
    p.add_argument(
        "--token-budget", type=int, default=2048, help="tokens per step per rank (chunked prefill)"
    )
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--kv-blocks", type=int, default=None, help="per rank (default: what fits in memory)")
    p.add_argument("--ttft-slo", type=float, default=2.0, help="seconds")
    p.add_argument("--tpot-slo", type=float, default=40.0, help="milliseconds")
    p.add_argument("--target-ongoing", type=float, default=40.0, help="Serve: ongoing requests per replica")
    p.add_argument(
        "--target-tokens", type=float, default=50.0, help="tiers: routed tokens per step per expert worker"
    )
    p.add_argument("--target-kv", type=float, default=0.04, help="tiers: the busiest rank's KV usage")
    p.add_argument("--upscale-delay", type=float, default=5.0, help="both autoscalers")
    p.add_argument("--downscale-delay", type=float, default=30.0, help="both autoscalers")
    p.add_argument("--worker-start", type=float, default=10.0, help="seconds before a new worker loads")
    p.add_argument("--load-gbps", type=float, default=5.0, help="GB/s a new worker loads its weights at")
    p.add_argument(
        "--policies", default="fixed-min,serve,tiers", help="of fixed-min, fixed-max, serve, tiers"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write the rows and the sizes over time here")


def tiers_command(args: argparse.Namespace) -> int:
    loads = args.load or [f"diurnal:4:36:{args.duration:g}", f"bursty:6:30:60:{args.duration / 3:g}"]
    cfg = SimConfig(
        model=model_config(args.model),
        hardware=HARDWARE[args.hardware],
        precision=Precision(weight_bytes=args.weight_bytes),
        num_attention=args.attention,
        num_expert_workers=args.experts,
        scheduler=SchedulerConfig(args.max_num_seqs, args.token_budget),
        block_size=args.block_size,
        num_kv_blocks=args.kv_blocks,
        seed=args.seed,
    )
    costs = ResizeCosts(args.worker_start, args.load_gbps * GB)
    up, down = args.upscale_delay, args.downscale_delay
    serve = ServePolicy(1, args.max_replicas, args.target_ongoing, up, down)
    auto = AutoscalerConfig(
        enabled=True,
        attention=TierBounds(args.attention, args.attention * args.max_replicas),
        expert=TierBounds(args.experts, min(args.experts * args.max_replicas, cfg.model.num_local_experts)),
        target_tokens_per_expert_worker=args.target_tokens,
        target_kv_usage=args.target_kv,
        upscale_delay_s=up,
        downscale_delay_s=down,
        cooldown_s=up,
    )
    policies = args.policies.split(",")
    rows = []
    for text in loads:
        wl = workload_for(
            ArrivalSpec.parse(text),
            args.duration,
            LengthSpec.parse(args.prompt, args.max_len),
            LengthSpec.parse(args.output, args.max_len),
            args.seed,
        )
        for name in policies:
            if name == "tiers":
                run = run_tiers(cfg, auto, costs, wl, text)[0]
            elif name in ("serve", "fixed-min", "fixed-max"):
                k = {"fixed-min": 1, "fixed-max": args.max_replicas}.get(name)
                policy = serve if k is None else replace(serve, min_replicas=k, max_replicas=k)
                run = run_serve(cfg, policy, costs, wl, text)
            else:
                raise ValueError(f"unknown policy {name!r} (allowed: fixed-min, fixed-max, serve, tiers)")
            rows.append(run.summary(args.ttft_slo, args.tpot_slo / 1e3))
            rows[-1]["sizes"] = [[round(t, 2), m, w] for t, m, w in run.sizes]
            print(f"  {run.policy:9s} {text}: {len(wl)} requests, wall {run.wall_s:.0f} s", flush=True)
    print(format_table(rows))
    print(format_sizes(rows))
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0
