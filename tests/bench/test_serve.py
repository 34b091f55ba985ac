"""The serving benchmark's arithmetic, without a server."""

from __future__ import annotations

import argparse
import math
import random

import pytest

from bench.serve import (
    RequestResult,
    add_bench_serve_parser,
    arrival_gaps,
    parse_goodput,
    server_figures,
    step_figures,
    summarize,
)


def result(ttft: float, latency: float, out: int, ok: bool = True) -> RequestResult:
    gaps = [(latency - ttft) / (out - 1)] * (out - 1) if out > 1 else []
    return RequestResult(
        ok=ok, prompt_tokens=10, output_tokens=out, ttft_s=ttft, latency_s=latency, itl_s=gaps
    )


def test_summary_counts_throughput_latencies_and_goodput():
    results = [result(0.1, 1.1, 11), result(0.3, 2.3, 11), result(0.2, 0.2, 1), result(0, 0, 0, ok=False)]
    f = summarize(results, duration_s=2.0, slos={"ttft": 0.25}, percentiles=[50, 99])
    assert (f["completed"], f["failed"]) == (3, 1)
    assert f["total_input_tokens"] == 30 and f["total_output_tokens"] == 23
    assert f["request_throughput"] == 1.5 and f["output_throughput"] == 11.5
    assert f["request_goodput"] == 1.0  # two of three have TTFT <= 250 ms
    assert f["mean_ttft_ms"] == pytest.approx(200.0) and f["p99_ttft_ms"] == pytest.approx(300.0)
    assert f["mean_tpot_ms"] == pytest.approx(150.0)  # (100 + 200) / 2; one-token requests have none
    assert f["median_itl_ms"] == pytest.approx(150.0) and f["p50_e2el_ms"] == pytest.approx(1100.0)


def test_goodput_parsing():
    assert parse_goodput(["ttft:500", "tpot:50"]) == {"ttft": 0.5, "tpot": 0.05}
    with pytest.raises(ValueError, match="one of"):
        parse_goodput(["latency:5"])
    with pytest.raises(ValueError, match="milliseconds"):
        parse_goodput(["ttft:fast"])


def test_poisson_arrivals_have_the_requested_rate():
    gaps = arrival_gaps(20000, rate=4.0, burstiness=1.0, rng=random.Random(0))
    assert sum(gaps) / len(gaps) == pytest.approx(0.25, rel=0.03)
    assert arrival_gaps(3, math.inf, 1.0, random.Random(0)) == [0.0, 0.0, 0.0]


def test_parser_registers_under_bench():
    parser = argparse.ArgumentParser()
    add_bench_serve_parser(parser.add_subparsers(dest="bench"))
    args = parser.parse_args(
        ["serve", "--request-rate", "8", "--max-concurrency", "4", "--goodput", "ttft:100"]
    )
    assert (args.request_rate, args.max_concurrency, args.goodput) == (8.0, 4, ["ttft:100"])
    assert math.isinf(parser.parse_args(["serve"]).request_rate)


def test_step_figures_over_the_run():
    figures = step_figures((1.0, 100.0), (3.0, 140.0), mean_itl_ms=60.0)
    assert figures == pytest.approx({"mean_engine_step_ms": 50.0, "itl_minus_step_ms": 10.0})
    # a server without the metric, or no step during the run: no figure
    assert step_figures(None, (3.0, 140.0), 60.0) == {} == step_figures((1.0, 100.0), (1.0, 100.0), 60.0)


def test_server_figures_split_the_ttft_at_the_server_from_the_path_outside_it():
    client = {"mean_itl_ms": 60.0, "mean_ttft_ms": 150.0}
    before = {"step": (1.0, 100.0), "ttft": (2.0, 10.0)}
    after = {"step": (3.0, 140.0), "ttft": (4.4, 30.0)}  # 20 first tokens, 120 ms each at the server
    assert server_figures(before, after, client) == pytest.approx(
        {
            "mean_engine_step_ms": 50.0,
            "itl_minus_step_ms": 10.0,
            "mean_server_ttft_ms": 120.0,
            "ttft_outside_server_ms": 30.0,
        }
    )
    # a server that times its first tokens but not its steps (vLLM), and one that reports nothing
    ttft_only = server_figures({"ttft": (2.0, 10.0)}, {"ttft": (4.4, 30.0)}, client)
    assert ttft_only == pytest.approx({"mean_server_ttft_ms": 120.0, "ttft_outside_server_ms": 30.0})
    assert server_figures({}, {}, client) == {}
