"""The command line, run as a user runs it (a real subprocess; some refusals through `main` here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

from cli.main import main
from engine.core import EngineConfig
from engine.llm_engine import LLMEngine
from engine.request import SamplingParams
from model.image_processing import ImageProcessor
from tests.helpers import hf_greedy, random_image


def llama4_ep(*args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run(
        [sys.executable, "-m", "cli.main", *args], capture_output=True, text=True, timeout=300, env=env
    )


def test_the_command_line_parses_without_importing_torch_or_ray():
    """`--help`, `client`, `status` and a mistyped argument answer at once: the heavy imports
    wait until a command runs a model."""
    probe = "import sys, cli.main; print(sorted(m for m in ('torch', 'ray') if m in sys.modules))"
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "[]", (r.stdout, r.stderr)


def test_make_checkpoint_sharded(tmp_path):
    out = tmp_path / "scout"
    r = llama4_ep(
        "make-checkpoint",
        "--preset",
        "tiny-scout",
        "--out",
        str(out),
        "--seed",
        "3",
        "--max-shard-size",
        "15MB",
    )
    assert r.returncode == 0, r.stderr
    index = json.loads((out / "model.safetensors.index.json").read_text())
    names = index["weight_map"]
    assert all(
        name.startswith(("language_model.", "vision_model.", "multi_modal_projector.")) for name in names
    )
    assert "vision_model.patch_embedding.linear.weight" in names  # the presets have a vision tower
    assert len(set(index["weight_map"].values())) > 1


def test_generate_json_batch_matches_transformers(tiny_maverick):
    prompt = [200000, 1263, 7, 99, 4512, 8, 300, 12, 77, 5, 19000, 42]
    r = llama4_ep(
        "generate",
        "--model",
        str(tiny_maverick),
        "--prompt-ids",
        ",".join(map(str, prompt)),
        "--prompt",
        "The capital of France is",
        "--max-tokens",
        "12",
        "--ignore-eos",
        "--json",
    )
    assert r.returncode == 0, r.stderr
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    assert [d["index"] for d in lines] == [0, 1]
    assert lines[0]["prompt_token_ids"] == prompt and len(lines[0]["token_ids"]) == 12
    assert lines[1]["prompt_token_ids"][0] == 200000 and isinstance(lines[1]["text"], str)
    expected, _ = hf_greedy(tiny_maverick, prompt, 12)
    assert lines[0]["token_ids"] == expected


def test_default_model_is_made_once(tmp_path):
    env = {"LLAMA4_EP_CACHE": str(tmp_path)}
    first = llama4_ep("generate", "--chat", "hi", "--max-tokens", "3", env_extra=env)
    assert first.returncode == 0, first.stderr
    assert "making the tiny-maverick checkpoint" in first.stderr
    second = llama4_ep("generate", "--chat", "hi", "--max-tokens", "3", env_extra=env)
    assert "making" not in second.stderr and second.stdout == first.stdout


def test_bad_values_are_named(tiny_maverick, capsys):
    """Each refused before any engine is built, exit code 2, the value named. Two go through a real
    subprocess (an argument the parser refuses; one that the command refuses after reading the
    tokenizer); the others through `main` here, the same exit path without 4 s of imports each."""
    model = ["generate", "--model", str(tiny_maverick)]
    for args, message in [
        (["--prompt-ids", "1,x"], "'x' is not an integer"),
        (["--prompt-ids", "1,999999"], "token ids [999999] are outside the vocabulary"),
    ]:
        r = llama4_ep(*model, *args)
        assert r.returncode == 2 and message in r.stderr, (args, r.stderr)
        assert "Traceback" not in r.stderr
    for args, message in [
        (["--prompt", "a", "--max-tokens", "0"], "--max-tokens"),
        (["--prompt", "a", "--top-p", "0"], "top_p"),
        (["--prompt", "a", "--dtype", "int3"], "int3"),
        (
            ["--prompt", "a", "--parallel-min-tokens", "0"],
            "argument --parallel-min-tokens: must be >= 1, got 0 (or auto)",
        ),
        ([], "at least one of --prompt"),
    ]:
        with pytest.raises(SystemExit) as exit_:
            main([*model, *args])
        stderr = capsys.readouterr().err
        assert exit_.value.code == 2 and message in stderr, (args, stderr)


def test_serve_names_a_bad_restart_count_before_it_starts_anything():
    r = llama4_ep("serve", "--engine-restarts", "-1")
    assert r.returncode == 2 and "argument --engine-restarts: must be >= 0, got -1" in r.stderr, r.stderr


def test_generate_through_the_cluster_equals_single_process(tiny_maverick):
    args = [
        "generate",
        "--model",
        str(tiny_maverick),
        "--prompt",
        "Hello there",
        "--prompt-ids",
        "1,2,3",
        "--max-tokens",
        "8",
        "--json",
    ]
    single = llama4_ep(*args)
    cluster = llama4_ep(*args, "--attention-workers", "2", "--expert-workers", "3")
    assert cluster.returncode == 0, cluster.stderr
    assert cluster.stdout == single.stdout


def test_cluster_arguments_are_checked(tiny_maverick):
    base = ["generate", "--model", str(tiny_maverick), "--prompt", "x"]
    for extra, message in [
        (["--attention-workers", "0"], "--attention-workers"),
        (["--expert-workers", "200"], "200 expert workers for 128 experts"),
        (["--expert-workers", "2", "--device", "tpu"], "unknown device 'tpu'"),
    ]:
        r = llama4_ep(*base, *extra)
        assert r.returncode == 2 and message in r.stderr, (extra, r.stderr)


def test_generate_with_an_image_equals_the_engine(tiny_maverick, tmp_path):
    picture = tmp_path / "picture.png"
    Image.fromarray(random_image(120, 200, seed=4).permute(1, 2, 0).numpy()).save(picture)
    r = llama4_ep(
        "generate",
        "--model",
        str(tiny_maverick),
        "--chat",
        "What is it?",
        "--image",
        str(picture),
        "--max-tokens",
        "4",
        "--ignore-eos",
        "--json",
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["prompt_token_ids"].count(200092) == 144  # one tile
    images = [ImageProcessor.for_checkpoint(tiny_maverick).decode_and_preprocess(picture.read_bytes())]
    (done,) = LLMEngine.from_checkpoint(tiny_maverick, EngineConfig()).generate(
        [out["prompt_token_ids"]], SamplingParams(max_tokens=4, ignore_eos=True), [images]
    )
    assert out["token_ids"] == done.token_ids
    (tmp_path / "not.png").write_text("hello")
    r = llama4_ep(
        "generate", "--model", str(tiny_maverick), "--chat", "x", "--image", str(tmp_path / "not.png")
    )
    assert r.returncode == 2 and "not an image" in r.stderr and "Traceback" not in r.stderr


def test_generate_sizes_the_kv_cache_from_memory_and_refuses_bad_devices(tiny_maverick):
    ok = llama4_ep(
        "generate", "--model", str(tiny_maverick), "--prompt-ids", "1,2,3", "--max-tokens", "2",
        "--kv-cache-memory", "32MiB",
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert "KV cache: 8192 blocks of 16 tokens (32.0 MiB, kv_cache_memory 32.0 MiB)" in ok.stderr
    bad = llama4_ep("generate", "--model", str(tiny_maverick), "--prompt-ids", "1", "--kv-cache-memory", "7")
    assert bad.returncode == 2 and "--kv-cache-memory" in bad.stderr and "40GiB" in bad.stderr
    if not torch.cuda.is_available():
        no_gpu = llama4_ep("generate", "--model", str(tiny_maverick), "--prompt-ids", "1", "--device", "cuda")
        assert no_gpu.returncode == 2 and "no CUDA GPU is visible" in no_gpu.stderr
        assert "Traceback" not in no_gpu.stderr
