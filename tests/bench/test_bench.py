"""Each `llama4-ep bench ...` at tiny sizes: it runs, prints a table, and ends with one JSON line of
sane figures. No timing is asserted (benchmarks are scripts, not timed tests)."""

from __future__ import annotations

import json

import pytest

from bench.decode import _decode_rates
from cli.main import main


def bench_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict:
    return bench_output(capsys, *args)[0]


def bench_output(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[dict, str]:
    """The JSON line's figures, and everything printed before it."""
    assert main(["bench", *args]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) > 1  # a table first
    return json.loads(lines[-1]), "\n".join(lines[:-1])


def test_bench_decode_cluster_engine_and_transformers(capsys, ray_session, tiny_maverick):
    figures, text = bench_output(
        capsys,
        "decode",
        "--model",
        str(tiny_maverick),
        "--batch",
        "2",
        "--new-tokens",
        "3",
        "--prompt-len",
        "4",
        "--expert-workers",
        "1",
        "--reps",
        "1",
        "--no-peers",
        "--parallel-min-tokens",
        "1",
        "--profile",
        "5",
    )
    assert figures["parallel_min_tokens"] == 1
    assert "Input Shapes" in text and "Self CPU time total" in text  # --profile's table, before the JSON
    for key in ("engine_decode_tok_s", "cluster_decode_tok_s", "transformers_decode_tok_s"):
        assert figures[key] > 0
    # the ratios are what the rates say (the rates are rounded to 2 decimals first)
    hf = figures["transformers_decode_tok_s"]
    assert figures["speedup_vs_transformers"] == pytest.approx(figures["engine_decode_tok_s"] / hf, abs=0.01)
    assert figures["cluster_speedup_vs_transformers"] == pytest.approx(
        figures["cluster_decode_tok_s"] / hf, abs=0.01
    )
    assert figures["cluster_workers"] == [1, 1]


def test_a_prefill_run_that_outlasts_the_whole_run_is_measured_again():
    """A busy spell can make the one-token run slower than the whole run: that run is taken again,
    and a runner whose difference never comes out positive is an error, not an absurd rate. The
    runners move a clock of the test's own, so the machine's speed decides nothing."""
    now = [0.0]
    calls: list[int] = []

    def spell_on_the_first_prefill(n: int) -> None:
        calls.append(n)
        now[0] += 1.0 if len(calls) == 2 else 0.05 * n  # a spell on the first timed prefill only

    rates = _decode_rates({"spell": spell_on_the_first_prefill}, 2, 5, reps=1, clock=lambda: now[0])
    (row,) = rates.values()
    assert calls == [2, 1, 5, 1, 5]  # warm-up, the turn, one more turn
    assert 0 < row["decode_tok_s"] < 2 * 4 / 0.1  # 4 tokens' time, 0.2 s: 40 tok/s

    def never(n: int) -> None:
        now[0] += 0.05 if n == 1 else 0.0

    with pytest.raises(RuntimeError, match="never took longer than the first alone in 11 runs"):
        _decode_rates({"never": never}, batch=1, new_tokens=3, reps=1, clock=lambda: now[0])


def test_bench_dispatch(capsys):
    figures = bench_json(
        capsys,
        "dispatch",
        "--expert-ranks",
        "1",
        "--experts",
        "8",
        "--hidden",
        "16",
        "--intermediate",
        "16",
        "--tokens",
        "4,8",
        "--layers",
        "2",
        "--reps",
        "2",
    )
    assert [r["num_tokens"] for r in figures["results"]] == [4, 8]
    for r in figures["results"]:
        for key in ("all_to_all_ms", "dispatch_ms", "dispatch_with_compute_ms", "expert_compute_ms"):
            assert r[key] > 0
        for key in ("sockets_ms", "sockets_with_compute_ms", "collective_vs_sockets"):
            assert r[key] > 0
        assert r["overhead_vs_all_to_all"] > 0
    assert figures["overhead_vs_all_to_all"] == max(r["overhead_vs_all_to_all"] for r in figures["results"])
    assert figures["collective_vs_sockets"] == min(r["collective_vs_sockets"] for r in figures["results"])


def test_bench_kv_accounts_the_layer_mix(capsys):
    figures = bench_json(
        capsys,
        "kv",
        "--sizes",
        "64,256",
        "--chunk-size",
        "128",
        "--prefill-chunk",
        "32",
        "--block-sizes",
        "16,32",
    )
    # block-aligned lengths: exactly the minimum; at 256 tokens 12 global layers keep 256 and 36
    # chunked ones keep the 128 of the current chunk: (12 * 256 + 36 * 128) / (48 * 256)
    assert figures["excess_over_minimum"] == 0
    assert figures["ratio_to_full"] == {"64": 1.0, "256": 0.625}
    assert set(figures["worst_excess_in_half_to_n_per_block_size"]) == {"16", "32"}
    assert len(figures["results"]) == 2 * 2 * 2  # block sizes x scenarios x sizes


def test_bench_faults_kills_a_worker_and_loses_nothing(capsys, ray_session, tiny_maverick):
    figures = bench_json(
        capsys, "faults", "--model", str(tiny_maverick), "--kind", "attention-kill", "--requests", "3",
        "--max-tokens", "6", "--kill-at-step", "2",
    )  # fmt: skip
    (row,) = figures["results"]
    assert row["kind"] == "attention-kill" and row["in_flight"] == 3
    assert figures["failed_requests"] == 0 and figures["tokens_equal"] is True
    assert figures["max_stall_s"] == row["stall_max_s"] > 0


def test_bench_resize_grows_and_shrinks_under_streams(capsys, ray_session, tiny_maverick):
    figures = bench_json(
        capsys, "resize", "--model", str(tiny_maverick), "--requests", "2", "--max-tokens", "160",
        "--steady-steps", "3", "--cpus-per-worker", "0.05",
    )  # fmt: skip
    grow, shrink = figures["results"]
    assert (grow["from"], grow["to"], shrink["to"]) == ([1, 1], [2, 2], [1, 1])
    assert figures["resize_seconds"]["grow"] > 0 and figures["resize_seconds"]["shrink"] > 0
    assert grow["steps_during"] >= 1 and figures["max_step_ratio"] > 0
    assert figures["failed_requests"] == 0 and figures["tokens_equal"] is True


def test_bench_vision_in_process(capsys, tiny_maverick):
    figures = bench_json(
        capsys,
        "vision",
        "--model",
        str(tiny_maverick),
        "--vision-workers",
        "0",
        "--expert-workers",
        "0",
        "--images",
        "2",
        "--image-size",
        "200x200",
        "--reps",
        "1",
    )
    assert figures["tiles_per_image"] == 1 and figures["images_per_call"] == 2
    assert figures["images_per_second"] > 0 and figures["ttft_image_ms"] > 0 and figures["ttft_text_ms"] > 0
    assert figures["prompt_tokens"] > 144  # the image's 144 <|patch|> tokens and the text


def bench_overhead(capsys, model, batch: str, *extra: str) -> dict:
    """`bench overhead` on a tiny model: 3 new tokens after 4-token prompts, one rep."""
    sizes = ["--batch", batch, "--new-tokens", "3", "--prompt-len", "4", "--reps", "1"]
    return bench_json(capsys, "overhead", "--model", str(model), *sizes, *extra)


def test_bench_overhead_single_process(capsys, tiny_maverick):
    figures = bench_overhead(capsys, tiny_maverick, "1,2", "--expert-workers", "0")
    for batch in (1, 2):
        step, overhead = figures[f"engine_step_ms_b{batch}"], figures[f"engine_overhead_ms_b{batch}"]
        assert 0 < overhead < step  # the math is timed inside the step


def test_bench_overhead_a_cluster_row_per_transport(capsys, ray_session, tiny_maverick):
    extra = ("--expert-workers", "1", "--transports", "auto,collective")
    figures = bench_overhead(capsys, tiny_maverick, "1", *extra)
    for key in ("cluster", "cluster_collective"):
        step, rank = figures[f"{key}_step_ms_b1"], figures[f"{key}_rank_step_ms_b1"]
        assert 0 < rank < step and figures[f"{key}_call_ms_b1"] == pytest.approx(step - rank, abs=0.01)
