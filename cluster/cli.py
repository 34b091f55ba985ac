"""The `llama4-ep` command line."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

DEFAULT_PRESET = "tiny-maverick"


def cache_dir() -> Path:
    base = os.environ.get("LLAMA4_EP_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "llama4-ep"
    )
    return Path(base)


def default_checkpoint(
    preset: str = DEFAULT_PRESET, seed: int = 0, expert_skew: float = 0.0, skew_seed: int = 0
) -> Path:
    """The embedded default: a tiny random checkpoint, made once and cached. With expert_skew > 0
    the routers are Zipf-skewed (cached under a name that says so)."""
    from cluster.presets import make_checkpoint

    name = f"{preset}-seed{seed}" + (f"-skew{expert_skew:g}-skewseed{skew_seed}" if expert_skew else "")
    target = cache_dir() / name
    if (target / "config.json").exists():
        return target
    print(f"making the {name if expert_skew else preset} checkpoint in {target} (once)", file=sys.stderr)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{name}-"))
    try:
        make_checkpoint(preset, tmp, seed=seed, expert_skew=expert_skew, skew_seed=skew_seed)
        tmp.rename(target)  # atomic: a half-written checkpoint is never visible
    except OSError:
        if not (target / "config.json").exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _positive_int(name: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
        return value

    return parse


def _token_ids(text: str) -> list[int]:
    ids = []
    for part in text.split(","):
        try:
            ids.append(int(part))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{part.strip()!r} is not an integer") from None
    return ids


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text from prompts (several prompts run as one batch)")
    p.add_argument("--model", help="checkpoint directory (default: the tiny-maverick checkpoint, made once)")
    src = p.add_argument_group("prompts (repeat a flag for a batch)")
    src.add_argument(
        "--prompt",
        dest="inputs",
        action="append",
        type=lambda t: ("prompt", t),
        help="raw text, tokenized with <|begin_of_text|>",
    )
    src.add_argument(
        "--chat",
        dest="inputs",
        action="append",
        type=lambda t: ("chat", t),
        help="a user message, through the chat template",
    )
    src.add_argument(
        "--prompt-ids",
        dest="inputs",
        action="append",
        type=lambda t: ("ids", _token_ids(t)),
        help="token ids used exactly as given: 1,2,3",
    )
    p.add_argument("--max-tokens", type=_positive_int("--max-tokens"), default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at stop tokens")
    p.add_argument("--json", action="store_true", help="one JSON object per prompt (token_ids, text, ...)")
    p.add_argument("--dtype", default="float32", help="compute dtype (float32, bfloat16, float16)")
    p.add_argument(
        "--attention-workers",
        type=_positive_int("--attention-workers"),
        default=None,
        help="run through the Ray cluster with M attention workers",
    )
    p.add_argument(
        "--expert-workers",
        type=_positive_int("--expert-workers"),
        default=None,
        help="run through the Ray cluster with N expert workers",
    )
    p.add_argument(
        "--address", default=None, help="join an existing Ray cluster (default: start a local one)"
    )
    p.add_argument("--device", default="cpu", help="cluster workers' device: cpu (gloo) or cuda (NCCL)")
    p.set_defaults(func=_cmd_generate)


def _add_make_checkpoint(sub: argparse._SubParsersAction) -> None:
    from cluster.presets import PRESETS

    p = sub.add_parser("make-checkpoint", help="write a random-weight checkpoint in the Hugging Face layout")
    p.add_argument("--preset", required=True, choices=sorted(PRESETS))
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-shard-size", default=None, help="e.g. 20MB: shard with an index file")
    p.add_argument(
        "--expert-skew",
        type=float,
        default=0.0,
        help="Zipf exponent of expert popularity (0: random routers); see router/skew.py",
    )
    p.add_argument("--skew-seed", type=int, default=0, help="which experts are hot, per layer")
    p.set_defaults(func=_cmd_make_checkpoint)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llama4-ep", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    _add_make_checkpoint(sub)
    from cluster.bench import add_bench_parser
    from cluster.experiment.cli import add_experiment_parser
    from cluster.serving.cli import add_client_parser, add_serve_parser
    from cluster.serving.status import add_status_parser

    add_bench_parser(sub)
    add_serve_parser(sub)
    add_client_parser(sub)
    add_status_parser(sub)
    add_experiment_parser(sub)
    return parser


def _cmd_make_checkpoint(args: argparse.Namespace) -> int:
    from cluster.presets import make_checkpoint

    if args.expert_skew < 0:
        raise ValueError(f"--expert-skew must be >= 0, got {args.expert_skew}")
    out = make_checkpoint(
        args.preset,
        args.out,
        seed=args.seed,
        max_shard_size=args.max_shard_size,
        expert_skew=args.expert_skew,
        skew_seed=args.skew_seed,
    )
    files = sorted(p.name for p in Path(out).iterdir())
    print(f"wrote {args.preset} (seed {args.seed}) to {out}: {', '.join(files)}")
    return 0


def _prompts(args: argparse.Namespace, tokenizer) -> list[list[int]]:
    prompts = []
    for kind, value in args.inputs or []:
        if kind == "prompt":
            prompts.append(tokenizer.encode(value))
        elif kind == "chat":
            prompts.append(tokenizer.apply_chat_template([{"role": "user", "content": value}]))
        else:
            prompts.append(value)
    if not prompts:
        raise ValueError("give at least one of --prompt, --chat or --prompt-ids")
    for i, ids in enumerate(prompts):
        bad = [t for t in ids if not 0 <= t < tokenizer.vocab_size]
        if bad:
            raise ValueError(
                f"prompt {i}: token ids {bad} are outside the vocabulary [0, {tokenizer.vocab_size})"
            )
    return prompts


def _cmd_generate(args: argparse.Namespace) -> int:
    from cluster.engine import EngineConfig, LLMEngine
    from cluster.request import SamplingParams
    from cluster.tokenizer import Tokenizer

    model = Path(args.model) if args.model else default_checkpoint()
    if not (model / "config.json").exists():
        raise ValueError(f"--model {str(model)!r}: no config.json there")
    tokenizer = Tokenizer(model)
    prompts = _prompts(args, tokenizer)
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        ignore_eos=args.ignore_eos,
    )
    engine_cfg = EngineConfig(dtype=args.dtype)
    if args.attention_workers or args.expert_workers or args.address:
        from cluster.distributed_engine import generate_on_cluster
        from cluster.topology import ClusterConfig

        cluster = ClusterConfig(args.attention_workers or 1, args.expert_workers or 1, device=args.device)
        results = generate_on_cluster(model, prompts, params, engine_cfg, cluster, args.address)
    else:
        results = LLMEngine.from_checkpoint(model, engine_cfg).generate(prompts, params)
    for i, r in enumerate(results):
        text = tokenizer.decode_output(r.token_ids)
        if args.json:
            print(
                json.dumps(
                    {
                        "index": i,
                        "prompt_token_ids": r.prompt_token_ids,
                        "token_ids": r.token_ids,
                        "text": text,
                        "finish_reason": r.finish_reason.value if r.finish_reason else None,
                    }
                )
            )
        else:
            print(f"--- completion {i} ({len(r.token_ids)} tokens, {r.finish_reason.value}) ---\n{text}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        parser.exit(2, f"llama4-ep {args.command}: error: {e}\n")
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
