"""`llama4-ep bench overhead`: the time per decode step outside the model's math.

A step's wall time splits into the model's math (the decoder's forward over the step's tokens and
the lm_head: `Llama4Decoder.forward` and `.logits`, timed inside the single-process engine) and
everything else: scheduling, the per-step metadata (`build_batch`), logits processing and
sampling, output bookkeeping and detokenizing, and in the cluster Ray calls and the
attention/expert hops. The cluster's overhead is its step time minus the single-process
engine's math time at the same batch, measured in the same run (the math is the same). It then
splits once more: the attention rank's own step (from its call arriving to its result: its math,
scheduling and the exchanges with the expert workers) and the rest, the Ray call there and back
and the driver's work between steps.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from bench.decode import BENCH_PRESET, _prompts
from cluster.config import ClusterConfig
from cluster.engine import ClusterEngine
from engine.core import EngineConfig
from engine.llm_engine import LLMEngine
from engine.protocol import Engine
from engine.request import SamplingParams
from model.synthetic import default_checkpoint


class TimedDecoder:
    """Delegates to a decoder and adds up the seconds spent in `forward` and `logits`."""

    def __init__(self, decoder: Any) -> None:
        self._decoder = decoder
        self.math_s = 0.0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._decoder, name)

    def forward(self, *args: Any) -> torch.Tensor:
        return self._timed(self._decoder.forward, *args)

    def logits(self, *args: Any) -> torch.Tensor:
        return self._timed(self._decoder.logits, *args)

    def _timed(self, fn: Any, *args: Any) -> torch.Tensor:
        t0 = time.perf_counter()
        out = fn(*args)
        self.math_s += time.perf_counter() - t0
        return out


def decode_steps(
    engine: Engine, prompts: list[list[int]], new_tokens: int, timer: TimedDecoder | None
) -> dict[str, list[float]]:
    """Per decode step (the prefill step left out): wall seconds, math seconds where timed, and
    for the cluster the slowest attention rank's own step (from its call arriving to its result)."""
    for prompt in prompts:
        engine.add(prompt, SamplingParams(max_tokens=new_tokens, ignore_eos=True))
    engine.step()  # prefill (the prompts fit one step's token budget)
    walls, maths, ranks = [], [], []
    while engine.has_unfinished:
        before = timer.math_s if timer else 0.0
        t0 = time.perf_counter()
        engine.step()
        walls.append(time.perf_counter() - t0)
        maths.append(timer.math_s - before if timer else 0.0)
        if isinstance(engine, ClusterEngine):
            ranks.append(max(r.seconds for r in engine.last_results))
    return {"wall_s": walls, "math_s": maths, "rank_s": ranks}


def _row(walls: Sequence[float], math_s: float, ranks: Sequence[float] = ()) -> dict[str, float]:
    wall = statistics.median(walls)
    row = {"step_ms": wall * 1e3, "math_ms": math_s * 1e3, "overhead_ms": (wall - math_s) * 1e3}
    if ranks:
        row["rank_step_ms"] = statistics.median(ranks) * 1e3
    return row


def measure(
    model: Path,
    batch: int,
    new_tokens: int,
    prompt_len: int,
    expert_workers: int,
    reps: int,
    transports: Sequence[str] = ("auto",),
) -> dict[str, dict[str, float]]:
    """Median step, math and overhead (ms) of the single-process engine, and of the cluster
    (1 attention worker + `expert_workers`; 0 skips it) once per transport, fastest of `reps`
    runs each; keyed by their JSON prefix (engine, cluster for the default transport,
    cluster_collective), each with its table name."""
    prompts = _prompts(batch, prompt_len)
    cfg = EngineConfig(token_budget=max(512, batch * prompt_len), max_num_seqs=max(64, batch))
    local = LLMEngine.from_checkpoint(model, cfg)
    timer = TimedDecoder(local.core.decoder)
    local.core.decoder = timer
    decode_steps(local, prompts, 3, timer)  # warm up
    runs = [decode_steps(local, prompts, new_tokens, timer) for _ in range(reps)]
    walls = min((r["wall_s"] for r in runs), key=statistics.median)
    math_s = min(statistics.median(r["math_s"]) for r in runs)
    rows = {"engine": {"name": "single process", **_row(walls, math_s)}}
    for transport in transports if expert_workers else ():
        with contextlib.ExitStack() as stack:
            config = ClusterConfig(1, expert_workers, transport=transport)
            cluster = stack.enter_context(ClusterEngine(model, config, cfg))
            decode_steps(cluster, prompts, 3, None)
            runs = [decode_steps(cluster, prompts, new_tokens, None) for _ in range(reps)]
            fastest = min(runs, key=lambda r: statistics.median(r["wall_s"]))
            name = f"cluster (1 attn + {expert_workers} expert, {transport})"
            key = "cluster" if transport == "auto" else f"cluster_{transport}"
            rows[key] = {"name": name, **_row(fastest["wall_s"], math_s, fastest["rank_s"])}
    return rows


def cmd_overhead(args: argparse.Namespace) -> int:
    model = Path(args.model) if args.model else default_checkpoint(BENCH_PRESET)
    figures: dict[str, Any] = {"new_tokens": args.new_tokens, "prompt_len": args.prompt_len}
    print(f"decode step time outside the model's math (median of the steps, fastest of {args.reps}), {model}")
    print(f"{'engine':<44} {'batch':>5} {'step ms':>9} {'math ms':>9} {'overhead ms':>12} {'share':>6}")
    for batch in args.batch:
        rows = measure(
            model, batch, args.new_tokens, args.prompt_len, args.expert_workers, args.reps, args.transports
        )
        for key, r in rows.items():
            share = r["overhead_ms"] / r["step_ms"]
            print(
                f"{r['name']:<44} {batch:>5} {r['step_ms']:>9.2f} {r['math_ms']:>9.2f} "
                f"{r['overhead_ms']:>12.2f} {share:>6.0%}"
            )
            figures[f"{key}_overhead_ms_b{batch}"] = round(r["overhead_ms"], 3)
            figures[f"{key}_step_ms_b{batch}"] = round(r["step_ms"], 3)
            if "rank_step_ms" in r:  # the rest of the cluster's step: the Ray call and the driver
                rank, hop = r["rank_step_ms"], r["step_ms"] - r["rank_step_ms"]
                print(f"{'':<50} of it: the attention rank's own step {rank:.2f} ms, Ray + driver {hop:.2f}")
                figures[f"{key}_rank_step_ms_b{batch}"] = round(rank, 3)
                figures[f"{key}_call_ms_b{batch}"] = round(hop, 3)
    print(json.dumps(figures))
    return 0
