"""The `llama4-ep` command line: every subcommand's parser, and `main`.

The commands that run a model import torch (and Ray) only when they run, so `llama4-ep client`,
`status` and `--help` start at once.
"""

from __future__ import annotations

import argparse
import sys

from bench.cli import add_bench_parser
from bench.experiment.cli import add_experiment_parser
from engine.kv_sizing import parse_kv_cache_memory
from model.presets import PRESETS
from serving.cli import add_client_parser, add_parallel_min_tokens, add_serve_parser
from serving.status import add_status_parser


def _generate(args: argparse.Namespace) -> int:
    from cli.generate import cmd_generate  # lazy: start-up time of the other commands

    return cmd_generate(args)


def _make_checkpoint(args: argparse.Namespace) -> int:
    from cli.generate import cmd_make_checkpoint  # lazy: start-up time of the other commands

    return cmd_make_checkpoint(args)


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


def _kv_cache_memory(text: str) -> float:
    try:
        return parse_kv_cache_memory(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


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
    p.add_argument(
        "--image",
        action="append",
        default=None,
        help="an image file shown before the --chat text (repeatable)",
    )
    p.add_argument(
        "--vision-workers",
        type=int,
        default=0,
        help="with the cluster: vision-encoder actors (0: the attention workers encode)",
    )
    _add_sampling_arguments(p)
    _add_generate_engine_arguments(p)
    p.set_defaults(func=_generate)


def _add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    """How many tokens, how they are picked, how they are printed."""
    p.add_argument("--max-tokens", type=_positive_int("--max-tokens"), default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at stop tokens")
    p.add_argument("--json", action="store_true", help="one JSON object per prompt (token_ids, text, ...)")


def _add_generate_engine_arguments(p: argparse.ArgumentParser) -> None:
    """The engine that generates: its dtype, KV cache and threads; the cluster's workers; the device."""
    p.add_argument(
        "--dtype", default="auto", help="compute dtype: auto (bfloat16 on cuda, float32 on cpu), float32, ..."
    )
    p.add_argument(
        "--kv-cache-memory",
        type=_kv_cache_memory,
        default=None,
        help="KV cache per attention rank: a fraction of the memory free after the weights (0.9) or a "
        "size (40GiB); default: a fixed 4096 blocks",
    )
    add_parallel_min_tokens(p)
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
    p.add_argument(
        "--device", default="cpu", help="cpu or cuda: the engine's device (cluster workers': gloo or NCCL)"
    )


def _add_make_checkpoint(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("make-checkpoint", help="write a random-weight checkpoint in the Hugging Face layout")
    p.add_argument("--preset", required=True, choices=sorted(PRESETS))
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-shard-size", default=None, help="e.g. 20MB: shard with an index file")
    p.add_argument(
        "--expert-skew",
        type=float,
        default=0.0,
        help="Zipf exponent of expert popularity (0: random routers); see model/skew.py",
    )
    p.add_argument("--skew-seed", type=int, default=0, help="which experts are hot, per layer")
    p.add_argument("--no-vision", action="store_true", help="text only: no vision tower")
    p.set_defaults(func=_make_checkpoint)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llama4-ep",
        description="Serve, run and measure Llama 4 mixture-of-experts models, their experts in Ray actors.",
        epilog="With no --model, generate and serve use a tiny Llama 4-shaped checkpoint they make once.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    _add_make_checkpoint(sub)
    add_bench_parser(sub)
    add_serve_parser(sub)
    add_client_parser(sub)
    add_status_parser(sub)
    add_experiment_parser(sub)
    return parser


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
