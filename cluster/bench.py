"""`llama4-ep bench ...`: benchmarks that print a table, then one JSON line of figures."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

BENCH_PRESET = "bench-maverick"  # 128 experts, hidden 256, 8 layers
ENGINE_ROW = "llama4-ep (single process)"
HF_ROW = "transformers generate"


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"need comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"need integers >= 1, got {text!r}")
    return values


def add_bench_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks (print a table, then one JSON line)")
    bench = p.add_subparsers(dest="bench", required=True)
    d = bench.add_parser("decode", help="decode throughput: this engine against transformers")
    d.add_argument("--model", help=f"checkpoint (default: the {BENCH_PRESET} preset, made once)")
    d.add_argument("--batch", type=int, default=32)
    d.add_argument("--new-tokens", type=int, default=32)
    d.add_argument("--prompt-len", type=int, default=16)
    d.add_argument("--reps", type=int, default=2, help="runs of each length; the fastest counts")
    d.add_argument("--no-transformers", action="store_true", help="skip the transformers baseline")
    d.add_argument("--attention-workers", type=int, default=1, help="cluster column: attention workers")
    d.add_argument("--expert-workers", type=int, default=4, help="cluster column: expert workers (0: skip)")
    d.set_defaults(func=_cmd_decode)
    _add_dispatch_parser(bench)
    _add_kv_parser(bench)
    from cluster.bench_replication import add_bench_replication_parser
    from cluster.serving.bench_serve import add_bench_serve_parser

    add_bench_serve_parser(bench)
    add_bench_replication_parser(bench)


def _add_dispatch_parser(bench: argparse._SubParsersAction) -> None:
    d = bench.add_parser("dispatch", help="the dispatcher's time per MoE layer against bare all_to_all")
    d.add_argument("--attention-ranks", type=int, default=1)
    d.add_argument("--expert-ranks", type=int, default=4)
    d.add_argument("--experts", type=int, default=128)
    d.add_argument("--hidden", type=int, default=256)
    d.add_argument("--intermediate", type=int, default=256, help="expert SwiGLU width (+compute column)")
    d.add_argument("--tokens", type=_int_list, default=(32, 256), help="tokens per attention rank: 32,256")
    d.add_argument("--layers", type=int, default=4, help="MoE layers timed back to back per rep")
    d.add_argument("--reps", type=int, default=60)
    d.add_argument("--dtype", default="float32")
    d.set_defaults(func=_cmd_dispatch)


def _add_kv_parser(bench: argparse._SubParsersAction) -> None:
    k = bench.add_parser("kv", help="KV bytes per sequence against the layer mix's minimum (Llama 4 shape)")
    k.add_argument("--sizes", type=_int_list, default=(4096, 16384, 65536), help="sequence lengths")
    k.add_argument("--block-sizes", type=_int_list, default=(16, 64))
    k.add_argument("--chunk-size", type=int, default=8192, help="attention_chunk_size of the chunked layers")
    k.add_argument("--prefill-chunk", type=int, default=512, help="prompt tokens per step (token budget)")
    k.set_defaults(func=_cmd_kv)


def _prompts(batch: int, length: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 200000, (batch, length), generator=g).tolist()


def _timed(run: Callable[[int], None], n: int) -> float:
    t0 = time.perf_counter()
    run(n)
    return time.perf_counter() - t0


def _decode_rates(
    runners: dict[str, Callable[[int], None]], batch: int, new_tokens: int, reps: int
) -> dict[str, dict[str, float]]:
    """Decode tokens/s of each runner: the time of `new_tokens` tokens minus the time of the first
    (prefill), each the fastest of `reps` runs (a busy machine only ever adds time). The runners
    take turns, so a busy spell of a shared machine does not land on one of them alone."""
    for run in runners.values():
        run(2)  # warm up
    prefills: dict[str, list[float]] = {name: [] for name in runners}
    totals: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(reps):
        for name, run in runners.items():
            prefills[name].append(_timed(run, 1))
            totals[name].append(_timed(run, new_tokens))
    rows = {}
    for name in runners:
        prefill, total = min(prefills[name]), min(totals[name])
        decode = max(total - prefill, 1e-9)
        rate = batch * (new_tokens - 1) / decode
        rows[name] = {"decode_tok_s": rate, "total_s": total, "prefill_s": prefill}
    return rows


def _engine_runner(model: Path, prompts: list[list[int]]) -> Callable[[int], None]:
    from cluster.engine import EngineConfig, LLMEngine
    from cluster.request import SamplingParams

    budget = max(512, sum(len(p) for p in prompts))
    engine = LLMEngine.from_checkpoint(model, EngineConfig(token_budget=budget, max_num_seqs=len(prompts)))

    def run(n: int) -> None:
        engine.generate(prompts, SamplingParams(max_tokens=n, ignore_eos=True))

    return run


def _transformers_runner(model: Path, prompts: list[list[int]]) -> Callable[[int], None]:
    from cluster.hf_reference import load_hf_causal_lm

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


def _cmd_decode(args: argparse.Namespace) -> int:
    from cluster.cli import default_checkpoint

    model = Path(args.model) if args.model else default_checkpoint(BENCH_PRESET)
    prompts = _prompts(args.batch, args.prompt_len)
    with contextlib.ExitStack() as stack:  # every runner stays up until all are measured
        runners = {ENGINE_ROW: _engine_runner(model, prompts)}
        if args.expert_workers:
            from cluster.bench_cluster import cluster_runner

            name = f"llama4-ep cluster ({args.attention_workers} attn + {args.expert_workers} expert)"
            run = cluster_runner(model, prompts, args.attention_workers, args.expert_workers)
            runners[name] = stack.enter_context(run)
        if not args.no_transformers:
            runners[HF_ROW] = _transformers_runner(model, prompts)
        rows = _decode_rates(runners, args.batch, args.new_tokens, args.reps)
    print(
        f"decode, batch {args.batch}, {args.new_tokens} new tokens, prompt {args.prompt_len}, "
        f"fastest of {args.reps}, model {model}"
    )
    print(f"{'engine':<48} {'decode tok/s':>14} {'total s':>9}")
    for name, r in rows.items():
        print(f"{name:<48} {r['decode_tok_s']:>14.1f} {r['total_s']:>9.2f}")
    print(json.dumps(_decode_figures(args, rows)))
    return 0


def _decode_figures(args: argparse.Namespace, rows: dict[str, dict[str, float]]) -> dict:
    figures = {
        "batch": args.batch,
        "new_tokens": args.new_tokens,
        "engine_decode_tok_s": round(rows[ENGINE_ROW]["decode_tok_s"], 2),
    }
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


def _cmd_dispatch(args: argparse.Namespace) -> int:
    from cluster.bench_cluster import DispatchSpec, print_dispatch, run_dispatch_bench

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


# -- bench kv -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class KVShape:
    """Llama 4's KV layout (Scout and Maverick alike): 48 layers, every 4th NoPE with global
    attention, the rest chunked over 8192 tokens; 8 kv heads x 128, bf16."""

    num_layers: int = 48
    chunk_size: int = 8192
    num_kv_heads: int = 8
    head_dim: int = 128
    dtype_bytes: int = 2

    @property
    def chunked(self) -> tuple[bool, ...]:
        return tuple((i + 1) % 4 != 0 for i in range(self.num_layers))

    @property
    def bytes_per_token(self) -> int:
        """K and V of one position of one layer."""
        return 2 * self.num_kv_heads * self.head_dim * self.dtype_bytes

    def minimum_bytes(self, start_pos: int, end_pos: int) -> int:
        """The least a step that computes positions [start_pos, end_pos) can hold: global layers
        keep [0, end_pos); chunked layers keep [floor(start_pos / C) * C, end_pos), since the
        step's earliest query (at start_pos) attends back to the start of its chunk."""
        num_chunked = sum(self.chunked)
        window = end_pos - start_pos // self.chunk_size * self.chunk_size
        return ((self.num_layers - num_chunked) * end_pos + num_chunked * window) * self.bytes_per_token


def kv_steps(prompt_len: int, end_len: int, prefill_chunk: int) -> Iterator[tuple[int, int]]:
    """(start_pos, end_pos) of each step, as the scheduler makes them: the prompt in chunks of
    `prefill_chunk` tokens, then one decode token per step until the sequence has `end_len`."""
    for start in range(0, prompt_len, prefill_chunk):
        yield start, min(start + prefill_chunk, prompt_len)
    for n in range(prompt_len, end_len):
        yield n, n + 1


def kv_trajectory(
    shape: KVShape, block_size: int, steps: list[tuple[int, int]], targets: tuple[int, ...]
) -> dict[int, dict]:
    """Run one sequence's steps through `KVCacheManager.allocate` (accounting only: no tensors) and,
    at each target length n, report the bytes it holds, the minimum, the all-layers-full cache,
    and the worst excess over every step that ended in (n/2, n]."""
    from attention.kv_cache import KVCacheManager

    per_block = block_size * shape.bytes_per_token
    max_len = max(end for _, end in steps)
    num_blocks = shape.num_layers * math.ceil(max_len / block_size)
    kv = KVCacheManager(num_blocks, block_size, shape.chunked, shape.chunk_size, per_block)
    worst = dict.fromkeys(targets, 0.0)
    out = {}
    for start, end in steps:
        if not kv.allocate("seq", start, end):
            raise RuntimeError(f"the pool of {num_blocks} blocks ran out at [{start}, {end})")
        held = kv.usage().bytes_used  # the only sequence in the pool
        minimum = shape.minimum_bytes(start, end)
        for n in targets:
            if n / 2 < end <= n:
                worst[n] = max(worst[n], held / minimum - 1)
        if end in targets:
            out[end] = {"bytes": held, "minimum_bytes": minimum, "excess_over_minimum": held / minimum - 1}
    for n, row in out.items():
        full = KVCacheManager(num_blocks, block_size, shape.chunked, None, per_block)  # nothing chunked
        full.allocate("seq", 0, n)
        row["full_bytes"] = full.usage().bytes_used
        row["worst_excess_in_half_to_n"] = worst[n]
    return out


def run_kv_bench(
    shape: KVShape, sizes: tuple[int, ...], block_sizes: tuple[int, ...], prefill_chunk: int
) -> list[dict]:
    """KV bytes of one sequence at each length n against the minimum its layer mix allows.

    The minimum, for a sequence being decoded at length n (the step that computes position n - 1,
    after which the cache holds n positions): every global layer keeps all n positions; every
    chunked layer keeps the positions of the query's own chunk, [floor((n - 1) / C) * C, n), that
    is n - floor((n - 1) / C) * C of them (between 1 and C; exactly C when n is a multiple of C,
    because position n - 1 still sits in the chunk that ends at n). So
    minimum(n) = bytes_per_token * (G * n + L_c * (n - floor((n - 1) / C) * C)),
    with G global and L_c chunked layers. A prefill step computing [s, n) needs its chunked layers
    from floor(s / C) * C instead (`KVShape.minimum_bytes`). Block rounding is the only slack a
    paged cache may add: the last block of every layer is partly filled.

    Two growth patterns, both through `allocate` as the scheduler calls it: `decode` (a prompt of
    one prefill chunk, then one token per step up to the largest size, measured on the way) and
    `prefill` (an n-token prompt in chunks of `prefill_chunk`, measured when it ends).
    """
    rows = []
    for block_size in block_sizes:
        for scenario in ("decode", "prefill"):
            if scenario == "decode":
                steps = list(kv_steps(min(prefill_chunk, min(sizes)), max(sizes), prefill_chunk))
                found = kv_trajectory(shape, block_size, steps, sizes)
            else:
                found = {}
                for n in sizes:
                    found.update(kv_trajectory(shape, block_size, list(kv_steps(n, n, prefill_chunk)), (n,)))
            for n in sizes:
                r = found[n]
                rows.append({"scenario": scenario, "block_size": block_size, "num_tokens": n, **r})
    for r in rows:
        r["ratio_to_full"] = r["bytes"] / r["full_bytes"]
        r["minimum_ratio_to_full"] = r["minimum_bytes"] / r["full_bytes"]
    return rows


def _cmd_kv(args: argparse.Namespace) -> int:
    shape = KVShape(chunk_size=args.chunk_size)
    rows = run_kv_bench(shape, args.sizes, args.block_sizes, args.prefill_chunk)
    num_chunked = sum(shape.chunked)
    print(
        f"KV bytes per sequence: {shape.num_layers} layers ({num_chunked} chunked over {shape.chunk_size} "
        f"tokens, {shape.num_layers - num_chunked} global), {shape.num_kv_heads} kv heads x "
        f"{shape.head_dim}, {8 * shape.dtype_bytes}-bit; prefill chunk {args.prefill_chunk}"
    )
    print(
        f"{'scenario':<9} {'block':>5} {'tokens':>7} {'held MiB':>10} {'minimum MiB':>12} {'excess':>8} "
        f"{'worst (n/2,n]':>14} {'held/full':>10} {'min/full':>9}"
    )
    mib = 2**20
    for r in rows:
        print(
            f"{r['scenario']:<9} {r['block_size']:>5} {r['num_tokens']:>7} {r['bytes'] / mib:>10.1f} "
            f"{r['minimum_bytes'] / mib:>12.1f} {r['excess_over_minimum']:>8.2%} "
            f"{r['worst_excess_in_half_to_n']:>14.2%} {r['ratio_to_full']:>10.4f} "
            f"{r['minimum_ratio_to_full']:>9.4f}"
        )

    def worst(key: str, block_size: int) -> float:
        return round(max(r[key] for r in rows if r["block_size"] == block_size), 6)

    figures = {
        "num_layers": shape.num_layers,
        "chunk_size": shape.chunk_size,
        "bytes_per_token_per_layer": shape.bytes_per_token,
        "sizes": list(args.sizes),
        "block_sizes": list(args.block_sizes),
        "excess_over_minimum": max(worst("excess_over_minimum", b) for b in args.block_sizes),
        "excess_over_minimum_per_block_size": {
            str(b): worst("excess_over_minimum", b) for b in args.block_sizes
        },
        "worst_excess_in_half_to_n_per_block_size": {
            str(b): worst("worst_excess_in_half_to_n", b) for b in args.block_sizes
        },
        "ratio_to_full": {
            str(r["num_tokens"]): round(r["ratio_to_full"], 6)
            for r in rows
            if r["scenario"] == "decode" and r["block_size"] == args.block_sizes[0]
        },
        "results": [{k: round(v, 6) if isinstance(v, float) else v for k, v in r.items()} for r in rows],
    }
    print(json.dumps(figures))
    return 0
