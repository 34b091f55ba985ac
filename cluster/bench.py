"""`llama4-ep bench ...`: benchmarks that print a table, then one JSON line of figures."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

BENCH_PRESET = "bench-maverick"  # 128 experts, hidden 256, 8 layers


def add_bench_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks (print a table, then one JSON line)")
    bench = p.add_subparsers(dest="bench", required=True)
    d = bench.add_parser("decode", help="decode throughput: this engine against transformers")
    d.add_argument("--model", help=f"checkpoint (default: the {BENCH_PRESET} preset, made once)")
    d.add_argument("--batch", type=int, default=32)
    d.add_argument("--new-tokens", type=int, default=32)
    d.add_argument("--prompt-len", type=int, default=16)
    d.add_argument("--no-transformers", action="store_true", help="skip the transformers baseline")
    d.add_argument("--attention-workers", type=int, default=1, help="cluster column: attention workers")
    d.add_argument("--expert-workers", type=int, default=0, help="cluster column: expert workers (0: skip)")
    d.set_defaults(func=_cmd_decode)


def _prompts(batch: int, length: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 200000, (batch, length), generator=g).tolist()


def _decode_rate(run: Callable[[int], None], batch: int, new_tokens: int) -> dict[str, float]:
    """Decode tokens/s: the time of `new_tokens` tokens minus the time of the first (prefill)."""
    run(2)  # warm up
    t0 = time.perf_counter()
    run(1)
    prefill = time.perf_counter() - t0
    t0 = time.perf_counter()
    run(new_tokens)
    total = time.perf_counter() - t0
    decode = max(total - prefill, 1e-9)
    return {"decode_tok_s": batch * (new_tokens - 1) / decode, "total_s": total, "prefill_s": prefill}


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
    rows = {
        "llama4-ep (single process)": _decode_rate(
            _engine_runner(model, prompts), args.batch, args.new_tokens
        )
    }
    if args.expert_workers:
        from cluster.bench_cluster import cluster_runner

        with cluster_runner(model, prompts, args.attention_workers, args.expert_workers) as run:
            name = f"llama4-ep cluster ({args.attention_workers} attn + {args.expert_workers} expert)"
            rows[name] = _decode_rate(run, args.batch, args.new_tokens)
    if not args.no_transformers:
        rows["transformers generate"] = _decode_rate(
            _transformers_runner(model, prompts), args.batch, args.new_tokens
        )
    print(
        f"decode, batch {args.batch}, {args.new_tokens} new tokens, prompt {args.prompt_len}, model {model}"
    )
    print(f"{'engine':<48} {'decode tok/s':>14} {'total s':>9}")
    for name, r in rows.items():
        print(f"{name:<48} {r['decode_tok_s']:>14.1f} {r['total_s']:>9.2f}")
    figures = {
        "batch": args.batch,
        "new_tokens": args.new_tokens,
        "engine_decode_tok_s": round(rows["llama4-ep (single process)"]["decode_tok_s"], 2),
    }
    for name, r in rows.items():
        if name.startswith("llama4-ep cluster"):
            figures["cluster_decode_tok_s"] = round(r["decode_tok_s"], 2)
    if "transformers generate" in rows:
        hf = rows["transformers generate"]["decode_tok_s"]
        figures["transformers_decode_tok_s"] = round(hf, 2)
        figures["speedup_vs_transformers"] = round(figures["engine_decode_tok_s"] / hf, 2)
    print(json.dumps(figures))
    return 0
