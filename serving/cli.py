"""`llama4-ep serve` and `llama4-ep client`.

`serve` with no arguments: the tiny-maverick checkpoint (made once, cached), a local Ray
instance, the application with 1 attention + 2 expert workers, HTTP on 127.0.0.1:8000 and gRPC
on port 9000. `--expert-workers 0` serves the single-process (colocated) engine instead. Ctrl-C
(SIGINT) or SIGTERM shuts Serve and Ray down and leaves no process behind.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from serving import APP_NAME
from serving.client import Completion, GRPCClient, HTTPClient, ServerError

DEFAULT_HTTP_PORT = 8000
DEFAULT_GRPC_PORT = 9000


def count_type(name: str, minimum: int):
    """An argparse type: a whole number of at least `minimum` (argparse names the flag)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


def _parallel_min_tokens(text: str) -> int | str:
    """`auto`, or a whole number of tokens >= 1."""
    if text == "auto":
        return text
    try:
        return count_type("--parallel-min-tokens", 1)(text)
    except argparse.ArgumentTypeError as e:
        raise argparse.ArgumentTypeError(f"{e} (or auto)") from None


def add_parallel_min_tokens(p: argparse.ArgumentParser) -> None:
    """The engine's `parallel_min_tokens` flag (None: the engine's default, auto)."""
    p.add_argument(
        "--parallel-min-tokens",
        type=_parallel_min_tokens,
        default=None,
        metavar="N|auto",
        help="on a CPU, whether a step's layers run on one thread or on every thread: auto (the "
        "default) times both per size of step and keeps the faster, measuring again now and then; "
        "N runs steps of at least N tokens on every thread and smaller ones on one",
    )


def parallel_min_tokens_setting(value: int | str | None) -> dict[str, int | str]:
    """The engine setting the flag gives, for EngineConfig or the Serve config's engine section:
    nothing when it was not given, so the engine's default holds (serving.cli imports no torch)."""
    return {} if value is None else {"parallel_min_tokens": value}


def add_serve_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve the model over OpenAI-style HTTP and gRPC (Ray Serve)")
    p.add_argument("--model", help="checkpoint directory (default: the tiny-maverick checkpoint, made once)")
    p.add_argument("--served-model-name", default=None, help="the `model` clients send (default: dir name)")
    _add_layout_arguments(p)
    _add_image_arguments(p)
    _add_engine_arguments(p)
    _add_api_arguments(p)
    p.add_argument("--address", default=None, help="join this Ray cluster (default: start a local one)")
    p.add_argument("--num-cpus", type=float, default=None, help="CPUs of the local Ray instance")
    p.set_defaults(func=_cmd_serve)


def _add_layout_arguments(p: argparse.ArgumentParser) -> None:
    """Each engine replica's workers: the tiers, their bounds, expert replicas, the device."""
    p.add_argument("--attention-workers", type=count_type("--attention-workers", 1), default=1)
    p.add_argument(
        "--expert-workers",
        type=count_type("--expert-workers", 0),
        default=2,
        help="expert workers per engine replica (default 2); 0 serves the single-process engine",
    )
    p.add_argument(
        "--redundant-slots",
        type=count_type("--redundant-slots", 0),
        default=0,
        help="expert slots per worker beyond experts / workers, for replicas of hot experts",
    )
    p.add_argument(
        "--rebalance",
        action="store_true",
        help="re-plan expert replicas from the measured load while serving",
    )
    p.add_argument(
        "--tier-autoscaler",
        action="store_true",
        help="size each replica's expert and attention tiers from their load (bounds below)",
    )
    p.add_argument("--min-expert-workers", type=count_type("--min-expert-workers", 1), default=1)
    p.add_argument("--max-expert-workers", type=count_type("--max-expert-workers", 1), default=8)
    p.add_argument("--min-attention-workers", type=count_type("--min-attention-workers", 1), default=1)
    p.add_argument("--max-attention-workers", type=count_type("--max-attention-workers", 1), default=4)
    p.add_argument(
        "--cpus-per-worker",
        type=float,
        default=None,
        help="CPUs each worker reserves (default: share the cluster's); leave room to add workers",
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="workers' device")
    p.add_argument(
        "--transport",
        choices=("auto", "sockets", "collective"),
        default="auto",
        help="how rows travel between workers: auto is sockets on CPUs, NCCL on GPUs; collective is "
        "torch.distributed's (gloo on CPUs)",
    )


def _add_engine_arguments(p: argparse.ArgumentParser) -> None:
    """Each engine replica's settings: its KV cache, threads, admission and streaming."""
    p.add_argument(
        "--kv-cache-memory",
        default=None,
        help="KV cache per attention worker: a fraction of the memory free after the weights (0.9) "
        "or a size (40GiB); default: a fixed 4096 blocks",
    )
    add_parallel_min_tokens(p)
    p.add_argument(
        "--max-pending",
        type=count_type("--max-pending", 1),
        default=256,
        help="requests one engine replica holds (running + waiting); more are refused with 429",
    )
    p.add_argument(
        "--colocate-ingress",
        action="store_true",
        help="with --expert-workers 0: the ingress in the engine's replica (one Ray hop fewer per token)",
    )
    p.add_argument(
        "--engine-on-thread",
        action="store_true",
        help="with --expert-workers 0: step the engine on a thread of its replica, not in a child "
        "process with a GIL of its own",
    )
    p.add_argument(
        "--engine-restarts",
        type=count_type("--engine-restarts", 0),
        default=3,
        help="with --expert-workers 0: replace a lost engine process this many times in 10 minutes, "
        "resuming its requests (default 3; 0: Serve replaces the replica at once)",
    )
    p.add_argument(
        "--threads",
        type=count_type("--threads", 1),
        default=None,
        help="intra-op threads of the single-process engine (default: its share of the CPUs)",
    )
    p.add_argument(
        "--stream-interval",
        type=count_type("--stream-interval", 1),
        default=1,
        help="tokens a stream holds before it sends them (the first token and the end go at once); "
        "more: fewer, larger messages, less CPU per token (default 1: every token)",
    )


def _add_api_arguments(p: argparse.ArgumentParser) -> None:
    """Where and to whom the server answers."""
    p.add_argument("--host", default="127.0.0.1", help="HTTP host (default 127.0.0.1)")
    p.add_argument("--http-port", type=count_type("--http-port", 1), default=DEFAULT_HTTP_PORT)
    p.add_argument(
        "--grpc-port",
        type=count_type("--grpc-port", 1),
        default=DEFAULT_GRPC_PORT,
        help="gRPC port (Serve's gRPC proxy listens on all interfaces whatever --host says)",
    )
    p.add_argument(
        "--api-key",
        default=None,
        help="clients must send it (HTTP `Authorization: Bearer`, gRPC `authorization` metadata); "
        "default: $LLAMA4_EP_API_KEY, else no key",
    )
    p.add_argument(
        "--strict-requests",
        action="store_true",
        help="refuse unknown request fields with 400 (default: ignore them with a warning)",
    )
    p.add_argument(
        "--allowed-origins",
        default="",
        help="CORS: comma-separated origins allowed to call from a browser, or '*' (default: none)",
    )


def _add_image_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("images")
    g.add_argument(
        "--vision-workers",
        type=count_type("--vision-workers", 0),
        default=0,
        help="vision-encoder actors per engine replica (default 0: the attention workers encode)",
    )
    g.add_argument(
        "--max-images-per-prompt",
        type=count_type("--max-images-per-prompt", 1),
        default=8,
        help="images one request may carry (default 8)",
    )
    g.add_argument(
        "--allowed-local-media-path",
        default=None,
        help="serve file:// image URLs below this folder (default: no local files)",
    )
    g.add_argument(
        "--allowed-media-domains",
        default=None,
        help="comma-separated hosts http(s) image URLs may name (default: any host)",
    )
    g.add_argument(
        "--no-http-media", action="store_true", help="refuse http(s) image URLs (data: URLs still work)"
    )
    g.add_argument(
        "--media-fetch-timeout", type=float, default=10.0, help="seconds per image URL (default 10)"
    )


def _media(args: argparse.Namespace) -> dict[str, Any]:
    domains = args.allowed_media_domains
    return {
        "max_images_per_prompt": args.max_images_per_prompt,
        "allowed_local_media_path": args.allowed_local_media_path,
        "allowed_media_domains": [d.strip() for d in domains.split(",") if d.strip()] if domains else None,
        "allow_http": not args.no_http_media,
        "fetch_timeout_s": args.media_fetch_timeout,
    }


def add_client_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("client", help="send one request to a running server and stream the reply")
    p.add_argument("--grpc", action="store_true", help="use gRPC (default: HTTP)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument(
        "--port", type=count_type("--port", 1), default=None, help="default 8000 (HTTP) or 9000 (gRPC)"
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="raw text, tokenized with <|begin_of_text|>")
    src.add_argument("--chat", help="a user message, through the chat template")
    p.add_argument(
        "--image", action="append", default=None, help="an image file shown before --chat's text (repeatable)"
    )
    p.add_argument("--max-tokens", type=count_type("--max-tokens", 1), default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=None, help="a stop string (repeatable)")
    p.add_argument("--no-stream", action="store_true", help="wait for the whole reply")
    p.set_defaults(func=_cmd_client)


# -- serve ----------------------------------------------------------------------------------


def _cmd_serve(args: argparse.Namespace) -> int:
    # lazy: start-up time of the CLI's other commands (these load Ray, Serve and torch)
    import ray
    from ray import serve
    from ray.serve.config import gRPCOptions

    from serving.app import ServeAppConfig, build_app, resolve_model  # lazy: see above
    from serving.grpc_service import SERVICER_FUNCTIONS  # lazy: see above

    config = ServeAppConfig(
        model=resolve_model(args.model),
        served_model_name=args.served_model_name,
        attention_workers=args.attention_workers,
        expert_workers=args.expert_workers,
        redundant_slots=args.redundant_slots,
        rebalance={"enabled": args.rebalance},
        tiers={
            "autoscaler": {
                "enabled": args.tier_autoscaler,
                "min_expert_workers": args.min_expert_workers,
                "max_expert_workers": args.max_expert_workers,
                "min_attention_workers": args.min_attention_workers,
                "max_attention_workers": args.max_attention_workers,
            }
        },
        cpus_per_worker=args.cpus_per_worker,
        device=args.device,
        transport=args.transport,
        engine=_engine_args(args),
        max_pending=args.max_pending,
        stream_interval=args.stream_interval,
        threads=args.threads,
        colocate_ingress=args.colocate_ingress,
        engine_process=not args.engine_on_thread,
        engine_restarts=args.engine_restarts,
        api_key=args.api_key,
        strict_requests=args.strict_requests,
        allowed_origins=[o.strip() for o in args.allowed_origins.split(",") if o.strip()],
        vision_workers=args.vision_workers,
        media=_media(args),
    )
    ray.init(address=args.address, num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    _stop_on_signals()  # after ray.init, which installs a SIGTERM handler of its own
    try:
        app = build_app(config)
        serve.start(
            http_options={"host": args.host, "port": args.http_port},
            grpc_options=gRPCOptions(port=args.grpc_port, grpc_servicer_functions=list(SERVICER_FUNCTIONS)),
        )
        serve.run(app, name=APP_NAME, route_prefix="/")
        _print_where(args, config)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("\nshutting down", file=sys.stderr, flush=True)
        return 0
    finally:
        _shutdown(serve, ray)


def _engine_args(args: argparse.Namespace) -> dict[str, Any]:
    """The engine section of the Serve config: what the flags set (the rest keeps its default)."""
    return {"kv_cache_memory": args.kv_cache_memory, **parallel_min_tokens_setting(args.parallel_min_tokens)}


def _stop_on_signals() -> None:
    """SIGINT and SIGTERM both stop the server cleanly (SIGINT explicitly: a shell starts a
    background job with SIGINT ignored, and Python then never raises KeyboardInterrupt)."""

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def _shutdown(serve: Any, ray: Any) -> None:
    # a second Ctrl-C while shutting down must not leave Ray half-stopped
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        serve.shutdown()
    finally:
        ray.shutdown()


def _print_where(args: argparse.Namespace, config: Any) -> None:
    print(
        f"llama4-ep is serving {config.model_name!r} ({config.layout()}) from {config.model}\n"
        f"  HTTP  http://{args.host}:{args.http_port}/v1  (OpenAI-compatible; also /health, /metrics)\n"
        f"  gRPC  0.0.0.0:{args.grpc_port}  (llama4_ep.Llama4EP, grpc.health.v1, reflection; metadata "
        f"application={APP_NAME}; Serve binds gRPC to all interfaces)\n"
        "Ctrl-C stops it.",
        flush=True,
    )


# -- client ---------------------------------------------------------------------------------


def _cmd_client(args: argparse.Namespace) -> int:
    port = args.port or (DEFAULT_GRPC_PORT if args.grpc else DEFAULT_HTTP_PORT)
    images = []
    for path in args.image or []:
        try:
            images.append(Path(path).read_bytes())
        except OSError as e:
            print(f"llama4-ep client: --image {path!r}: {e.strerror}", file=sys.stderr)
            return 2
    if images and not args.chat:
        print("llama4-ep client: --image goes with --chat", file=sys.stderr)
        return 2
    kwargs = {
        "prompt": args.prompt,
        "chat": args.chat,
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "seed": args.seed,
        "stop": args.stop,
        "images": images,
    }
    client = GRPCClient(f"{args.host}:{port}") if args.grpc else HTTPClient(f"http://{args.host}:{port}")
    result = Completion()
    try:
        with client:
            if args.no_stream:
                result = client.generate(**kwargs) if args.grpc else client.complete(**kwargs)
                print(result.text, flush=True)
            else:
                for piece in client.stream(result, **kwargs):
                    print(piece, end="", flush=True)
                print(flush=True)
    except ServerError as e:
        print(f"llama4-ep client: the server answered {e.status}: {e.message}", file=sys.stderr)
        return 1
    except (OSError, httpx.TransportError) as e:
        print(f"llama4-ep client: cannot reach {args.host}:{port}: {e}", file=sys.stderr)
        return 1
    u = result.usage
    print(
        f"[finish_reason={result.finish_reason}, prompt {u.get('prompt_tokens')} + "
        f"completion {u.get('completion_tokens')} tokens]",
        file=sys.stderr,
    )
    return 0
