"""What an experiment writes: per variant the raw records, a binned time series and its plot;
for the scenario a summary table (Markdown, CSV, JSON) and a plot comparing the variants.

Results folder:

    scenario.yaml                 the scenario as run (re-run it with `llama4-ep experiment`)
    summary.md / .csv / .json     one row per variant
    comparison.png                the variants' time series side by side
    <variant>/requests.csv        every request: when sent, first token, finished, tokens, error
    <variant>/timeseries.csv      per bin: offered and achieved load, TTFT/TPOT percentiles,
                                  replicas, queue depth, KV usage, balancedness, placement version,
                                  workers per tier (live and desired, summed over replicas)
    <variant>/samples.jsonl       every raw sample of the deployment (per engine replica)
    <variant>/placement.json      replicas per expert and per layer at the end, per engine replica
    <variant>/timeseries.png      the time series

Latency percentiles of a bin are over the requests SENT in that bin (what a request arriving
then experienced); throughput counts replies FINISHED in the bin and output tokens as they
streamed (spread evenly between a request's first token and its last).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from bench.experiment.runner import RunResult
    from bench.experiment.scenario import Scenario

PERCENTILES = (50, 90, 99)
SAMPLE_COLUMNS = (
    "replicas_running",
    "replicas_starting",
    "in_flight",
    "engine_running",
    "engine_waiting",
    "kv_usage",
    "balancedness",
    "placement_version",
    "rearrangements",
    "max_replicas_per_expert",
    "attention_workers",
    "expert_workers",
    "attention_workers_desired",
    "expert_workers_desired",
    "workers",
)


def _pct(values: Sequence[float], p: float) -> float:
    v = np.asarray([x for x in values if x == x], dtype=np.float64)
    return float(np.percentile(v, p)) if v.size else math.nan


def timeseries(result: RunResult, bin_s: float) -> list[dict[str, Any]]:
    """One row per `bin_s` from the start of the load to the end of recording (pure)."""
    end = max(result.end_s, result.duration_s)
    n = max(1, math.ceil(end / bin_s - 1e-9))
    edges = np.arange(n + 1) * bin_s
    rows: list[dict[str, Any]] = [{"t_s": float(edges[i])} for i in range(n)]

    def index(t: float) -> int:
        return min(n - 1, max(0, int(t // bin_s)))

    offered, sent, done, failed = (np.zeros(n) for _ in range(4))
    tokens = np.zeros(n)
    ttft: list[list[float]] = [[] for _ in range(n)]
    tpot: list[list[float]] = [[] for _ in range(n)]
    for r in result.records:
        offered[index(r.scheduled_s)] += 1
        if r.sent_s == r.sent_s:
            sent[index(r.sent_s)] += 1
        if r.finished_s == r.finished_s:
            (done if r.ok else failed)[index(r.finished_s)] += 1
        if not r.ok:
            continue
        ttft[index(r.sent_s)].append(r.ttft_s * 1000.0)
        tpot[index(r.sent_s)].append(r.tpot_s * 1000.0)
        tokens[index(r.first_token_s)] += 1
        if r.output_tokens > 1:  # the rest spread evenly over (first token, finished]
            lo, hi = r.first_token_s, max(r.finished_s, r.first_token_s + 1e-9)
            overlap = np.clip(np.minimum(edges[1:], hi) - np.maximum(edges[:-1], lo), 0.0, None)
            tokens += (r.output_tokens - 1) * overlap / (hi - lo)
    by_bin: dict[int, Any] = {}
    for s in result.samples:  # the last sample of each bin stands for it
        by_bin[index(s.t_s)] = s.flat()
    last = None
    for i, row in enumerate(rows):
        row["offered_rps"] = offered[i] / bin_s
        row["sent_rps"] = sent[i] / bin_s
        row["achieved_rps"] = done[i] / bin_s
        row["failed"] = int(failed[i])
        row["output_tps"] = tokens[i] / bin_s
        for p in PERCENTILES:
            row[f"ttft_p{p}_ms"] = _pct(ttft[i], p)
        for p in PERCENTILES:
            row[f"tpot_p{p}_ms"] = _pct(tpot[i], p)
        last = by_bin.get(i, last)  # a bin without a sample repeats the one before
        for key in SAMPLE_COLUMNS:
            row[key] = last[key] if last is not None else math.nan
    return rows


def summarize(result: RunResult, scenario: Scenario) -> dict[str, Any]:
    """The variant's row of the summary table (pure)."""
    recs = result.records
    ok = [r for r in recs if r.ok]
    last_reply = max((r.finished_s for r in ok), default=math.nan)
    span = max(last_reply, result.duration_s) if ok else result.duration_s
    slo = scenario.slo
    good = [
        r
        for r in ok
        if (slo.ttft_ms is None or r.ttft_s * 1000 <= slo.ttft_ms)
        and (slo.tpot_ms is None or r.tpot_s != r.tpot_s or r.tpot_s * 1000 <= slo.tpot_ms)
    ]
    flats = [(s.t_s, s.flat()) for s in result.samples]
    in_load = [f for t, f in flats if t <= result.duration_s] or [f for _, f in flats]
    running = [(t, f["replicas_running"]) for t, f in flats]
    workers = [(t, f["workers"]) for t, f in flats]
    initial = running[0][1] if running else 0
    scale_up = next((t for t, n in running if n > initial), math.nan)
    out: dict[str, Any] = {
        "variant": result.run.name,
        "requests": len(recs),
        "completed": len(ok),
        "failed": len(recs) - len(ok),
        "offered_rps": len(recs) / result.duration_s,
        "achieved_rps": len(ok) / span,
        "output_tps": sum(r.output_tokens for r in ok) / span,
    }
    for name, values in (("ttft", [r.ttft_s for r in ok]), ("tpot", [r.tpot_s for r in ok])):
        out[f"{name}_mean_ms"] = _mean([v * 1000 for v in values])
        for p in PERCENTILES:
            out[f"{name}_p{p}_ms"] = _pct([v * 1000 for v in values], p)
    out["e2e_p99_ms"] = _pct([(r.finished_s - r.sent_s) * 1000 for r in ok], 99)
    if slo.ttft_ms is not None or slo.tpot_ms is not None:
        out["goodput_rps"] = len(good) / span
        out["slo_attainment"] = len(good) / len(recs) if recs else math.nan
    out.update(
        {
            "replicas_max": max((n for _, n in running), default=math.nan),
            "replica_seconds": _integral(running, result.end_s),
            "attention_workers_max": max((f["attention_workers"] for _, f in flats), default=math.nan),
            "expert_workers_max": max((f["expert_workers"] for _, f in flats), default=math.nan),
            "worker_seconds": _integral(_held(workers), result.end_s) if workers else math.nan,
            "first_scale_up_s": scale_up,
            "waiting_max": max((f["engine_waiting"] for _, f in flats), default=math.nan),
            "waiting_mean": _mean([f["engine_waiting"] for f in in_load]),
            "balancedness_mean": _mean([f["balancedness"] for f in in_load]),
            "placement_version_final": flats[-1][1]["placement_version"] if flats else math.nan,
            "rearrangements": flats[-1][1]["rearrangements"] if flats else math.nan,
            "deploy_s": result.deploy_s,
        }
    )
    return out


def _mean(values: Sequence[float]) -> float:
    v = [x for x in values if x == x]
    return sum(v) / len(v) if v else math.nan


def _held(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """A sample that missed the replicas' gauges (nan) keeps the value before it (0 at first)."""
    out, last = [], 0.0
    for t, v in points:
        last = v if v == v else last
        out.append((t, last))
    return out


def _integral(points: Sequence[tuple[float, float]], end: float) -> float:
    """Step-function integral of (t, value) samples up to `end` (replica-seconds)."""
    total = 0.0
    for (t, v), nxt in zip(points, [*points[1:], (end, 0.0)], strict=True):
        total += v * max(0.0, min(nxt[0], end) - t)
    return total


# -- files ----------------------------------------------------------------------------------


def write_run(result: RunResult, scenario: Scenario, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    _write_csv(folder / "requests.csv", result.records_as_dicts())
    rows = timeseries(result, scenario.sample_interval_s)
    _write_csv(folder / "timeseries.csv", rows)
    with open(folder / "samples.jsonl", "w") as f:
        for s in result.samples:
            f.write(json.dumps({"t_s": s.t_s, **{k: v for k, v in s.__dict__.items() if k != "t_s"}}) + "\n")
    final = result.samples[-1].engines if result.samples else []
    placement = {
        e.get("replica", str(i)): e.get("balancing", {}).get("replicas_per_expert")
        for i, e in enumerate(final)
    }
    (folder / "placement.json").write_text(json.dumps(placement, indent=1))
    plot_run(rows, result, folder / "timeseries.png")


def _layers_per_line(placement: dict[str, Any]) -> str:
    """JSON with one MoE layer's replica counts per line (readable, still plain JSON)."""
    parts = []
    for replica, layers in placement.items():
        body = "null" if layers is None else "[\n" + ",\n".join(f"  {json.dumps(x)}" for x in layers) + "\n ]"
        parts.append(f" {json.dumps(replica)}: {body}")
    return "{\n" + ",\n".join(parts) + "\n}\n"


def write_summary(results: Sequence[RunResult], scenario: Scenario, folder: Path) -> list[dict[str, Any]]:
    rows = [summarize(r, scenario) for r in results]
    _write_csv(folder / "summary.csv", rows)
    (folder / "summary.json").write_text(json.dumps(rows, indent=1))
    (folder / "summary.md").write_text(markdown_summary(rows, scenario))
    plot_comparison(results, scenario, folder / "comparison.png")
    return rows


def _write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    with open(path, "w", newline="") as f:
        if not rows:
            return
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        for row in rows:
            w.writerow({k: _fmt(v) for k, v in row.items()})


def _fmt(v: Any) -> Any:
    if isinstance(v, float):
        return "" if v != v else round(v, 4)
    return v


MARKDOWN_COLUMNS = (
    ("variant", "variant", "{}"),
    ("completed", "done", "{}"),
    ("failed", "failed", "{}"),
    ("offered_rps", "offered req/s", "{:.2f}"),
    ("achieved_rps", "achieved req/s", "{:.2f}"),
    ("output_tps", "output tok/s", "{:.1f}"),
    ("ttft_p50_ms", "TTFT p50 ms", "{:.0f}"),
    ("ttft_p99_ms", "TTFT p99 ms", "{:.0f}"),
    ("tpot_p50_ms", "TPOT p50 ms", "{:.0f}"),
    ("tpot_p99_ms", "TPOT p99 ms", "{:.0f}"),
    ("goodput_rps", "goodput req/s", "{:.2f}"),
    ("replicas_max", "replicas max", "{:g}"),
    ("replica_seconds", "replica-s", "{:.0f}"),
    ("attention_workers_max", "attention workers max", "{:g}"),
    ("expert_workers_max", "expert workers max", "{:g}"),
    ("worker_seconds", "worker-s", "{:.0f}"),
    ("first_scale_up_s", "scale-up at s", "{:.1f}"),
    ("waiting_max", "waiting max", "{:g}"),
    ("balancedness_mean", "balancedness", "{:.3f}"),
    ("rearrangements", "rearrangements", "{:g}"),
)


def markdown_summary(rows: Sequence[dict[str, Any]], scenario: Scenario) -> str:
    cols = [c for c in MARKDOWN_COLUMNS if any(c[0] in r for r in rows)]
    lines = [f"# {scenario.name}", ""]
    if scenario.description:
        lines += [scenario.description.strip(), ""]
    slo = scenario.slo
    if slo.ttft_ms is not None or slo.tpot_ms is not None:
        lines += [f"Goodput SLO: TTFT <= {slo.ttft_ms} ms, TPOT <= {slo.tpot_ms} ms.", ""]
    lines.append("| " + " | ".join(title for _, title, _ in cols) + " |")
    lines.append("|" + "---|" * len(cols))
    for r in rows:
        cells = []
        for key, _, fmt in cols:
            v = r.get(key, math.nan)
            cells.append("-" if isinstance(v, float) and v != v else fmt.format(v))
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Columns and files: see `bench/experiment/report.py`.", ""]
    return "\n".join(lines)


# -- plots ----------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _col(rows: Sequence[dict[str, Any]], key: str) -> np.ndarray:
    return np.asarray([r[key] for r in rows], dtype=np.float64)


def plot_run(rows: Sequence[dict[str, Any]], result: RunResult, path: Path) -> None:
    """Six panels over time: load, TTFT, TPOT, replicas with queue depth, workers per tier,
    expert balance."""
    plt = _pyplot()
    t = _col(rows, "t_s")
    fig, axes = plt.subplots(6, 1, figsize=(9, 15), sharex=True)
    load, ttft, tpot, scale, tiers, experts = axes
    _load_panel(load, t, rows)
    _percentile_panel(ttft, t, rows, "ttft")
    _percentile_panel(tpot, t, rows, "tpot")
    _replicas_panel(scale, t, rows)
    _tiers_panel(tiers, t, rows)
    _experts_panel(experts, t, rows)
    experts.set_xlabel("seconds from the start of the load")
    for ax in axes:
        ax.axvspan(0, result.duration_s, color="0.9", zorder=0)
        ax.grid(alpha=0.3)
    run = result.run
    fig.suptitle(
        f"{run.name}: {run.load.arrivals} for {run.load.duration_s:g} s\n{run.describe()}", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _load_panel(ax: Any, t: np.ndarray, rows: Sequence[dict[str, Any]]) -> None:
    ax.step(t, _col(rows, "offered_rps"), where="post", label="offered req/s")
    ax.step(t, _col(rows, "achieved_rps"), where="post", label="achieved req/s (replies)")
    failed = _col(rows, "failed")
    if failed.any():
        width = t[1] - t[0] if len(t) > 1 else 1
        ax.bar(t, failed, width=width, align="edge", alpha=0.3, color="red", label="failed")
    tok = ax.twinx()
    tok.plot(t, _col(rows, "output_tps"), color="gray", alpha=0.6, label="output tok/s")
    tok.set_ylabel("output tok/s")
    ax.set_ylabel("requests/s")
    ax.legend(loc="upper left", fontsize=8)


def _percentile_panel(ax: Any, t: np.ndarray, rows: Sequence[dict[str, Any]], name: str) -> None:
    for p in PERCENTILES:
        ax.plot(t, _col(rows, f"{name}_p{p}_ms"), marker=".", label=f"p{p}")
    ax.set_ylabel(f"{name.upper()} ms\n(by send time)")
    ax.legend(loc="upper left", fontsize=8)


def _replicas_panel(ax: Any, t: np.ndarray, rows: Sequence[dict[str, Any]]) -> None:
    running = _col(rows, "replicas_running")
    wanted = running + _col(rows, "replicas_starting")
    ax.step(t, running, where="post", label="engine replicas running", lw=2)
    ax.step(t, wanted, where="post", ls="--", label="running + starting")
    _integer_axis(ax, np.nanmax(np.r_[wanted, 1.0]))
    ax.set_ylabel("replicas")
    ax.legend(loc="upper left", fontsize=8)
    queue = ax.twinx()
    queue.plot(t, _col(rows, "engine_waiting"), color="C3", label="engine waiting (queue depth)")
    queue.plot(t, _col(rows, "in_flight"), color="C4", alpha=0.6, label="client in flight")
    queue.set_ylabel("requests")
    queue.legend(loc="upper right", fontsize=8)


def _tiers_panel(ax: Any, t: np.ndarray, rows: Sequence[dict[str, Any]]) -> None:
    top = 1.0
    for role, color in (("attention", "C0"), ("expert", "C1")):
        live, desired = _col(rows, f"{role}_workers"), _col(rows, f"{role}_workers_desired")
        ax.step(t, live, where="post", color=color, lw=2, label=f"{role} workers")
        ax.step(t, desired, where="post", color=color, ls="--", label=f"{role} desired")
        top = max(top, float(np.nanmax(np.r_[live, desired, 1.0])))
    _integer_axis(ax, top)
    ax.set_ylabel("workers\n(all replicas)")
    ax.legend(loc="upper left", fontsize=8)


def _experts_panel(ax: Any, t: np.ndarray, rows: Sequence[dict[str, Any]]) -> None:
    ax.plot(t, _col(rows, "balancedness"), label="balancedness (min over replicas)")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("mean / max tokens\nper expert worker")
    ax.legend(loc="lower left", fontsize=8)
    version = ax.twinx()
    version.step(t, _col(rows, "placement_version"), where="post", color="C2", label="placement version")
    version.set_ylabel("placement version")
    version.legend(loc="lower right", fontsize=8)


def _integer_axis(ax: Any, top: float) -> None:
    """Counts (replicas, requests): from 0, whole ticks, a little headroom."""
    ax.set_ylim(0, top + 0.5)
    ax.yaxis.get_major_locator().set_params(integer=True)


def plot_comparison(results: Sequence[RunResult], scenario: Scenario, path: Path) -> None:
    plt = _pyplot()
    panels = (
        ("achieved_rps", "achieved req/s"),
        ("ttft_p99_ms", "TTFT p99 ms"),
        ("tpot_p50_ms", "TPOT p50 ms"),
        ("replicas_running", "engine replicas"),
        ("attention_workers", "attention workers"),
        ("expert_workers", "expert workers"),
        ("in_flight", "requests in flight"),
        ("engine_waiting", "engine waiting"),
        ("balancedness", "balancedness"),
    )
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 2.2 * len(panels)), sharex=True)
    for result in results:
        rows = timeseries(result, scenario.sample_interval_s)
        t = _col(rows, "t_s")
        for ax, (key, _) in zip(axes, panels, strict=True):
            ax.plot(t, _col(rows, key), marker=".", label=result.run.name)
    for ax, (key, label) in zip(axes, panels, strict=True):
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if key in ("replicas_running", "attention_workers", "expert_workers", "engine_waiting"):
            _integer_axis(ax, max(ax.get_ylim()[1], 1.0))
    axes[0].legend(fontsize=8)
    axes[-1].set_xlabel("seconds from the start of the load")
    fig.suptitle(f"{scenario.name}: variants side by side", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
