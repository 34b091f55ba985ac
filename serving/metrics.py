"""Prometheus metrics of the serving path, rendered by the ingress at `GET /metrics`.

Names and labels follow vLLM's where the meaning is the same (`vllm:` becomes `llama4_ep_`), so
vLLM dashboards and alerts carry over. Latencies are measured where the client sees them (the
ingress): time to first token from the request's arrival, inter-token latency between
successive token deltas, time per output token over a request after its first token. The
ingress cannot see when the engine scheduled a request, so "prefill" time here is arrival to
first token (queueing included) and "decode" time first to last token. Engine gauges (running
and waiting requests, KV blocks, tokens per expert worker) come from every engine replica at
scrape time and carry a `replica` label. Each ingress replica keeps its own registry; with more
than one ingress replica, scrape each (or sum them) as with any multi-process exporter.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

PREFIX = "llama4_ep"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# vLLM's buckets, extended to hours: a queued long-context request on a busy cluster takes that long
TTFT_BUCKETS = (
    0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
    40.0, 80.0, 160.0, 640.0, 2560.0, 7200.0,
)  # fmt: skip
ITL_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5,
    5.0, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
E2E_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
    480.0, 960.0, 1920.0, 3600.0, 7680.0, 14400.0,
)  # fmt: skip
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)


class EngineCollector:
    """Gauges from the engine replicas' latest snapshots (`EngineServer.metrics()` dicts)."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.snapshots: list[dict[str, Any]] = []

    def collect(self) -> Iterator[Metric]:
        labels = ["model_name", "replica"]
        families = {
            "alive": GaugeMetricFamily(
                f"{PREFIX}_engine_alive", "1 if the replica's engine loop runs", labels=labels
            ),
            "num_running": GaugeMetricFamily(
                f"{PREFIX}_num_requests_running", "Requests in the running batch", labels=labels
            ),
            "num_waiting": GaugeMetricFamily(
                f"{PREFIX}_num_requests_waiting", "Requests waiting to be scheduled", labels=labels
            ),
            "kv_blocks_used": GaugeMetricFamily(
                f"{PREFIX}_kv_blocks_used", "KV cache blocks in use", labels=labels
            ),
            "kv_blocks_total": GaugeMetricFamily(
                f"{PREFIX}_kv_blocks_total", "KV cache blocks in all", labels=labels
            ),
        }
        preemptions = CounterMetricFamily(
            f"{PREFIX}_num_preemptions",
            "Requests preempted (KV freed, recomputed later) since the replica started",
            labels=labels,
        )
        usage = GaugeMetricFamily(
            f"{PREFIX}_kv_cache_usage_perc", "Fraction of KV cache blocks in use (0 to 1)", labels=labels
        )
        expert = CounterMetricFamily(
            f"{PREFIX}_expert_worker_tokens",
            "Tokens each expert worker computed, counted once per MoE layer (top-1: one row per token "
            "per MoE layer); refreshed at most every few seconds",
            labels=[*labels, "expert_worker"],
        )
        for snap in self.snapshots:
            values = [self.model_name, str(snap["replica"])]
            for key, family in families.items():
                family.add_metric(values, float(snap[key]))
            usage.add_metric(values, snap["kv_blocks_used"] / max(snap["kv_blocks_total"], 1))
            preemptions.add_metric(values, float(snap.get("num_preemptions", 0)))
            for worker_idx, tokens in enumerate(snap["expert_worker_tokens"]):
                expert.add_metric([*values, str(worker_idx)], float(tokens))
        yield from families.values()
        yield usage
        yield preemptions
        yield expert
        yield from balancing_families(self.snapshots, self.model_name)
        yield from fault_families(self.snapshots, self.model_name)
        yield from tier_families(self.snapshots, self.model_name)
        yield from step_families(self.snapshots, self.model_name)
        yield from thread_families(self.snapshots, self.model_name)


def thread_families(snapshots: list[dict[str, Any]], model_name: str) -> Iterator[Metric]:
    """The decoder layers' intra-op threads per size of step, as `parallel_min_tokens: auto`
    measured and chose them on each attention rank (nothing under a fixed setting, or on one
    thread, where there is nothing to choose)."""
    threads = GaugeMetricFamily(
        f"{PREFIX}_layer_threads",
        "Intra-op threads the decoder layers run steps of up to step_tokens tokens on (auto's choice)",
        labels=["model_name", "replica", "dp_rank", "step_tokens"],
    )
    for snap in snapshots:
        for rank, chosen in (snap.get("layer_threads") or {}).items():
            for bound, count in chosen.items():
                threads.add_metric([model_name, str(snap["replica"]), str(rank), str(bound)], float(count))
    yield threads


def step_families(snapshots: list[dict[str, Any]], model_name: str) -> Iterator[Metric]:
    """How long each replica's engine steps take, on their own: a token's inter-token latency
    less its step time is what the serving path (ingress, Serve, Ray) added."""
    steps = HistogramMetricFamily(
        f"{PREFIX}_engine_step_seconds",
        "Seconds per engine step (schedule, model, sample), without the serving hops",
        labels=["model_name", "replica"],
    )
    for snap in snapshots:
        h = snap.get("step_seconds")
        if not h:
            continue
        _add_histogram(
            steps, [model_name, str(snap["replica"])], h["bounds"], h["counts"], h["count"], h["sum"]
        )
    yield steps


def balancing_families(snapshots: list[dict[str, Any]], model_name: str) -> Iterator[Metric]:
    """Expert balance as the router service measures it over its window (cluster engines only)."""
    labels = ["model_name", "replica"]
    balancedness = GaugeMetricFamily(
        f"{PREFIX}_expert_balancedness",
        "Mean / max tokens per expert worker over the load window; layer 'all' weighs layers by load",
        labels=[*labels, "layer"],
    )
    imbalance = GaugeMetricFamily(
        f"{PREFIX}_expert_imbalance", "(max - mean) / mean over all layers", labels=labels
    )
    version = GaugeMetricFamily(
        f"{PREFIX}_placement_version", "Version of the expert placement map", labels=labels
    )
    replicas = GaugeMetricFamily(
        f"{PREFIX}_expert_replicas_max", "Most replicas of any expert", labels=labels
    )
    moves = CounterMetricFamily(f"{PREFIX}_expert_rearrangements", "Placement switches", labels=labels)
    seconds = CounterMetricFamily(
        f"{PREFIX}_expert_rearrangement_seconds", "Seconds from plan to switch, summed", labels=labels
    )
    for snap in snapshots:
        b = snap.get("balancing") or {}
        if not b:
            continue
        values = [model_name, str(snap["replica"])]
        if "balancedness" in b:
            balancedness.add_metric([*values, "all"], float(b["balancedness"]))
            for layer, value in enumerate(b["balancedness_per_layer"]):
                balancedness.add_metric([*values, str(layer)], float(value))
            imbalance.add_metric(values, float(b["imbalance"]))
        version.add_metric(values, float(b["placement_version"]))
        replicas.add_metric(values, float(max(max(row) for row in b["replicas_per_expert"])))
        moves.add_metric(values, float(b["rearrangements"]))
        seconds.add_metric(values, float(sum(b["rearrangement_seconds"])))
    yield from (balancedness, imbalance, version, replicas, moves, seconds)


RECOVERY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
RESIZE_BUCKETS = (1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


def fault_families(snapshots: list[dict[str, Any]], model_name: str) -> Iterator[Metric]:
    """Lost workers and recoveries of each engine replica (cluster engines)."""
    labels = ["model_name", "replica"]
    failures = CounterMetricFamily(
        f"{PREFIX}_worker_failures",
        "Workers lost (dead, or killed when hung), by role",
        labels=[*labels, "role"],
    )
    recoveries = HistogramMetricFamily(
        f"{PREFIX}_recovery_seconds", "Seconds from a failed step to the new membership epoch", labels=labels
    )
    epoch = GaugeMetricFamily(f"{PREFIX}_membership_epoch", "The engine's membership epoch", labels=labels)
    replayed = CounterMetricFamily(
        f"{PREFIX}_requests_replayed",
        "Requests re-admitted after their attention worker or engine process was lost",
        labels=labels,
    )
    for snap in snapshots:
        f = snap.get("faults") or {}
        if not f:
            continue
        values = [model_name, str(snap["replica"])]
        for role, n in f["worker_failures"].items():
            failures.add_metric([*values, role], float(n))
        _observe(recoveries, values, f["recovery_seconds"], RECOVERY_BUCKETS)
        epoch.add_metric(values, float(f["epoch"]))
        replayed.add_metric(values, float(f["requests_replayed"]))
    yield from (failures, recoveries, epoch, replayed)


def tier_families(snapshots: list[dict[str, Any]], model_name: str) -> Iterator[Metric]:
    """Workers per tier of each engine replica, live and desired, and its resizes (cluster engines)."""
    labels = ["model_name", "replica"]
    workers = GaugeMetricFamily(f"{PREFIX}_workers", "Live workers, by role", labels=[*labels, "role"])
    desired = GaugeMetricFamily(
        f"{PREFIX}_workers_desired",
        "Workers the last resize (operator or tier autoscaler) asked for, by role",
        labels=[*labels, "role"],
    )
    resizes = HistogramMetricFamily(
        f"{PREFIX}_resize_seconds", "Seconds from a resize request to the new size serving", labels=labels
    )
    for snap in snapshots:
        if not snap.get("workers"):
            continue
        values = [model_name, str(snap["replica"])]
        for role, n in snap["workers"].items():
            workers.add_metric([*values, role], float(n))
        for role, n in (snap.get("workers_desired") or {}).items():
            desired.add_metric([*values, role], float(n))
        _observe(resizes, values, snap.get("resize_seconds") or [], RESIZE_BUCKETS)
    yield from (workers, desired, resizes)


def _observe(
    family: HistogramMetricFamily, values: list[str], seconds: Sequence[float], bounds: Sequence[float]
) -> None:
    """One replica's histogram of `seconds` over the bucket `bounds`."""
    counts = [sum(s <= b for s in seconds) for b in bounds]
    _add_histogram(family, values, bounds, counts, len(seconds), sum(seconds))


def _add_histogram(
    family: HistogramMetricFamily,
    values: list[str],
    bounds: Sequence[float],
    counts: Sequence[int],
    count: int,
    total: float,
) -> None:
    """One replica's histogram: `counts[i]` observations at most `bounds[i]` (cumulative, as
    Prometheus has it), `count` in all, summing to `total`."""
    buckets = [(str(b), float(n)) for b, n in zip(bounds, counts, strict=True)]
    family.add_metric(values, [*buckets, ("+Inf", float(count))], sum_value=total)


class ServingMetrics:
    """Request counters and latency histograms, plus the engine gauges, in one registry."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.registry = CollectorRegistry()
        r, model = self.registry, ["model_name"]

        def histogram(name: str, doc: str, buckets: Sequence[float]) -> Histogram:
            return Histogram(f"{PREFIX}_{name}", doc, model, buckets=buckets, registry=r)

        self.requests = Counter(
            f"{PREFIX}_requests",
            "Requests answered, by endpoint and status",
            [*model, "endpoint", "status"],
            registry=r,
        )
        self.ttft = histogram("time_to_first_token_seconds", "Arrival to first token", TTFT_BUCKETS)
        self.itl = histogram("inter_token_latency_seconds", "Time between token deltas", ITL_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "Arrival to last token", E2E_BUCKETS)
        self.tpot = histogram(
            "time_per_output_token_seconds",
            "Mean time per output token after the first, per request",
            ITL_BUCKETS,
        )
        self.prefill = histogram(
            "request_prefill_time_seconds",
            "Arrival to first token (queueing and prefill; the ingress cannot tell them apart)",
            E2E_BUCKETS,
        )
        self.decode = histogram("request_decode_time_seconds", "First to last token", E2E_BUCKETS)
        self.request_prompt_tokens = histogram(
            "request_prompt_tokens", "Prompt tokens per request", TOKEN_BUCKETS
        )
        self.request_generation_tokens = histogram(
            "request_generation_tokens", "Generated tokens per request", TOKEN_BUCKETS
        )
        self.success = Counter(
            f"{PREFIX}_request_success",
            "Requests the engine finished, by finish reason (stop, length, abort)",
            [*model, "finished_reason"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            f"{PREFIX}_prompt_tokens", "Prompt tokens of admitted requests", model, registry=r
        )
        self.generation_tokens = Counter(f"{PREFIX}_generation_tokens", "Tokens generated", model, registry=r)
        self.engine = EngineCollector(model_name)
        self.registry.register(self.engine)

    def request(self, endpoint: str) -> RequestTimer:
        return RequestTimer(self, endpoint)

    def render(self, snapshots: Sequence[dict[str, Any]]) -> bytes:
        self.engine.snapshots = list(snapshots)
        return generate_latest(self.registry)


class RequestTimer:
    """The latencies of one request, recorded as its token deltas arrive."""

    def __init__(self, metrics: ServingMetrics, endpoint: str) -> None:
        self.m = metrics
        self.endpoint = endpoint
        self.start = time.perf_counter()
        self.first: float | None = None
        self.last: float | None = None
        self.done = False
        self.num_tokens = 0

    def admitted(self, num_prompt_tokens: int) -> None:
        self.m.prompt_tokens.labels(self.m.model_name).inc(num_prompt_tokens)
        self.m.request_prompt_tokens.labels(self.m.model_name).observe(num_prompt_tokens)

    def engine_finished(self, reason: str, num_output_tokens: int) -> None:
        """One engine request (a choice) ended with this finish reason."""
        self.m.success.labels(self.m.model_name, reason).inc()
        self.m.request_generation_tokens.labels(self.m.model_name).observe(num_output_tokens)

    def tokens(self, token_ids: Iterable[int]) -> None:
        n = len(list(token_ids))
        if not n:
            return
        now = time.perf_counter()
        self.num_tokens += n
        if self.last is None:
            self.first = now
            self.m.ttft.labels(self.m.model_name).observe(now - self.start)
            self.m.prefill.labels(self.m.model_name).observe(now - self.start)
        else:  # several tokens in one delta (a joined stream): the gap is shared among them
            itl = self.m.itl.labels(self.m.model_name)
            for _ in range(n):
                itl.observe((now - self.last) / n)
        self.last = now
        self.m.generation_tokens.labels(self.m.model_name).inc(n)

    def finish(self, status: int | str) -> None:
        """Count the request once, with its HTTP status (or gRPC code name)."""
        if self.done:
            return
        self.done = True
        self.m.requests.labels(self.m.model_name, self.endpoint, str(status)).inc()
        if self.last is not None:
            model = self.m.model_name
            self.m.e2e.labels(model).observe(self.last - self.start)
            self.m.decode.labels(model).observe(self.last - self.first)
            if self.num_tokens > 1:
                self.m.tpot.labels(model).observe((self.last - self.first) / (self.num_tokens - 1))
