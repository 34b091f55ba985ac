"""`llama4-ep status`: what a running server says about itself, read from its /metrics."""

from __future__ import annotations

import argparse
import urllib.request
from collections import defaultdict

from prometheus_client.parser import text_string_to_metric_families

PREFIX = "llama4_ep_"


def add_status_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="a running server's engines, KV cache and expert balance")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="the HTTP port")
    p.set_defaults(func=_cmd_status)


def read_metrics(host: str, port: int) -> dict[str, list[tuple[dict, float]]]:
    """Samples by name (without the prefix): name -> [(labels, value)]."""
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    samples: dict[str, list[tuple[dict, float]]] = defaultdict(list)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.startswith(PREFIX):
                samples[s.name.removeprefix(PREFIX)].append((s.labels, s.value))
    return samples


def format_status(samples: dict[str, list[tuple[dict, float]]]) -> str:
    lines = []
    for labels, running in samples.get("num_requests_running", []):
        replica = labels.get("replica")
        lines.append(
            f"engine replica {replica}: {running:g} running, "
            f"{_value(samples, 'num_requests_waiting', replica):g} waiting, KV "
            f"{_value(samples, 'kv_blocks_used', replica):g}/{_value(samples, 'kv_blocks_total', replica):g}"
            f" blocks ({100 * _value(samples, 'kv_cache_usage_perc', replica):.1f}%)"
        )
        tokens = [
            int(v)
            for lab, v in samples.get("expert_worker_tokens_total", [])
            if lab.get("replica") == replica
        ]
        if tokens:
            lines.append(f"  tokens per expert worker: {tokens}")
        per_layer = {
            lab["layer"]: v
            for lab, v in samples.get("expert_balancedness", [])
            if lab.get("replica") == replica
        }
        if per_layer:
            layers = " ".join(f"{v:.3f}" for k, v in sorted(per_layer.items()) if k != "all")
            lines.append(
                f"  balancedness {per_layer.get('all', float('nan')):.3f} "
                f"(imbalance {_value(samples, 'expert_imbalance', replica):.3f}); per MoE layer: {layers}"
            )
        if samples.get("placement_version"):
            lines.append(
                f"  placement v{_value(samples, 'placement_version', replica):g}, "
                f"max replicas per expert {_value(samples, 'expert_replicas_max', replica):g}, "
                f"{_value(samples, 'expert_rearrangements_total', replica):g} rearrangements "
                f"({_value(samples, 'expert_rearrangement_seconds_total', replica):.2f} s plan-to-switch)"
            )
        tiers = _tiers(samples, replica)
        if tiers:
            lines.append(tiers)
    return "\n".join(lines) if lines else "no engine metrics (is this a llama4-ep server?)"


def _tiers(samples: dict, replica: str | None) -> str:
    """'  workers: attention 2, expert 3 (desired 4); 2 resizes, 3.1 s on average' (cluster engines)."""
    live = {lab["role"]: v for lab, v in samples.get("workers", []) if lab.get("replica") == replica}
    if not live:
        return ""
    desired = {
        lab["role"]: v for lab, v in samples.get("workers_desired", []) if lab.get("replica") == replica
    }
    parts = []
    for role, n in sorted(live.items()):
        want = desired.get(role, n)
        parts.append(f"{role} {n:g}" + (f" (desired {want:g})" if want != n else ""))
    count = _value(samples, "resize_seconds_count", replica)
    line = "  workers: " + ", ".join(parts)
    if count == count and count > 0:  # not nan
        mean = _value(samples, "resize_seconds_sum", replica) / count
        line += f"; {count:g} resize{'s' if count != 1 else ''}, {mean:.1f} s on average"
    return line


def _value(samples: dict, name: str, replica: str | None) -> float:
    return next((v for lab, v in samples.get(name, []) if lab.get("replica") == replica), float("nan"))


def _cmd_status(args: argparse.Namespace) -> int:
    try:
        samples = read_metrics(args.host, args.port)
    except OSError as e:
        raise ValueError(f"cannot read http://{args.host}:{args.port}/metrics ({e})") from e
    print(format_status(samples))
    return 0
