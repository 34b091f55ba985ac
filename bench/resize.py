"""`llama4-ep bench resize`: what growing and shrinking the tiers costs the requests in flight.

One ClusterEngine serves `requests` greedy streams (ignore_eos, so each must end with exactly
`max_tokens` tokens). After `steady_steps` steps it grows from the small size to the large one,
then, `steady_steps` steps after that resize has landed, shrinks back (the leaving attention
worker's requests move: recomputed on the others). For each change:

- resize seconds: from the request to the new size serving (`cluster.resize.ResizeStats`);
- max step ratio: the longest step between the request and the switch (the switch included)
  against the median step of the steady stretch before it, at the old size; the switch step's
  own time beside it;
- and, over the whole run, requests failed (fewer tokens than asked, or an error) and whether the
  tokens equal the single-process engine's on the same prompts.

On a 2-core machine the new workers load on the same cores that serve the steps, so the ratio
shows that cost as well as the switch's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import ray
import torch

from cluster.config import ClusterConfig
from cluster.engine import ClusterEngine, ClusterUnavailable
from engine.core import EngineConfig
from engine.llm_engine import LLMEngine
from engine.request import SamplingParams
from model.synthetic import default_checkpoint


@dataclass(frozen=True)
class Change:
    name: str
    before: tuple[int, int]  # (attention, expert) workers
    after: tuple[int, int]
    resize_s: float
    steady_step_s: float  # median step at the old size, just before
    max_step_s: float  # the longest step while the change was in flight (the switch included)
    switch_step_s: float  # the step that switched to the new members
    steps: int  # steps while it was in flight

    def row(self) -> dict:
        return {
            "change": self.name,
            "from": list(self.before),
            "to": list(self.after),
            "resize_s": round(self.resize_s, 3),
            "steps_during": self.steps,
            "steady_step_ms": round(1000 * self.steady_step_s, 2),
            "max_step_ms": round(1000 * self.max_step_s, 2),
            "switch_step_ms": round(1000 * self.switch_step_s, 2),
            "max_step_ratio": round(self.max_step_s / self.steady_step_s, 2),
        }


def _prompts(n: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(11)
    return [torch.randint(0, 200000, (8 + 7 * i % 29,), generator=g).tolist() for i in range(n)]


class _Run:
    """The engine stepped by hand, every step timed, every token kept."""

    def __init__(self, engine: ClusterEngine, ids: list[str]) -> None:
        self.engine, self.tokens = engine, {i: [] for i in ids}

    def step(self) -> float:
        start = time.perf_counter()
        outputs = self.engine.step()
        took = time.perf_counter() - start
        for out in outputs:
            self.tokens[out.request_id] += out.new_token_ids
        return took

    def steady(self, steps: int) -> float:
        return statistics.median(self.step() for _ in range(steps))

    def change(self, name: str, size: tuple[int, int], steady_steps: int) -> Change:
        e = self.engine
        before = (len(e.attention), len(e.experts))
        steady = self.steady(steady_steps)
        done = len(e.resizer.stats.seconds)
        print(f"bench resize: {name} {before} -> {size}", flush=True)
        e.resize(*size, drain=False)
        times = []
        while len(e.resizer.stats.seconds) == done:  # until the new size serves
            times.append(self.step())
        seconds = e.resizer.stats.seconds[-1]
        return Change(name, before, size, seconds, steady, max(times), times[-1], len(times))


def run_resize(
    model: Path,
    prompts: list[list[int]],
    params: SamplingParams,
    small: tuple[int, int],
    large: tuple[int, int],
    steady_steps: int,
    cpus_per_worker: float,
) -> tuple[list[Change], dict[str, list[int]], list[str], int]:
    cfg = EngineConfig(max_num_seqs=len(prompts))
    cluster = ClusterConfig(*small, cpus_per_worker=cpus_per_worker)
    with ClusterEngine(model, cluster, cfg) as engine:
        ids = [engine.add(p, params) for p in prompts]
        run = _Run(engine, ids)
        changes, errors = [], 0
        try:
            changes.append(run.change("grow", large, steady_steps))
            changes.append(run.change("shrink", small, steady_steps))
            unfinished = sum(len(t) < params.max_tokens for t in run.tokens.values())
            while engine.has_unfinished:
                run.step()
        except ClusterUnavailable:
            errors = sum(len(t) < params.max_tokens for t in run.tokens.values())
            unfinished = 0
    if changes and unfinished == 0:
        print("bench resize: warning: every request had finished before the last change landed; "
              "raise --max-tokens", flush=True)  # fmt: skip
    return changes, run.tokens, ids, errors


def cmd_resize(args: argparse.Namespace) -> int:
    model = Path(args.model) if args.model else default_checkpoint(args.preset)
    small, large = args.small, args.large
    if small == large:
        raise ValueError(f"--small and --large are the same size, {small[0]}+{small[1]}")
    prompts = _prompts(args.requests)
    params = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True)
    print(f"bench resize: reference tokens ({args.requests} requests, single-process engine)", flush=True)
    expected = [c.token_ids for c in LLMEngine.from_checkpoint(model).generate(prompts, params)]
    started = not ray.is_initialized()
    if started:
        ray.init(
            num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False, configure_logging=False
        )
    try:
        changes, tokens, ids, errors = run_resize(
            model, prompts, params, small, large, args.steady_steps, args.cpus_per_worker
        )
    finally:
        if started:
            ray.shutdown()
    failed = errors + sum(len(tokens[i]) != params.max_tokens for i in ids)
    rows = [c.row() for c in changes]
    print(f"resize on {model.name}: {args.requests} requests x {args.max_tokens} tokens, "
          f"{small} <-> {large} (attention, expert) workers")  # fmt: skip
    print(f"{'change':<8} {'from':>8} {'to':>8} {'resize s':>9} {'steps':>6} {'steady ms':>10} "
          f"{'max step ms':>12} {'switch ms':>10} {'ratio':>6}")  # fmt: skip
    for r in rows:
        print(
            f"{r['change']:<8} {str(tuple(r['from'])):>8} {str(tuple(r['to'])):>8} {r['resize_s']:>9.2f} "
            f"{r['steps_during']:>6} {r['steady_step_ms']:>10.1f} {r['max_step_ms']:>12.1f} "
            f"{r['switch_step_ms']:>10.1f} {r['max_step_ratio']:>6.2f}"
        )
    print(
        json.dumps(
            {
                "resize_seconds": {r["change"]: r["resize_s"] for r in rows},
                "max_step_ratio": max((r["max_step_ratio"] for r in rows), default=float("nan")),
                "failed_requests": failed,
                "tokens_equal": [tokens[i] for i in ids] == expected,
                "model": str(model),
                "results": rows,
            }
        )
    )
    return 0
