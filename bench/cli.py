"""`llama4-ep bench ...`: benchmarks that print a table, then one JSON line of figures.

The parsers live here and the benchmarks in their own modules, imported only when one runs, so
that the CLI's other commands start without loading torch and Ray.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from bench.gpu_args import add_gpu_arguments
from bench.serve import add_bench_serve_parser
from serving.cli import add_parallel_min_tokens, count_type


def _decode(args: argparse.Namespace) -> int:
    from bench.decode import cmd_decode  # lazy: start-up time of the CLI

    return cmd_decode(args)


def _overhead(args: argparse.Namespace) -> int:
    from bench.overhead import cmd_overhead  # lazy: start-up time of the CLI

    return cmd_overhead(args)


def _dispatch(args: argparse.Namespace) -> int:
    from bench.dispatch import cmd_dispatch  # lazy: start-up time of the CLI

    return cmd_dispatch(args)


def _kv(args: argparse.Namespace) -> int:
    from bench.kv import cmd_kv  # lazy: start-up time of the CLI

    return cmd_kv(args)


def _faults(args: argparse.Namespace) -> int:
    from bench.faults import cmd_faults  # lazy: start-up time of the CLI

    return cmd_faults(args)


def _resize(args: argparse.Namespace) -> int:
    from bench.resize import cmd_resize  # lazy: start-up time of the CLI

    return cmd_resize(args)


def _vision(args: argparse.Namespace) -> int:
    from bench.vision import cmd_vision  # lazy: start-up time of the CLI

    return cmd_vision(args)


def _replication(args: argparse.Namespace) -> int:
    from bench.replication import cmd_replication  # lazy: start-up time of the CLI

    return cmd_replication(args)


def _gpu(args: argparse.Namespace) -> int:
    from bench.gpu import cmd_gpu  # lazy: start-up time of the CLI

    return cmd_gpu(args)


def _serve_compare(args: argparse.Namespace) -> int:
    from bench.serve_compare import cmd_serve_compare  # lazy: start-up time of the CLI

    return cmd_serve_compare(args)


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"need comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"need integers >= 1, got {text!r}")
    return values


def _transports(text: str) -> tuple[str, ...]:
    from router.transport import TRANSPORTS  # lazy: it imports torch, and parsing must not

    values = tuple(t.strip() for t in text.split(",") if t.strip())
    bad = [t for t in values if t not in TRANSPORTS]
    if not values or bad:
        raise argparse.ArgumentTypeError(f"need transports from {', '.join(TRANSPORTS)}, got {text!r}")
    return values


def add_bench_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks (print a table, then one JSON line)")
    bench = p.add_subparsers(dest="bench", required=True)
    d = bench.add_parser("decode", help="decode throughput: this engine against transformers")
    d.add_argument("--model", help="checkpoint (default: the bench-maverick preset, made once)")
    d.add_argument("--batch", type=int, default=32)
    d.add_argument("--new-tokens", type=int, default=32)
    d.add_argument("--prompt-len", type=int, default=16)
    d.add_argument("--reps", type=int, default=2, help="runs of each length; the fastest counts")
    d.add_argument("--no-transformers", action="store_true", help="skip the transformers baseline")
    d.add_argument("--attention-workers", type=int, default=1, help="cluster column: attention workers")
    d.add_argument("--expert-workers", type=int, default=4, help="cluster column: expert workers (0: skip)")
    add_parallel_min_tokens(d)
    d.add_argument("--no-peers", action="store_true", help="skip the llama.cpp and vLLM CPU columns")
    d.add_argument("--peer-threads", type=int, help="the peers' threads (default: torch's, as this engine)")
    d.add_argument("--rounds", type=int, default=2, help="with peers: rounds of all engines; the best counts")
    d.add_argument("--peer-dir", help="where the peers were built (default ~/.cache/llama4-ep-peers)")
    d.add_argument("--peer-scripts", help="the peers' scripts (default ../shared/peers beside the repo)")
    d.add_argument("--profile", type=int, default=0, metavar="N", help="then a profiled run's top N ops")
    d.set_defaults(func=_decode)
    _add_overhead_parser(bench)
    _add_dispatch_parser(bench)
    _add_kv_parser(bench)
    add_bench_serve_parser(bench)
    _add_serve_compare_parser(bench)
    _add_replication_parser(bench)
    _add_faults_parser(bench)
    _add_resize_parser(bench)
    _add_vision_parser(bench)
    _add_gpu_parser(bench)


def _add_overhead_parser(bench: argparse._SubParsersAction) -> None:
    o = bench.add_parser("overhead", help="decode step time outside the model's math, per batch size")
    o.add_argument("--model", help="checkpoint (default: the bench-maverick preset, made once)")
    o.add_argument("--batch", type=_int_list, default=(1, 32), help="batch sizes: 1,32")
    o.add_argument("--new-tokens", type=int, default=32)
    o.add_argument("--prompt-len", type=int, default=16)
    o.add_argument("--reps", type=int, default=2, help="runs per batch; the fastest counts")
    o.add_argument("--expert-workers", type=int, default=2, help="cluster row: expert workers (0: skip)")
    o.add_argument(
        "--transports",
        type=_transports,
        default=("auto",),
        help="a cluster row per transport: auto (sockets on CPUs), collective (gloo); e.g. auto,collective",
    )
    o.set_defaults(func=_overhead)


def _add_serve_compare_parser(bench: argparse._SubParsersAction) -> None:
    c = bench.add_parser("serve-compare", help="vLLM CPU's server and ours, one after another, same load")
    c.add_argument("--model", help="checkpoint (default: the bench-maverick preset, made once)")
    c.add_argument(
        "--servers",
        default="vllm,single,default",
        help="in order: vllm, single, colocated, default, default-gloo (over gloo collectives), "
        "single-thread and colocated-thread (the engine on a thread of its replica); ours take a "
        "stream interval, single:4 "
        "(%(default)s)",
    )
    c.add_argument("--num-prompts", type=count_type("--num-prompts", 1), default=32)
    c.add_argument("--input-len", type=count_type("--input-len", 1), default=32)
    c.add_argument("--output-len", type=count_type("--output-len", 1), default=32)
    c.add_argument("--max-concurrency", type=count_type("--max-concurrency", 1), default=8)
    c.add_argument("--stream-interval", type=count_type("--stream-interval", 1), default=1, help="ours")
    c.add_argument(
        "--port", type=count_type("--port", 1), default=8100, help="HTTP port of each server in turn"
    )
    c.add_argument("--peer-dir", help="where the peers were built (default ~/.cache/llama4-ep-peers)")
    c.add_argument("--log-dir", default="serve-compare-logs", help="each server's output")
    c.set_defaults(
        func=_serve_compare,
        endpoint="completions",
        request_rate=float("inf"),
        burstiness=1.0,
        seed=0,
        timeout=600.0,
        no_ignore_eos=False,
    )


def _add_vision_parser(bench: argparse._SubParsersAction) -> None:
    v = bench.add_parser("vision", help="vision-encoder images/s, and TTFT with an image against text only")
    v.add_argument("--model", help="checkpoint with a vision tower (default: the bench-maverick preset)")
    v.add_argument("--vision-workers", type=int, default=1, help="vision-encoder actors (0: in-process)")
    v.add_argument("--attention-workers", type=int, default=1)
    v.add_argument("--expert-workers", type=int, default=1, help="0: the single-process engine")
    v.add_argument("--images", type=int, default=16, help="images per encoder call (the batch)")
    v.add_argument("--image-size", default="672x672", help="HxW of the test image (672x672: 2x2 tiles + 1)")
    v.add_argument("--reps", type=int, default=5, help="timed encoder calls, and TTFT pairs")
    v.add_argument("--dtype", default="float32")
    v.set_defaults(func=_vision)


def _add_gpu_parser(bench: argparse._SubParsersAction) -> None:
    g = bench.add_parser(
        "gpu",
        help="the GPU check: colocated engine vs transformers on one GPU (tokens, decode tok/s, MoE "
        "roofline); one JSON line. Without Ray: scripts/gpu-check.sh",
    )
    add_gpu_arguments(g)
    g.set_defaults(func=_gpu)


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
    d.set_defaults(func=_dispatch)


def _add_kv_parser(bench: argparse._SubParsersAction) -> None:
    k = bench.add_parser("kv", help="KV bytes per sequence against the layer mix's minimum (Llama 4 shape)")
    k.add_argument("--sizes", type=_int_list, default=(4096, 16384, 65536), help="sequence lengths")
    k.add_argument("--block-sizes", type=_int_list, default=(16, 64))
    k.add_argument("--chunk-size", type=int, default=8192, help="attention_chunk_size of the chunked layers")
    k.add_argument("--prefill-chunk", type=int, default=512, help="prompt tokens per step (token budget)")
    k.set_defaults(func=_kv)


def _add_replication_parser(bench: argparse._SubParsersAction) -> None:
    r = bench.add_parser(
        "replication", help="balancedness, throughput and step times: static map against dynamic replication"
    )
    r.add_argument("--quick", action="store_true", help="short phases (about two minutes on 2 CPU cores)")
    # unset options take the full (or --quick) run's values (bench/replication.py FULL, QUICK)
    r.add_argument("--preset", help="default bench-maverick")
    r.add_argument("--expert-skew", type=float, help="Zipf exponent of the routers (default 1.2)")
    r.add_argument("--skew-seed", type=int, help="hot experts at the start (default 0)")
    r.add_argument("--shift-skew-seed", type=int, help="hot experts after a shift (default 1)")
    r.add_argument("--attention-workers", type=int, help="default 1")
    r.add_argument("--expert-workers", type=int, help="default 8")
    r.add_argument("--redundant-slots", type=int, help="per expert worker (default 2)")
    r.add_argument("--batch", type=int, help="requests always running")
    r.add_argument("--max-tokens", type=int, help="per request (a finished one is replaced)")
    r.add_argument("--steps", help="steps per phase: warmup,static,settle,rebalanced,shift,num_shifts")
    r.add_argument("--probe", type=int, help="steps per window of rolling balancedness")
    r.add_argument("--window", type=int, help="RebalanceConfig.window_steps")
    r.add_argument("--interval", type=int, help="RebalanceConfig.interval_steps")
    r.add_argument("--threshold", type=float, help="RebalanceConfig.imbalance_threshold")
    r.add_argument("--min-gain", type=float, help="RebalanceConfig.min_gain")
    r.add_argument("--report-every", type=int, help="RebalanceConfig.report_every")
    r.add_argument("--shift-steps", type=int, help="RebalanceConfig.shift_steps")
    r.add_argument(
        "--shift-threshold",
        type=_threshold,
        help="RebalanceConfig.shift_threshold ('off': no shift detection)",
    )
    r.add_argument("--plot", type=Path, default=Path(tempfile.gettempdir()) / "llama4-ep-replication.png")
    r.set_defaults(func=_replication)


def _threshold(text: str) -> float | str:
    """A number, or 'off' (kept as the string: unset options are None, so None cannot mean off)."""
    if text == "off":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"need a number or 'off', got {text!r}") from None


def _add_faults_parser(bench: argparse._SubParsersAction) -> None:
    f = bench.add_parser("faults", help="lost and hung workers: failed requests, stalls, same tokens")
    f.add_argument("--model", help="checkpoint (default: the --preset checkpoint, made once)")
    f.add_argument("--preset", default="tiny-maverick")
    f.add_argument(
        "--kind",
        dest="kinds",
        action="append",
        help="expert-kill, expert-kill-redundant, attention-kill, expert-hang (repeatable; default all)",
    )
    f.add_argument("--requests", type=int, default=8, help="requests in flight")
    f.add_argument("--max-tokens", type=int, default=32)
    f.add_argument("--kill-at-step", type=int, default=6)
    f.add_argument("--num-cpus", type=float, default=2, help="CPUs of the local Ray instance")
    f.set_defaults(func=_faults)


def _tier_sizes(text: str) -> tuple[int, int]:
    """'1+2' -> (1 attention, 2 expert workers)."""
    try:
        attention, expert = (int(x) for x in text.split("+"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"write ATTENTION+EXPERT workers, e.g. 1+2; got {text!r}") from None
    if attention < 1 or expert < 1:
        raise argparse.ArgumentTypeError(f"at least one worker per tier, got {text!r}")
    return attention, expert


def _add_resize_parser(bench: argparse._SubParsersAction) -> None:
    r = bench.add_parser("resize", help="grow and shrink both tiers under streams: seconds, step ratio")
    r.add_argument("--model", help="checkpoint (default: the --preset checkpoint, made once)")
    r.add_argument("--preset", default="tiny-maverick")
    r.add_argument("--small", type=_tier_sizes, default=(1, 1), help="ATTENTION+EXPERT workers at the start")
    r.add_argument("--large", type=_tier_sizes, default=(2, 2), help="ATTENTION+EXPERT workers to grow to")
    r.add_argument("--requests", type=int, default=8, help="streams in flight")
    r.add_argument("--max-tokens", type=int, default=600, help="long enough to outlast both changes")
    r.add_argument("--steady-steps", type=int, default=20, help="steps timed before each change")
    r.add_argument("--cpus-per-worker", type=float, default=0.25, help="room for the grown size")
    r.add_argument("--num-cpus", type=float, default=2, help="CPUs of the local Ray instance")
    r.set_defaults(func=_resize)
