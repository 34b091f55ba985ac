"""`llama4-ep bench serve`: a serving benchmark against a running server's OpenAI endpoints.

It reports what `vllm bench serve` reports: completed and failed requests, request, output and
total token throughput, time to first token (TTFT), time per output token after the first
(TPOT), inter-token latency (ITL) and end-to-end latency (E2EL) as mean, median, std and
percentiles, and goodput (requests per second meeting every `--goodput` target). Arrivals are
open-loop Poisson at `--request-rate` (gamma with `--burstiness`), or all at once with
`--max-concurrency` as the closed-loop cap. Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

METRICS = ("ttft", "tpot", "itl", "e2el")
_TITLES = {
    "ttft": "Time to first token",
    "tpot": "Time per output token (after the first)",
    "itl": "Inter-token latency",
    "e2el": "End-to-end latency",
}


@dataclass
class RequestResult:
    ok: bool = False
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft_s: float = 0.0
    latency_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)
    error: str = ""

    @property
    def tpot_s(self) -> float | None:
        if self.output_tokens < 2:
            return None
        return (self.latency_s - self.ttft_s) / (self.output_tokens - 1)


def add_bench_serve_parser(bench: argparse._SubParsersAction) -> None:
    """Register `serve` under `llama4-ep bench`."""
    p = bench.add_parser("serve", help="serving benchmark against a running server (like `vllm bench serve`)")
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="the server (default %(default)s)")
    p.add_argument("--endpoint", choices=("completions", "chat"), default="completions")
    p.add_argument("--model", default=None, help="default: the one the server lists")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", type=int, default=32, help="prompt tokens (random ids; chat: words)")
    p.add_argument("--output-len", type=int, default=32, help="max_tokens per request")
    p.add_argument(
        "--request-rate", type=float, default=math.inf, help="requests/s, Poisson (default inf: all at once)"
    )
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of arrivals; 1 is Poisson")
    p.add_argument("--max-concurrency", type=int, default=None, help="cap on requests in flight")
    p.add_argument(
        "--goodput", nargs="+", default=[], metavar="METRIC:MS", help="SLOs, e.g. ttft:500 tpot:50"
    )
    p.add_argument("--percentiles", default="50,90,99", help="percentiles to report (default %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--no-ignore-eos", action="store_true", help="stop at stop tokens (default: run to length)"
    )
    p.add_argument("--timeout", type=float, default=600.0, help="per request, seconds")
    p.set_defaults(func=_cmd_bench_serve)


def parse_goodput(items: Sequence[str]) -> dict[str, float]:
    """["ttft:500", "tpot:50"] -> {"ttft": 0.5, "tpot": 0.05} (seconds)."""
    slos = {}
    for item in items:
        name, _, ms = item.partition(":")
        if name not in METRICS:
            raise ValueError(f"--goodput {item!r}: metric must be one of {', '.join(METRICS)}")
        try:
            slos[name] = float(ms) / 1000.0
        except ValueError:
            raise ValueError(f"--goodput {item!r}: give milliseconds, e.g. {name}:100") from None
    return slos


def arrival_gaps(n: int, rate: float, burstiness: float, rng: random.Random) -> list[float]:
    """Seconds to wait before each request: gamma(shape=burstiness, mean=1/rate); 0 for rate inf."""
    if math.isinf(rate):
        return [0.0] * n
    if rate <= 0 or burstiness <= 0:
        raise ValueError(f"--request-rate and --burstiness must be > 0, got {rate} and {burstiness}")
    return [rng.gammavariate(burstiness, 1.0 / (rate * burstiness)) for _ in range(n)]


def _stats(values: Sequence[float], percentiles: Sequence[float]) -> dict[str, float]:
    """mean, median, std and percentiles of `values` (seconds) in milliseconds."""
    if not values:
        return {"mean": 0.0, "median": 0.0, "std": 0.0, **{f"p{p:g}": 0.0 for p in percentiles}}
    ms = sorted(v * 1000.0 for v in values)
    out = {"mean": statistics.fmean(ms), "median": statistics.median(ms), "std": statistics.pstdev(ms)}
    for p in percentiles:
        rank = min(len(ms) - 1, max(0, math.ceil(p / 100.0 * len(ms)) - 1))
        out[f"p{p:g}"] = ms[rank]
    return out


def _meets(r: RequestResult, slos: dict[str, float]) -> bool:
    values = {
        "ttft": r.ttft_s,
        "tpot": r.tpot_s or 0.0,
        "e2el": r.latency_s,
        "itl": max(r.itl_s, default=0.0),
    }
    return r.ok and all(values[name] <= limit for name, limit in slos.items())


def summarize(
    results: Sequence[RequestResult], duration_s: float, slos: dict[str, float], percentiles: Sequence[float]
) -> dict[str, Any]:
    """The benchmark's figures from per-request results (pure; tested without a server)."""
    done = [r for r in results if r.ok]
    total_in = sum(r.prompt_tokens for r in done)
    total_out = sum(r.output_tokens for r in done)
    figures: dict[str, Any] = {
        "completed": len(done),
        "failed": len(results) - len(done),
        "duration_s": duration_s,
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": len(done) / duration_s,
        "output_throughput": total_out / duration_s,
        "total_token_throughput": (total_in + total_out) / duration_s,
    }
    if slos:
        figures["request_goodput"] = sum(_meets(r, slos) for r in done) / duration_s
    samples = {
        "ttft": [r.ttft_s for r in done],
        "tpot": [t for r in done if (t := r.tpot_s) is not None],
        "itl": [gap for r in done for gap in r.itl_s],
        "e2el": [r.latency_s for r in done],
    }
    for name, values in samples.items():
        for key, value in _stats(values, percentiles).items():
            figures[f"{key}_{name}_ms"] = value
    return figures


# -- the client loop --------------------------------------------------------------------------


def _bodies(args: argparse.Namespace, model: str) -> list[tuple[str, dict[str, Any]]]:
    rng = random.Random(args.seed)
    out = []
    for _ in range(args.num_prompts):
        ids = [rng.randrange(1000, 100000) for _ in range(args.input_len)]
        body = {
            "model": model,
            "max_tokens": args.output_len,
            "temperature": 0.0,
            "stream": True,
            "stream_options": {"include_usage": True},
            "ignore_eos": not args.no_ignore_eos,
        }
        if args.endpoint == "chat":
            words = " ".join(f"w{i}" for i in ids)  # input_len words (a few tokens each)
            out.append(("/v1/chat/completions", {**body, "messages": [{"role": "user", "content": words}]}))
        else:
            out.append(("/v1/completions", {**body, "prompt": [200000, *ids[1:]]}))
    return out


async def stream_completion(client: Any, path: str, body: dict[str, Any]) -> RequestResult:
    """One streamed request; the result holds its TTFT, inter-token gaps and latency, or its error."""
    r = RequestResult()
    start = last = time.perf_counter()
    try:
        async with client.stream("POST", path, json=body) as resp:
            if resp.status_code != 200:
                r.error = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
                return r
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[len("data: ") :])
                if "error" in chunk:
                    r.error = chunk["error"].get("message", "error")
                    return r
                if chunk.get("usage"):
                    r.prompt_tokens = chunk["usage"]["prompt_tokens"]
                    r.output_tokens = chunk["usage"]["completion_tokens"]
                if not any("text" in c or "content" in c.get("delta", {}) for c in chunk["choices"]):
                    continue  # the usage chunk, or the chat opening chunk with the role only
                now = time.perf_counter()
                if r.ttft_s == 0.0:
                    r.ttft_s = now - start
                else:
                    r.itl_s.append(now - last)
                last = now
        r.latency_s = time.perf_counter() - start
        r.ok = r.output_tokens > 0
    except Exception as e:  # a benchmark reports failures, it does not stop at the first
        r.error = f"{type(e).__name__}: {e}"
    return r


async def run(args: argparse.Namespace, model: str) -> tuple[list[RequestResult], float]:
    import httpx

    bodies = _bodies(args, model)
    gaps = arrival_gaps(len(bodies), args.request_rate, args.burstiness, random.Random(args.seed + 1))
    limit = asyncio.Semaphore(args.max_concurrency or len(bodies))
    timeout = httpx.Timeout(args.timeout)
    limits = httpx.Limits(max_connections=args.max_concurrency or len(bodies) or 1)

    async with httpx.AsyncClient(base_url=args.base_url, timeout=timeout, limits=limits) as client:

        async def limited(path: str, body: dict[str, Any]) -> RequestResult:
            async with limit:
                return await stream_completion(client, path, body)

        start = time.perf_counter()
        tasks = []
        for (path, body), gap in zip(bodies, gaps, strict=True):
            await asyncio.sleep(gap)
            tasks.append(asyncio.create_task(limited(path, body)))
        results = await asyncio.gather(*tasks)
        return list(results), time.perf_counter() - start


# The server's own histograms that `bench serve` reads from its /metrics -> what they time: ours
# (summed over replicas) and vLLM's, whose TTFT its API server times from a request's arrival.
SERVER_HISTOGRAMS = {
    "llama4_ep_engine_step_seconds": "step",
    "llama4_ep_time_to_first_token_seconds": "ttft",
    "vllm:time_to_first_token_seconds": "ttft",
}


def server_sums(base_url: str) -> dict[str, tuple[float, float]]:
    """(seconds, count) so far of each kind of `SERVER_HISTOGRAMS` the server at `base_url` reports
    on its /metrics, summed over its replicas and labels: "step" its engine's steps, "ttft" the
    time to first token its ingress measured (from the request's arrival there). {} where it
    reports none, or cannot be read."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    try:
        text = httpx.get(f"{base_url}/metrics", timeout=30).text
    except httpx.HTTPError:
        return {}
    sums: dict[str, tuple[float, float]] = {}
    for family in text_string_to_metric_families(text):
        key = SERVER_HISTOGRAMS.get(family.name)
        if key is None:
            continue
        by_name = {"_sum": 0.0, "_count": 0.0}
        for sample in family.samples:
            suffix = sample.name.removeprefix(family.name)
            if suffix in by_name:
                by_name[suffix] += sample.value
        sums[key] = (by_name["_sum"], by_name["_count"])
    return sums


def server_figures(
    before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]], client: dict[str, Any]
) -> dict[str, float]:
    """What the server's own histograms say about the run, beside the client's figures: the mean
    engine step and the ITL beyond it (`step_figures`), and the mean TTFT at the server with what
    the path outside it added (the client's mean TTFT less the server's: the HTTP proxy, the
    connection, the client itself). Only what the server reports."""
    out = step_figures(before.get("step"), after.get("step"), client["mean_itl_ms"])
    ttft = _mean_ms(before.get("ttft"), after.get("ttft"))
    if ttft is not None:
        out["mean_server_ttft_ms"] = ttft
        out["ttft_outside_server_ms"] = client["mean_ttft_ms"] - ttft
    return out


def step_figures(
    before: tuple[float, float] | None, after: tuple[float, float] | None, mean_itl_ms: float
) -> dict[str, float]:
    """The engine's mean step over the run, and what the serving path added to each token beyond
    it (mean ITL less mean step); {} for a server that does not report its steps."""
    step_ms = _mean_ms(before, after)
    if step_ms is None:
        return {}
    return {"mean_engine_step_ms": step_ms, "itl_minus_step_ms": mean_itl_ms - step_ms}


def _mean_ms(before: tuple[float, float] | None, after: tuple[float, float] | None) -> float | None:
    """The mean in ms of what a histogram observed between two readings of its (sum, count)."""
    if before is None or after is None or after[1] <= before[1]:
        return None
    return (after[0] - before[0]) / (after[1] - before[1]) * 1e3


def _served_model(base_url: str) -> str:
    import httpx

    return httpx.get(f"{base_url}/v1/models", timeout=30).json()["data"][0]["id"]


def _cmd_bench_serve(args: argparse.Namespace) -> int:
    import httpx

    slos = parse_goodput(args.goodput)
    percentiles = [float(p) for p in args.percentiles.split(",")]
    try:
        model = args.model or _served_model(args.base_url)
    except httpx.HTTPError as e:
        raise ValueError(f"cannot reach {args.base_url}: {e}") from None
    before = server_sums(args.base_url)
    results, duration = asyncio.run(run(args, model))
    figures = summarize(results, duration, slos, percentiles)
    figures.update(server_figures(before, server_sums(args.base_url), figures))
    _print_table(args, model, figures, percentiles, [r.error for r in results if not r.ok])
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in figures.items()}))
    return 0 if figures["completed"] else 1


def _print_table(
    args: argparse.Namespace, model: str, f: dict[str, Any], percentiles: Sequence[float], errors: list[str]
) -> None:
    rate = "inf" if math.isinf(args.request_rate) else f"{args.request_rate:g}/s"
    print(f"serving benchmark: {args.base_url} /{args.endpoint}, model {model}")
    print(
        f"{args.num_prompts} prompts x {args.input_len} in / {args.output_len} out, request rate {rate}, "
        f"max concurrency {args.max_concurrency or 'none'}"
    )
    rows = [
        ("Successful requests", f"{f['completed']}"),
        ("Failed requests", f"{f['failed']}"),
        ("Benchmark duration (s)", f"{f['duration_s']:.2f}"),
        ("Total input tokens", f"{f['total_input_tokens']}"),
        ("Total generated tokens", f"{f['total_output_tokens']}"),
        ("Request throughput (req/s)", f"{f['request_throughput']:.2f}"),
        ("Output token throughput (tok/s)", f"{f['output_throughput']:.2f}"),
        ("Total token throughput (tok/s)", f"{f['total_token_throughput']:.2f}"),
    ]
    if "request_goodput" in f:
        rows.append(("Request goodput (req/s)", f"{f['request_goodput']:.2f}"))
    for name, title in _TITLES.items():
        rows.append((f"--- {title} ---", ""))
        for key in ("mean", "median", "std", *(f"p{p:g}" for p in percentiles)):
            label = key.upper() if key.startswith("p") else key.capitalize()
            rows.append((f"{label} {name.upper()} (ms)", f"{f[f'{key}_{name}_ms']:.2f}"))
    if "mean_engine_step_ms" in f or "mean_server_ttft_ms" in f:
        rows.append(("--- The server's own figures (its /metrics) ---", ""))
    if "mean_engine_step_ms" in f:
        rows.append(("Mean engine step (ms)", f"{f['mean_engine_step_ms']:.2f}"))
        rows.append(("Mean ITL less mean step (ms)", f"{f['itl_minus_step_ms']:.2f}"))
    if "mean_server_ttft_ms" in f:
        rows.append(("Mean TTFT at the server (ms)", f"{f['mean_server_ttft_ms']:.2f}"))
        rows.append(("Mean TTFT outside the server (ms)", f"{f['ttft_outside_server_ms']:.2f}"))
    for label, value in rows:
        print(f"{label:<40} {value:>12}")
    for error in sorted(set(errors))[:5]:
        print(f"error: {error}")


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m bench.serve ...`: the same as `llama4-ep bench serve ...`."""
    parser = argparse.ArgumentParser(prog="llama4-ep bench")
    add_bench_serve_parser(parser.add_subparsers(dest="bench", required=True))
    args = parser.parse_args(["serve", *(sys.argv[1:] if argv is None else argv)])
    try:
        return args.func(args)
    except ValueError as e:
        parser.exit(2, f"llama4-ep bench serve: error: {e}\n")


if __name__ == "__main__":
    raise SystemExit(main())
