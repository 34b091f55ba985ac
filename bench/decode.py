"""`llama4-ep bench decode`: decode tokens/s of this engine against transformers, and against
llama.cpp and vLLM CPU where they are set up (`bench.peers`), on one checkpoint."""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from bench.peers import PeerRate, PeerSetup, peer_rates
from cluster.config import ClusterConfig
from cluster.engine import ClusterEngine
from engine.core import EngineConfig
from engine.llm_engine import LLMEngine
from engine.request import SamplingParams
from model.synthetic import default_checkpoint
from serving.cli import parallel_min_tokens_setting

BENCH_PRESET = "bench-maverick"  # 128 experts, hidden 256, 8 layers
ENGINE_ROW = "llama4-ep (single process)"
HF_ROW = "transformers generate"


def _prompts(batch: int, length: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 200000, (batch, length), generator=g).tolist()


MAX_EXTRA_TURNS = 10  # per runner, when the decode time came out as none


def _decode_rates(
    runners: dict[str, Callable[[int], None]],
    batch: int,
    new_tokens: int,
    reps: int,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, dict[str, float]]:
    """Decode tokens/s of each runner: the time of `new_tokens` tokens minus the time of the first
    (prefill), each the fastest of `reps` runs (a busy machine only ever adds time). The runners
    take turns, so a busy spell of a shared machine does not land on one of them alone."""
    prefills: dict[str, list[float]] = {name: [] for name in runners}
    totals: dict[str, list[float]] = {name: [] for name in runners}

    def turn(name: str, run: Callable[[int], None]) -> None:
        for n, times in ((1, prefills[name]), (new_tokens, totals[name])):
            start = clock()
            run(n)
            times.append(clock() - start)

    for run in runners.values():
        run(2)  # warm up
    for _ in range(reps):
        for name, run in runners.items():
            turn(name, run)
    rows = {}
    for name, run in runners.items():
        # a busy spell over a prefill-only run can make it outlast the whole run: the difference
        # would then be no time at all, and the rate absurd. Take more turns until it is not.
        for _ in range(MAX_EXTRA_TURNS):
            if min(totals[name]) > min(prefills[name]):
                break
            turn(name, run)
        prefill, total = min(prefills[name]), min(totals[name])
        if total <= prefill:
            raise RuntimeError(
                f"{name}: {new_tokens} tokens never took longer than the first alone in "
                f"{len(totals[name])} runs (the machine is too busy, or --new-tokens too few to measure)"
            )
        rate = batch * (new_tokens - 1) / (total - prefill)
        rows[name] = {"decode_tok_s": rate, "total_s": total, "prefill_s": prefill}
    return rows


def _engine_config(prompts: list[list[int]], parallel_min_tokens: int | None) -> EngineConfig:
    """Every prompt prefills in one step; the layers' threads as the flag says (None: default)."""
    budget = max(512, sum(len(p) for p in prompts))
    threads = parallel_min_tokens_setting(parallel_min_tokens)
    return EngineConfig(token_budget=budget, max_num_seqs=max(64, len(prompts)), **threads)


def profile_table(engine: LLMEngine, prompts: list[list[int]], new_tokens: int, rows: int) -> str:
    """The single-process engine's run (prefill and decode) under torch's profiler: the `rows` ops
    with the most self CPU time, by input shape. The profiler slows some calls (oneDNN's lm_head
    most: 34-51 ms under it, 21 ms without at batch 32); the rates above are measured without it."""
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        engine.generate(prompts, SamplingParams(max_tokens=new_tokens, ignore_eos=True))
    averages = prof.key_averages(group_by_input_shape=True)
    return averages.table(
        sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=30, max_shapes_column_width=64
    )


def _engine_runner(engine: LLMEngine, prompts: list[list[int]]) -> Callable[[int], None]:
    def run(n: int) -> None:
        engine.generate(prompts, SamplingParams(max_tokens=n, ignore_eos=True))

    return run


def _transformers_runner(model: Path, prompts: list[list[int]]) -> Callable[[int], None]:
    from model.hf_reference import load_hf_causal_lm  # lazy: transformers is a test/bench extra

    hf = load_hf_causal_lm(model, attn="sdpa")  # transformers as users run it
    ids = torch.tensor(prompts)

    def run(n: int) -> None:
        with torch.no_grad():
            hf.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )

    return run


def cmd_decode(args: argparse.Namespace) -> int:
    model = Path(args.model) if args.model else default_checkpoint(BENCH_PRESET)
    prompts = _prompts(args.batch, args.prompt_len)
    with contextlib.ExitStack() as stack:  # every runner stays up until all are measured
        engine = LLMEngine.from_checkpoint(model, _engine_config(prompts, args.parallel_min_tokens))
        runners = {ENGINE_ROW: _engine_runner(engine, prompts)}
        if args.expert_workers:
            name = f"llama4-ep cluster ({args.attention_workers} attn + {args.expert_workers} expert)"
            run = cluster_runner(
                model, prompts, args.attention_workers, args.expert_workers, args.parallel_min_tokens
            )
            runners[name] = stack.enter_context(run)
        if not args.no_transformers:
            runners[HF_ROW] = _transformers_runner(model, prompts)
        rows, peers = _rounds(args, model, runners)
    print(
        f"decode, batch {args.batch}, {args.new_tokens} new tokens, prompt {args.prompt_len}, "
        f"fastest of {args.reps}, best of {args.rounds if peers else 1} rounds, model {model}"
        + ("" if args.parallel_min_tokens is None else f", parallel_min_tokens {args.parallel_min_tokens}")
    )
    layer_threads = engine.core.decoder.thread_policy.chosen()  # auto's choices; {} for a fixed N
    if layer_threads:
        sizes = ", ".join(f"<= {size} tokens: {n}" for size, n in layer_threads.items())
        print(f"layer threads the engine measured and chose, by step size: {sizes}")
    print(f"{'engine':<48} {'decode tok/s':>14} {'prefill tok/s':>14} {'total s':>9}")
    for name, r in rows.items():
        prefill = args.batch * args.prompt_len / r["prefill_s"]
        print(f"{name:<48} {r['decode_tok_s']:>14.1f} {prefill:>14.1f} {r['total_s']:>9.2f}")
    for peer in peers:
        if peer.skipped:
            print(f"{peer.name:<48} skipped: {peer.skipped}")
        else:
            prefill = "-" if peer.prefill_tok_s is None else f"{peer.prefill_tok_s:.1f}"
            print(f"{peer.name:<48} {peer.decode_tok_s:>14.1f} {prefill:>14} {'-':>9}")
    if args.profile:
        print(profile_table(engine, prompts, args.new_tokens, args.profile))
    print(json.dumps(_decode_figures(args, rows, peers, layer_threads)))
    return 0


def _rounds(
    args: argparse.Namespace, model: Path, runners: dict[str, Callable[[int], None]]
) -> tuple[dict[str, dict[str, float]], list[PeerRate]]:
    """With peers, `args.rounds` rounds of this engine's runners then each peer, every figure the
    best of its rounds: on a shared machine a busy spell lands on whoever runs then, and only
    ever slows it down, so taking turns and keeping the best compares like with like."""
    rows = _decode_rates(runners, args.batch, args.new_tokens, args.reps)
    if args.no_peers:
        return rows, []
    best: dict[str, PeerRate] = {}
    for i in range(args.rounds):
        if i:
            again = _decode_rates(runners, args.batch, args.new_tokens, args.reps)
            rows = {name: max(rows[name], again[name], key=lambda r: r["decode_tok_s"]) for name in rows}
        for peer in _peers(args, model):
            old = best.get(peer.name)
            if old is None or (peer.decode_tok_s or 0) > (old.decode_tok_s or 0):
                best[peer.name] = peer
    return rows, list(best.values())


def _peers(args: argparse.Namespace, model: Path) -> list[PeerRate]:
    return peer_rates(_peer_setup(args), model, args.batch, args.prompt_len, args.new_tokens)


def _peer_setup(args: argparse.Namespace) -> PeerSetup:
    setup = PeerSetup()
    return PeerSetup(
        Path(args.peer_scripts) if args.peer_scripts else setup.scripts,
        Path(args.peer_dir) if args.peer_dir else setup.root,
        threads=args.peer_threads or torch.get_num_threads(),
    )


def _decode_figures(
    args: argparse.Namespace,
    rows: dict[str, dict[str, float]],
    peers: list[PeerRate] = (),
    layer_threads: dict[int, int] | None = None,
) -> dict:
    """The JSON line: this engine's rates, the cluster's and transformers' when run, and per peer
    set up its rates and `vs_<peer>` (this engine's decode tok/s over the peer's)."""
    engine = rows[ENGINE_ROW]
    figures = {
        "batch": args.batch,
        "new_tokens": args.new_tokens,
        "prompt_len": args.prompt_len,
        "engine_decode_tok_s": round(engine["decode_tok_s"], 2),
        "engine_prefill_tok_s": round(args.batch * args.prompt_len / engine["prefill_s"], 2),
    }
    if args.parallel_min_tokens is not None:
        figures["parallel_min_tokens"] = args.parallel_min_tokens
    if layer_threads:
        figures["layer_threads"] = {str(size): n for size, n in layer_threads.items()}
    for peer in peers:
        key = peer.name.replace(".", "_").replace("-", "_")  # llama_cpp, vllm_cpu
        if peer.decode_tok_s:
            figures[f"{key}_decode_tok_s"] = peer.decode_tok_s
            figures[f"vs_{key}"] = round(figures["engine_decode_tok_s"] / peer.decode_tok_s, 3)
        if peer.prefill_tok_s:
            figures[f"{key}_prefill_tok_s"] = peer.prefill_tok_s
            figures[f"prefill_vs_{key}"] = round(figures["engine_prefill_tok_s"] / peer.prefill_tok_s, 3)
    for name, r in rows.items():
        if name.startswith("llama4-ep cluster"):
            figures["cluster_decode_tok_s"] = round(r["decode_tok_s"], 2)
            figures["cluster_workers"] = [args.attention_workers, args.expert_workers]
    if HF_ROW in rows:
        hf = rows[HF_ROW]["decode_tok_s"]
        figures["transformers_decode_tok_s"] = round(hf, 2)
        figures["speedup_vs_transformers"] = round(figures["engine_decode_tok_s"] / hf, 2)
        if "cluster_decode_tok_s" in figures:
            figures["cluster_speedup_vs_transformers"] = round(figures["cluster_decode_tok_s"] / hf, 2)
    return figures


@contextmanager
def cluster_runner(
    model: Path,
    prompts: list[list[int]],
    num_attention: int,
    num_experts: int,
    parallel_min_tokens: int | None = None,
) -> Iterator[Callable[[int], None]]:
    """`run(n)` generates n tokens for every prompt on a ClusterEngine started once (Ray local)."""
    cfg = _engine_config(prompts, parallel_min_tokens)
    with ClusterEngine(model, ClusterConfig(num_attention, num_experts), cfg) as engine:

        def run(n: int) -> None:
            engine.generate(prompts, SamplingParams(max_tokens=n, ignore_eos=True))

        yield run
