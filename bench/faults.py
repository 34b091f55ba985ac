"""`llama4-ep bench faults`: what a lost or hung worker costs the requests in flight.

For each fault kind a fresh ClusterEngine serves `requests` greedy requests (ignore_eos, so every
one must end with exactly `max_tokens` tokens); after `kill_at_step` steps the fault happens:

- `expert-kill`: SIGKILL of an expert worker (no redundant slots: its experts are reloaded),
- `expert-kill-redundant`: the same with a redundant slot per worker,
- `attention-kill`: SIGKILL of one of 2 attention workers while a step runs (its requests are
  re-admitted on the other),
- `expert-hang`: SIGSTOP of an expert worker (found by the driver's ping, then killed).

The stall of a stream is the time from the fault to its next token. Tokens are compared with the
single-process engine's on the same checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import threading
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

KINDS = ("expert-kill", "expert-kill-redundant", "attention-kill", "expert-hang")


@dataclass(frozen=True)
class FaultRun:
    kind: str
    in_flight: int
    failed: int
    stalls_s: list[float]
    tokens_equal: bool
    recovery_s: float

    def row(self) -> dict:
        stalls = self.stalls_s or [float("nan")]
        return {
            "kind": self.kind,
            "in_flight": self.in_flight,
            "failed_requests": self.failed,
            "stall_p50_s": round(statistics.median(stalls), 3),
            "stall_max_s": round(max(stalls), 3),
            "recovery_s": round(self.recovery_s, 3),
            "tokens_equal": self.tokens_equal,
        }


def _prompts(n: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, 200000, (8 + 5 * i % 23,), generator=g).tolist() for i in range(n)]


def _cluster(kind: str) -> ClusterConfig:
    """The default fault settings (`cluster.config.FaultTolerance`): what a user gets."""
    if kind == "attention-kill":
        return ClusterConfig(2, 2)
    return ClusterConfig(1, 3, 1 if kind == "expert-kill-redundant" else 0)


def _fault(kind: str, engine: ClusterEngine) -> None:
    """Start the fault; the attention kill lands while the next step runs."""
    if kind == "attention-kill":
        pid = ray.get(engine.attention[1].pid.remote())
        threading.Timer(0.02, os.kill, args=(pid, signal.SIGKILL)).start()
        return
    pid = ray.get(engine.experts[1].pid.remote())
    os.kill(pid, signal.SIGSTOP if kind == "expert-hang" else signal.SIGKILL)


def run_fault(
    kind: str,
    model: Path,
    prompts: list[list[int]],
    params: SamplingParams,
    kill_at_step: int,
    expected: list,
) -> FaultRun:
    cfg = EngineConfig(token_budget=max(512, sum(map(len, prompts))), max_num_seqs=len(prompts))
    with ClusterEngine(model, _cluster(kind), cfg) as engine:
        ids = [engine.add(p, params) for p in prompts]
        tokens: dict[str, list[int]] = {i: [] for i in ids}
        stalls: dict[str, float] = {}
        fault_at, failed, step = None, 0, 0
        while engine.has_unfinished:
            if step == kill_at_step:
                fault_at = time.perf_counter()
                _fault(kind, engine)
            try:
                outputs = engine.step()
            except ClusterUnavailable:
                failed = sum(len(t) < params.max_tokens for t in tokens.values())
                break
            now = time.perf_counter()
            for out in outputs:
                tokens[out.request_id] += out.new_token_ids
                if fault_at is not None and out.new_token_ids and out.request_id not in stalls:
                    stalls[out.request_id] = now - fault_at
            step += 1
        in_flight = len(ids) if fault_at is not None else 0
        failed += sum(len(tokens[i]) != params.max_tokens for i in ids)
        recovery = sum(engine.faults.recovery_seconds)
    return FaultRun(
        kind, in_flight, failed, list(stalls.values()), [tokens[i] for i in ids] == expected, recovery
    )


def cmd_faults(args: argparse.Namespace) -> int:
    model = Path(args.model) if args.model else default_checkpoint(args.preset)
    kinds = args.kinds or list(KINDS)
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise ValueError(f"--kind {', '.join(unknown)}: the fault kinds are {', '.join(KINDS)}")
    prompts = _prompts(args.requests)
    params = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True)
    expected = [c.token_ids for c in LLMEngine.from_checkpoint(model).generate(prompts, params)]
    started = not ray.is_initialized()
    if started:
        ray.init(
            num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False, configure_logging=False
        )
    try:
        runs = []
        for kind in kinds:
            print(f"bench faults: {kind}", flush=True)
            runs.append(run_fault(kind, model, prompts, params, args.kill_at_step, expected).row())
    finally:
        if started:
            ray.shutdown()
    print(f"faults on {model.name}: {args.requests} requests x {args.max_tokens} tokens, fault after "
          f"{args.kill_at_step} steps")  # fmt: skip
    print(f"{'fault':<24} {'in flight':>9} {'failed':>7} {'stall p50 s':>12} {'stall max s':>12} "
          f"{'recovery s':>11} {'tokens equal':>13}")  # fmt: skip
    for r in runs:
        print(
            f"{r['kind']:<24} {r['in_flight']:>9} {r['failed_requests']:>7} {r['stall_p50_s']:>12.3f} "
            f"{r['stall_max_s']:>12.3f} {r['recovery_s']:>11.3f} {str(r['tokens_equal']):>13}"
        )
    print(
        json.dumps(
            {
                "failed_requests": sum(r["failed_requests"] for r in runs),
                "max_stall_s": max(r["stall_max_s"] for r in runs),
                "tokens_equal": all(r["tokens_equal"] for r in runs),
                "model": str(model),
                "results": runs,
            }
        )
    )
    return 0
