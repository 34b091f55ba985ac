"""`llama4-ep bench replication`: what dynamic replication of hot experts buys, in one run.

One ClusterEngine (M attention + N expert workers with R redundant slots each) on a checkpoint
whose routers are Zipf-skewed serves a steady decode batch: `batch` requests always running,
each finished one replaced before the next step, so every step decodes about the same number of
tokens and step times are comparable. The phases run back to back on that engine and that
request stream, so the static map and the rebalanced one see the same checkpoint and requests:

1. warmup, then `static`: the initial map (one replica per expert, redundant slots round-robin);
   the rebalancer collects load but does not re-plan.
2. `settle`: re-planning on; the policy replicates and moves the hot experts.
3. `rebalanced`: steady state under the rebalanced map.
4. `shift1`, `shift2`, ...: the attention workers swap in the routers of the checkpoint made with
   another --skew-seed (same weights otherwise), so other experts are hot; the cluster re-plans.

Balancedness is mean / max tokens per expert worker, summed over a phase's steps from the slot
loads the attention workers measured (overall: sum over MoE layers of means / of maxes, as in
`router.balance.balancedness`). A step is "during a rearrangement" from the step a plan
request is in flight through the step that switches to the plan's map, for plans that moved
something; the steady steps are the others while re-planning is on.

"Steps to rebalance" after the hot experts change: the first step t from which the next
`probe` steps are balanced to within 95% of the `rebalanced` phase's balancedness over windows of
the same length. Short windows measure lower balancedness from sampling noise alone, so they
are compared with windows of the same length, never with the long phase's figure.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from cluster.config import ClusterConfig
from cluster.engine import ClusterEngine
from engine.core import EngineConfig
from engine.request import SamplingParams
from model.synthetic import default_checkpoint
from router.balance import balancedness as overall_balancedness
from router.balance import measured_worker_load
from router.rebalancing import RebalanceConfig

PRESET = "bench-maverick"  # 128 experts, hidden 256, 8 layers (4 MoE)
GOAL_BALANCEDNESS = 0.95
GOAL_P99_RATIO = 1.2
RECOVERED = 0.95  # "balanced again": probe windows at this fraction of the steady level


@dataclass(frozen=True)
class Phases:
    """Steps per phase (see the module docstring)."""

    warmup: int
    static: int
    settle: int
    rebalanced: int
    shift: int  # per change of the hot experts
    num_shifts: int

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if value < (0 if name in ("warmup", "num_shifts") else 1):
                raise ValueError(f"bench replication: {name} steps must be >= 1 (warmup, shifts >= 0)")


@dataclass(frozen=True)
class ReplicationSpec:
    phases: Phases
    policy: RebalanceConfig
    preset: str = PRESET
    expert_skew: float = 1.2
    skew_seed: int = 0
    shift_skew_seed: int = 1
    attention_workers: int = 1
    expert_workers: int = 8
    redundant_slots: int = 2
    batch: int = 32
    prompt_len: int = 16
    max_tokens: int = 128  # per request
    probe: int = 32  # steps per window of the rolling balancedness and of "steps to rebalance"
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("attention_workers", "expert_workers", "batch", "prompt_len", "max_tokens", "probe"):
            if getattr(self, name) < 1:
                raise ValueError(f"bench replication: {name} must be >= 1, got {getattr(self, name)}")
        if self.redundant_slots < 0:
            raise ValueError(f"bench replication: redundant slots must be >= 0, got {self.redundant_slots}")
        if self.probe > min(self.phases.rebalanced, self.phases.shift):
            raise ValueError(
                f"bench replication: probe ({self.probe} steps) must fit in the rebalanced and shift phases "
                f"({self.phases.rebalanced} and {self.phases.shift} steps)"
            )
        if self.skew_seed == self.shift_skew_seed and self.phases.num_shifts:
            raise ValueError("--shift-skew-seed must differ from --skew-seed, or the hot experts do not move")


FULL = ReplicationSpec(
    Phases(warmup=8, static=64, settle=96, rebalanced=192, shift=160, num_shifts=2),
    RebalanceConfig(window_steps=128, interval_steps=32, imbalance_threshold=0.25, min_gain=0.05),
    batch=64,
)
QUICK = replace(
    FULL,
    phases=Phases(warmup=4, static=16, settle=32, rebalanced=32, shift=40, num_shifts=1),
    policy=RebalanceConfig(window_steps=32, interval_steps=16, min_gain=0.1, report_every=4),
    batch=32,
    probe=8,
)


def skewed_checkpoint(preset: str, expert_skew: float, skew_seed: int, seed: int = 0) -> Path:
    """A random checkpoint with Zipf(expert_skew) routers, made once and cached (like
    `cli.main.default_checkpoint`). Checkpoints that differ only in skew_seed share every weight
    but the routers."""
    return default_checkpoint(preset, seed, expert_skew, skew_seed)


# -- driving the engine ---------------------------------------------------------------------------


@dataclass(frozen=True)
class StepRecord:
    phase: str
    seconds: float
    num_tokens: int  # tokens sampled this step
    worker_load: torch.Tensor  # int64 [L, W]: tokens per expert worker per MoE layer, measured
    version: int  # placement version the step used
    busy: bool  # a plan request or staging was in flight when the step began


class SteadyStream:
    """`batch` requests always running; a finished one is replaced before the next step. The first
    requests get staggered lengths, so finishes (and the prefills replacing them) spread evenly."""

    def __init__(self, engine, spec: ReplicationSpec) -> None:
        self.engine, self.spec = engine, spec
        self._prompts = torch.Generator().manual_seed(spec.seed)
        self._num_added = 0
        for i in range(spec.batch):
            self._add(max(1, (i + 1) * spec.max_tokens // spec.batch))

    def _add(self, max_tokens: int) -> None:
        prompt = torch.randint(0, 200000, (self.spec.prompt_len,), generator=self._prompts).tolist()
        # sampled, not greedy: random weights decode greedily into loops, which would route the
        # same few hidden states over and over
        params = SamplingParams(max_tokens, temperature=1.0, seed=self._num_added, ignore_eos=True)
        self.engine.add(prompt, params)
        self._num_added += 1

    def step(self) -> int:
        """One engine step; returns the tokens it sampled."""
        num_tokens = 0
        for out in self.engine.step():
            num_tokens += len(out.new_token_ids)
            if out.finished:
                self._add(self.spec.max_tokens)
        return num_tokens


def drive(engine, spec: ReplicationSpec, shift_dirs: list[Path]) -> list[StepRecord]:
    """Run every phase; router checkpoints in `shift_dirs` are swapped in, one per shift."""
    stream, rebalancer, records = SteadyStream(engine, spec), engine.rebalancer, []

    def run(phase: str, num_steps: int) -> None:
        print(f"bench replication: {phase}, {num_steps} steps", file=sys.stderr, flush=True)
        for _ in range(num_steps):
            busy = rebalancer.busy
            t0 = time.perf_counter()
            num_tokens = stream.step()
            seconds = time.perf_counter() - t0
            slot_load = torch.stack([r.slot_load for r in engine.last_results]).sum(0)
            load = measured_worker_load(slot_load, engine.placement.slots_per_worker)
            records.append(StepRecord(phase, seconds, num_tokens, load, engine.placement.version, busy))

    p = spec.phases
    rebalancer.metrics()  # wait for the router service's process, so no plan waits for it to start
    rebalancer.cfg = replace(spec.policy, enabled=False)  # the static map; load is still recorded
    run("warmup", p.warmup)
    run("static", p.static)
    rebalancer.cfg = spec.policy
    run("settle", p.settle)
    run("rebalanced", p.rebalanced)
    for i in range(p.num_shifts):
        engine.load_routers(shift_dirs[i % len(shift_dirs)])
        run(f"shift{i + 1}", p.shift)
    return records


# -- figures ---------------------------------------------------------------------------------------


def balancedness(records: list[StepRecord]) -> float:
    if not records:
        return float("nan")
    return float(overall_balancedness(torch.stack([r.worker_load for r in records]).sum(0)))


def rearranging(records: list[StepRecord]) -> list[bool]:
    """Per step: inside a run of busy steps that ends in a switch of maps (at or after the step)."""
    out, switch_ahead = [False] * len(records), False
    for k in reversed(range(len(records))):
        if k > 0 and records[k].version != records[k - 1].version:
            switch_ahead = True
        out[k] = switch_ahead and records[k].busy
        if not records[k].busy:
            switch_ahead = False
    return out


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return float(torch.quantile(torch.tensor(values, dtype=torch.float64), q / 100))


def probe_levels(records: list[StepRecord], probe: int) -> list[float]:
    """Balancedness of every window of `probe` consecutive steps (forward from each start)."""
    return [balancedness(records[t : t + probe]) for t in range(len(records) - probe + 1)]


def steps_to_rebalance(records: list[StepRecord], level: float, probe: int) -> int | None:
    """Steps from the first record until the next `probe` steps are balanced to `level`."""
    for t, value in enumerate(probe_levels(records, probe)):
        if value >= level:
            return t
    return None


def switched(records: list[StepRecord]) -> list[bool]:
    """Per step: it used another map than the step before it."""
    return [k > 0 and r.version != records[k - 1].version for k, r in enumerate(records)]


def phase_rows(records: list[StepRecord], during: list[bool]) -> dict[str, dict]:
    rows: dict[str, dict] = {}
    switches = switched(records)
    for phase in dict.fromkeys(r.phase for r in records):
        idx = [i for i, r in enumerate(records) if r.phase == phase]
        steps = [records[i] for i in idx]
        seconds = [r.seconds for r in steps]
        rows[phase] = {
            "steps": len(steps),
            "balancedness": balancedness(steps),
            "decode_tok_s": sum(r.num_tokens for r in steps) / max(sum(seconds), 1e-9),
            "step_p50_s": percentile(seconds, 50),
            "step_p99_s": percentile(seconds, 99),
            "rearranging_steps": sum(during[i] for i in idx),
            "map_switches": sum(switches[i] for i in idx),
        }
    return rows


def summarize(records: list[StepRecord], spec: ReplicationSpec, metrics: dict) -> dict:
    during = rearranging(records)
    rows = phase_rows(records, during)
    dynamic = [i for i, r in enumerate(records) if r.phase not in ("warmup", "static")]
    steady_s = [records[i].seconds for i in dynamic if not during[i]]
    during_s = [records[i].seconds for i in dynamic if during[i]]
    steady_probe = probe_levels([r for r in records if r.phase == "rebalanced"], spec.probe)
    level = RECOVERED * sum(steady_probe) / max(len(steady_probe), 1)

    def recovery(phase: str) -> int | None:
        return steps_to_rebalance([r for r in records if r.phase == phase], level, spec.probe)

    shifts = [f"shift{i + 1}" for i in range(spec.phases.num_shifts)]
    static, rebalanced = rows["static"], rows["rebalanced"]
    p99_steady, p99_during = percentile(steady_s, 99), percentile(during_s, 99)
    return {
        "balancedness_static": round(static["balancedness"], 4),
        "balancedness_rebalanced": round(rebalanced["balancedness"], 4),
        "balancedness_after_shift": [_round(_after_recovery(records, s, recovery(s))) for s in shifts],
        "decode_tok_s_static": round(static["decode_tok_s"], 2),
        "decode_tok_s_rebalanced": round(rebalanced["decode_tok_s"], 2),
        "steps_to_rebalance_initial": recovery("settle"),
        "steps_to_rebalance_after_shift": [recovery(s) for s in shifts],
        "recovered_level": round(level, 4),
        "step_p99_steady_s": _round(p99_steady),
        "step_p99_rearranging_s": _round(p99_during),
        "step_p99_ratio": round(p99_during / p99_steady, 3) if steady_s and during_s else None,
        "step_max_rearranging_s": _round(max(during_s, default=float("nan"))),
        "num_steady_steps": len(steady_s),
        "num_rearranging_steps": len(during_s),
        "rearrangements": metrics["rearrangements"],
        "load_shifts": metrics["load_shifts"],
        "stage_seconds_max": round(max(metrics["stage_seconds"], default=0.0), 4),
        "rearrangement_seconds_max": round(max(metrics["rearrangement_seconds"], default=0.0), 4),
        "replicas_per_expert_max": max(max(row) for row in metrics["replicas_per_expert"]),
        "phases": {k: {f: _round(v) for f, v in row.items()} for k, row in rows.items()},
    }


def _after_recovery(records: list[StepRecord], phase: str, steps: int | None) -> float:
    steps_in_phase = [r for r in records if r.phase == phase]
    return balancedness(steps_in_phase[steps if steps is not None else len(steps_in_phase) // 2 :])


def _round(value: float | int) -> float | int | None:
    """JSON has no NaN: an empty figure is null."""
    if isinstance(value, float):
        return None if value != value else round(value, 4)
    return value


# -- the run, the table, the plot --------------------------------------------------------------------


def run_replication_bench(spec: ReplicationSpec) -> tuple[dict, list[StepRecord]]:
    """Make (or reuse) both checkpoints, run every phase on one engine; figures and per-step records."""
    model = skewed_checkpoint(spec.preset, spec.expert_skew, spec.skew_seed)
    shifted = skewed_checkpoint(spec.preset, spec.expert_skew, spec.shift_skew_seed)
    cluster = ClusterConfig(
        spec.attention_workers, spec.expert_workers, spec.redundant_slots, rebalance=spec.policy
    )
    blocks_per_seq = 8 * (-(-(spec.prompt_len + spec.max_tokens) // 16) + 1)  # 8 layers, 16-token blocks
    engine_cfg = EngineConfig(
        num_kv_blocks=max(4096, 2 * spec.batch * blocks_per_seq),
        max_num_seqs=spec.batch,
        token_budget=max(512, spec.batch * (spec.prompt_len + 1)),
    )
    t0 = time.perf_counter()
    with ClusterEngine(model, cluster, engine_cfg) as engine:
        startup = time.perf_counter() - t0
        records = drive(engine, spec, [shifted, model])
        metrics = engine.rebalancer.metrics()
        placement = engine.placement
    figures = {
        "preset": spec.preset,
        "model": str(model),
        "num_moe_layers": placement.num_layers,
        "num_experts": placement.num_experts,
        "attention_workers": spec.attention_workers,
        "expert_workers": spec.expert_workers,
        "slots_per_worker": placement.slots_per_worker,
        "redundant_slots_per_worker": spec.redundant_slots,
        "expert_skew": spec.expert_skew,
        "skew_seeds": [spec.skew_seed, spec.shift_skew_seed],
        "batch": spec.batch,
        "max_tokens": spec.max_tokens,
        "probe_steps": spec.probe,
        "policy": asdict(spec.policy),
        "startup_s": round(startup, 2),
        **summarize(records, spec, metrics),
    }
    return figures, records


def print_table(f: dict) -> None:
    pol = f["policy"]
    print(
        f"replication: {f['preset']} ({f['num_experts']} experts x {f['num_moe_layers']} MoE layers), "
        f"skew {f['expert_skew']:g}, skew seeds {f['skew_seeds'][0]} -> {f['skew_seeds'][1]}; "
        f"{f['attention_workers']} attention + {f['expert_workers']} expert workers x "
        f"{f['slots_per_worker']} slots ({f['redundant_slots_per_worker']} redundant); batch {f['batch']}, "
        f"max_tokens {f['max_tokens']}"
    )
    print(
        f"policy: window {pol['window_steps']}, interval {pol['interval_steps']}, imbalance threshold "
        f"{pol['imbalance_threshold']}, min gain {pol['min_gain']}, report every {pol['report_every']} "
        f"steps, shift test {_shift_test(pol)}"
    )
    print(
        f"{'phase':<11} {'steps':>6} {'balancedness':>13} {'decode tok/s':>13} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'rearranging':>12} {'switches':>9}"
    )
    for name, r in f["phases"].items():
        print(
            f"{name:<11} {r['steps']:>6} {r['balancedness']:>13.3f} {r['decode_tok_s']:>13.1f} "
            f"{1000 * r['step_p50_s']:>8.0f} {1000 * r['step_p99_s']:>8.0f} {r['rearranging_steps']:>12} "
            f"{r['map_switches']:>9}"
        )
    print(
        f"balancedness {f['balancedness_static']:.3f} static -> {f['balancedness_rebalanced']:.3f} "
        f"rebalanced (goal >= {GOAL_BALANCEDNESS}); after each shift {f['balancedness_after_shift']}"
    )
    print(
        f"steps to rebalance (next {f['probe_steps']} steps >= {f['recovered_level']:.3f}): initial "
        f"{f['steps_to_rebalance_initial']}, after each shift {f['steps_to_rebalance_after_shift']}; "
        f"changes of the hot experts detected: {f['load_shifts']}"
    )
    print(
        f"step p99: steady {_ms(f['step_p99_steady_s'])} ({f['num_steady_steps']} steps), during "
        f"rearrangements {_ms(f['step_p99_rearranging_s'])} ({f['num_rearranging_steps']} steps, "
        f"{f['rearrangements']} rearrangements): ratio {f['step_p99_ratio']} (goal <= {GOAL_P99_RATIO})"
    )


def _shift_test(pol: dict) -> str:
    if pol.get("shift_threshold") is None:
        return "off"
    return f"newest {pol['shift_steps']} steps, threshold {pol['shift_threshold']:g}x noise"


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{1000 * seconds:.0f} ms"


def plot(records: list[StepRecord], figures: dict, path: Path) -> Path:
    """Three panels over steps: balancedness, each worker's share of routed tokens and step times,
    with phase boundaries, shifts of the hot experts and map switches marked."""
    import matplotlib  # lazy: the figures stand without the plot

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(12, 9), sharex=True)
    _plot_balance(axes[0], records, figures)
    _plot_shares(axes[1], records, figures["probe_steps"])
    _plot_step_times(axes[2], records)
    _mark_phases(records, axes)
    for ax in axes:
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    axes[0].set_title(
        f"{figures['preset']}, skew {figures['expert_skew']:g}, skew seeds {figures['skew_seeds']}: "
        f"{figures['attention_workers']} attention + {figures['expert_workers']} expert workers x "
        f"{figures['slots_per_worker']} slots, batch {figures['batch']}",
        fontsize=10,
    )
    axes[2].set_xlabel("step")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_balance(ax, records: list[StepRecord], figures: dict) -> None:
    probe = figures["probe_steps"]
    levels = probe_levels(records, probe)
    ax.plot([t + probe / 2 for t in range(len(levels))], levels, lw=1, label=f"rolling, {probe} steps")
    for name, row in figures["phases"].items():
        first = next(t for t, r in enumerate(records) if r.phase == name)
        if name != "warmup":
            ax.hlines(row["balancedness"], first, first + row["steps"], color="tab:blue", lw=3, alpha=0.5)
            ax.text(first + 1, row["balancedness"] + 0.02, f"{row['balancedness']:.2f}", fontsize=8)
    ax.plot([], [], color="tab:blue", lw=3, alpha=0.5, label="whole phase")
    ax.axhline(GOAL_BALANCEDNESS, color="tab:green", ls="--", lw=1, label=f"goal {GOAL_BALANCEDNESS}")
    ax.set_ylim(0, 1.08)
    ax.set_ylabel("balancedness\n(mean / max tokens per worker)")


def _plot_shares(ax, records: list[StepRecord], probe: int) -> None:
    loads = torch.stack([r.worker_load.sum(0) for r in records]).double()  # [T, W], all MoE layers
    kernel = torch.ones(1, 1, probe, dtype=torch.float64)
    rolling = torch.nn.functional.conv1d(loads.T[:, None], kernel).squeeze(1).T  # [T - probe + 1, W]
    share = rolling / rolling.sum(1, keepdim=True).clamp_min(1)
    centers = [t + probe / 2 for t in range(rolling.shape[0])]
    for w in range(share.shape[1]):
        ax.plot(centers, share[:, w].tolist(), lw=1, label=f"worker {w}")
    ax.axhline(1 / share.shape[1], color="black", ls="--", lw=1, label="even share")
    ax.set_ylabel(f"share of routed tokens\n(rolling {probe} steps)")


def _plot_step_times(ax, records: list[StepRecord]) -> None:
    during = rearranging(records)
    ax.plot([1000 * r.seconds for r in records], color="gray", lw=0.8, label="step")
    hits = [t for t in range(len(records)) if during[t]]
    ax.scatter(hits, [1000 * records[t].seconds for t in hits], color="tab:red", s=8, zorder=3,
               label="during a\nrearrangement")  # fmt: skip
    ax.set_ylim(bottom=0)
    ax.set_ylabel("step time (ms)")


def _mark_phases(records: list[StepRecord], axes) -> None:
    """Phase boundaries and names (shifts of the hot experts dashed); map switches as thin ticks."""
    for t in range(1, len(records)):
        r = records[t]
        if r.phase != records[t - 1].phase:
            style = {"color": "tab:purple", "ls": "--"} if r.phase.startswith("shift") else {"color": "k"}
            for ax in axes:
                ax.axvline(t, lw=1, alpha=0.6, **style)
            axes[0].text(t + 1, 0.03, r.phase, fontsize=8, color=style["color"])
        elif r.version != records[t - 1].version:
            axes[0].axvline(t, color="tab:orange", lw=0.6, alpha=0.5)
    axes[0].plot([], [], color="tab:orange", lw=0.6, label="map switch")


# -- command line -------------------------------------------------------------------------------------


def spec_from_args(args: argparse.Namespace) -> ReplicationSpec:
    base = QUICK if args.quick else FULL
    knobs = {
        "window_steps": args.window,
        "interval_steps": args.interval,
        "imbalance_threshold": args.threshold,
        "min_gain": args.min_gain,
        "report_every": args.report_every,
        "shift_steps": args.shift_steps,
    }
    policy = replace(base.policy, **{k: v for k, v in knobs.items() if v is not None})
    threshold = args.shift_threshold
    if threshold is not None:
        policy = replace(policy, shift_threshold=None if threshold == "off" else threshold)
    phases = base.phases
    if args.steps:
        try:
            phases = Phases(*(int(v) for v in args.steps.split(",")))
        except (TypeError, ValueError) as e:
            raise ValueError(
                f"--steps {args.steps!r}: need 6 integers, warmup,static,settle,rebalanced,"
                f"shift,num_shifts ({e})"
            ) from None
    fields = (
        "preset", "expert_skew", "skew_seed", "shift_skew_seed", "attention_workers", "expert_workers",
        "redundant_slots", "batch", "max_tokens", "probe",
    )  # fmt: skip
    given = {k: getattr(args, k) for k in fields if getattr(args, k, None) is not None}
    return replace(base, phases=phases, policy=policy, **given)


def cmd_replication(args: argparse.Namespace) -> int:
    spec = spec_from_args(args)
    figures, records = run_replication_bench(spec)
    print_table(figures)
    try:
        figures["plot"] = str(plot(records, figures, args.plot))
        print(f"plot: {figures['plot']}")
    except ImportError as e:  # the figures stand without the picture
        figures["plot"] = None
        print(f"no plot ({e}; pip install matplotlib)")
    print(json.dumps(figures))
    return 0
