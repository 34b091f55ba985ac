"""The prepared GPU check (scripts/gpu-check.sh, bench/gpu.py) runs where the GPU machine runs it:
without Ray or the serving stack. Its dry run (`--device cpu --tiny`) goes through every step and
prints the JSON line; the GPU run itself has to happen on a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# what the GPU machine lacks (it has torch, safetensors, transformers and their dependencies)
ABSENT = ("ray", "pydantic", "starlette", "httpx", "grpc", "tiktoken", "llama_models", "prometheus_client")
BLOCK = f"""
import sys
class _Absent:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {ABSENT!r}:
            raise ImportError(f"{{name}} is not installed on the GPU machine")
sys.meta_path.insert(0, _Absent())
"""


def _python(code: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-c", BLOCK + code, *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env=env,
    )


def test_the_gpu_check_imports_neither_ray_nor_the_serving_stack():
    r = _python("import bench.gpu, engine.llm_engine")
    assert r.returncode == 0, r.stderr
    blocked = _python("import cluster.engine")  # the blocker itself works
    assert blocked.returncode != 0 and "not installed on the GPU machine" in blocked.stderr


@pytest.mark.slow
def test_dry_run_goes_through_every_step_and_prints_the_json_line():
    r = _python(
        "import runpy; runpy.run_module('bench.gpu', run_name='__main__')", "--device", "cpu", "--tiny"
    )
    assert r.returncode == 0, r.stderr
    figures = json.loads(r.stdout.strip().splitlines()[-1])
    assert figures["tokens_equal"] is True and figures["bf16_logits_within_tolerance"] is True
    for key in ("decode_tok_s", "vs_transformers"):
        assert set(figures[key]) == {"1", "4"} and all(v > 0 for v in figures[key].values())
    # on a CPU the fractions mean little (toy weights sit in cache); here only that they are there
    assert set(figures["moe_roofline_fraction"]) == {"1", "4"}
    assert all(f > 0 for f in figures["moe_roofline_fraction"].values())


def test_the_script_runs_the_module():
    text = (ROOT / "scripts" / "gpu-check.sh").read_text()
    assert os.access(ROOT / "scripts" / "gpu-check.sh", os.X_OK)
    assert "python -m bench.gpu" in text
