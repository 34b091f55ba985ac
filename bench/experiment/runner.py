"""Running a scenario: deploy each variant on Ray Serve, offer its open-loop load over HTTP,
record every request and, every `sample_interval_s`, the deployment's state.

The load is real streamed `/v1/completions` traffic through Serve's HTTP proxy; the state comes
from Serve (replicas running and starting) and from every engine replica's own gauges
(`EngineServer.metrics`, the numbers behind `/metrics`: running and waiting requests, KV blocks,
expert balancedness, placement version, replicas per expert). Nothing here is simulated.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import ray
import yaml
from ray import serve

from bench.experiment.report import write_run, write_summary
from bench.experiment.scenario import Run, Scenario
from bench.serve import stream_completion
from model.config import ModelConfig
from model.synthetic import default_checkpoint
from serving import APP_NAME
from serving.app import build_app, resolve_model

ENGINE_DEPLOYMENT = "EngineServer"
LATE_FIGURES_S = 10.0  # how long the last sample waits for figures that come a report late
BEGIN_OF_TEXT = 200000
Log = Callable[[str], None]


@dataclass
class RequestRecord:
    """One request; times in seconds from the start of the load."""

    index: int
    scheduled_s: float
    prompt_tokens: int
    max_tokens: int
    sent_s: float = float("nan")
    first_token_s: float = float("nan")
    finished_s: float = float("nan")
    output_tokens: int = 0
    ok: bool = False
    error: str = ""

    @property
    def ttft_s(self) -> float:
        return self.first_token_s - self.sent_s

    @property
    def tpot_s(self) -> float:
        """Seconds per output token after the first (nan with fewer than two)."""
        if self.output_tokens < 2:
            return float("nan")
        return (self.finished_s - self.first_token_s) / (self.output_tokens - 1)


@dataclass
class Sample:
    """The deployment at one moment (seconds from the start of the load)."""

    t_s: float
    replicas_running: int
    replicas_starting: int
    in_flight: int  # sent by the client, not yet answered
    engines: list[dict[str, Any]] = field(default_factory=list)  # EngineServer.metrics() per replica
    starting_workers: int = 0  # workers the starting replicas hold (they report no metrics yet)

    def engine_sum(self, key: str) -> float:
        return float(sum(e.get(key, 0) for e in self.engines))

    def tier_sum(self, key: str, role: str) -> float:
        """`workers` or `workers_desired` of one tier summed over the replicas (nan: no replica
        reports tiers, e.g. the single-process engine)."""
        tiers = [e.get(key) or e.get("workers") for e in self.engines if e.get("workers")]
        return float(sum(t.get(role, 0) for t in tiers)) if tiers else float("nan")

    @property
    def balancing(self) -> list[dict[str, Any]]:
        return [e["balancing"] for e in self.engines if e.get("balancing")]

    def flat(self) -> dict[str, Any]:
        """The scalar columns of the time series."""
        bal = self.balancing
        kv_total = self.engine_sum("kv_blocks_total")
        attention, expert = self.tier_sum("workers", "attention"), self.tier_sum("workers", "expert")
        return {
            "replicas_running": self.replicas_running,
            "replicas_starting": self.replicas_starting,
            "in_flight": self.in_flight,
            "engine_running": self.engine_sum("num_running"),
            "engine_waiting": self.engine_sum("num_waiting"),
            "kv_usage": self.engine_sum("kv_blocks_used") / kv_total if kv_total else float("nan"),
            "balancedness": min(
                (b["balancedness"] for b in bal if "balancedness" in b), default=float("nan")
            ),
            "placement_version": max((b.get("placement_version", 0) for b in bal), default=float("nan")),
            "rearrangements": sum(b.get("rearrangements", 0) for b in bal) if bal else float("nan"),
            "max_replicas_per_expert": max(
                (
                    max(max(layer) for layer in b["replicas_per_expert"])
                    for b in bal
                    if b.get("replicas_per_expert")
                ),
                default=float("nan"),
            ),
            "attention_workers": attention,
            "expert_workers": expert,
            "attention_workers_desired": self.tier_sum("workers_desired", "attention"),
            "expert_workers_desired": self.tier_sum("workers_desired", "expert"),
            "workers": attention + expert + self.starting_workers,
        }


@dataclass
class RunResult:
    run: Run
    records: list[RequestRecord]
    samples: list[Sample]
    duration_s: float  # the load's own length (the scenario's duration_s)
    end_s: float  # when recording stopped
    deploy_s: float = 0.0  # seconds until the variant's deployment answered
    model_dir: str = ""

    def records_as_dicts(self) -> list[dict[str, Any]]:
        out = []
        for r in self.records:
            d = asdict(r)
            d["ttft_s"], d["tpot_s"] = r.ttft_s, r.tpot_s
            out.append(d)
        return out


# -- the workload ---------------------------------------------------------------------------


def draw_requests(run: Run, seed: int) -> list[RequestRecord]:
    """Arrival times and lengths for the whole run, drawn before it starts (seeded: re-runs of
    the scenario offer exactly the same requests)."""
    rng = np.random.default_rng(seed)
    load = run.load
    times = load.arrival_spec.times_within(load.duration_s, rng)
    prompts = load.prompt_spec.sample(len(times), rng)
    outputs = load.output_spec.sample(len(times), rng)
    return [
        RequestRecord(i, float(t), int(p), int(o))
        for i, (t, p, o) in enumerate(zip(times, prompts, outputs, strict=True))
    ]


def check_context(records: list[RequestRecord], context_length: int, run: Run) -> None:
    worst = max(records, key=lambda r: r.prompt_tokens + r.max_tokens, default=None)
    if worst is not None and worst.prompt_tokens + worst.max_tokens > context_length:
        raise ValueError(
            f"run {run.name!r}: a request of {worst.prompt_tokens} prompt + {worst.max_tokens} output "
            f"tokens exceeds the model's context of {context_length}; set load.max_prompt_tokens / "
            "load.max_output_tokens"
        )


def _body(r: RequestRecord, model: str, temperature: float, rng: random.Random) -> dict[str, Any]:
    ids = [BEGIN_OF_TEXT, *(rng.randrange(1000, 100000) for _ in range(r.prompt_tokens - 1))]
    return {
        "model": model,
        "prompt": ids,
        "max_tokens": r.max_tokens,
        "temperature": temperature,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


# -- one run --------------------------------------------------------------------------------


async def offer_load(
    base_url: str,
    model: str,
    run: Run,
    scenario: Scenario,
    records: list[RequestRecord],
    read_state: Callable[[], Any],
    log: Log,
) -> tuple[list[Sample], float]:
    """Send every request at its time, sample the deployment meanwhile, wait for the replies
    (at most `drain_timeout_s` after the load ends), then keep sampling for `cooldown_s`."""
    rng = random.Random(scenario.seed)
    bodies = [_body(r, model, run.load.temperature, rng) for r in records]
    timeout = httpx.Timeout(run.load.request_timeout_s)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=base_url, timeout=timeout, limits=limits) as client:
        load = _OpenLoop(client, run, scenario, records, read_state, log)
        stop = asyncio.Event()
        sampler = asyncio.create_task(load.sample_until(stop))
        tasks = await load.send_all(bodies)
        await load.drain(tasks)
        await asyncio.sleep(scenario.cooldown_s)
        stop.set()
        await sampler
    return load.samples, load.now()


class _OpenLoop:
    """One run's client side: the clock, the requests in flight, the samples."""

    def __init__(
        self,
        client: Any,
        run: Run,
        scenario: Scenario,
        records: list[RequestRecord],
        read_state: Callable[[], Any],
        log: Log,
    ) -> None:
        self.client, self.run, self.scenario, self.records = client, run, scenario, records
        self.read_state, self.log = read_state, log
        self.samples: list[Sample] = []
        self.in_flight = 0
        self.t0 = time.perf_counter()

    def now(self) -> float:
        return time.perf_counter() - self.t0

    async def send_all(self, bodies: list[dict[str, Any]]) -> list[asyncio.Task]:
        """Each request at its scheduled time (open loop: never waits for replies), then the rest
        of the load's duration."""
        tasks = []
        for r, body in zip(self.records, bodies, strict=True):
            delay = r.scheduled_s - self.now()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(self.send(r, body)))
        await asyncio.sleep(max(0.0, self.run.load.duration_s - self.now()))
        return tasks

    async def send(self, r: RequestRecord, body: dict[str, Any]) -> None:
        self.in_flight += 1
        r.sent_s = self.now()
        try:
            result = await stream_completion(self.client, "/v1/completions", body)
        finally:
            self.in_flight -= 1
        r.ok, r.error, r.output_tokens = result.ok, result.error, result.output_tokens
        if result.ttft_s:
            r.first_token_s = r.sent_s + result.ttft_s
        r.finished_s = r.sent_s + result.latency_s if result.ok else self.now()

    async def drain(self, tasks: list[asyncio.Task]) -> None:
        """Wait for the replies; those missing after `drain_timeout_s` are cancelled as failures."""
        if not tasks:
            return
        limit = self.scenario.drain_timeout_s
        _, pending = await asyncio.wait(tasks, timeout=limit)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for r in self.records:
            if not r.ok and not r.error:
                r.error = f"no reply within drain_timeout_s={limit:g} after the load"

    async def sample_until(self, stop: asyncio.Event) -> None:
        """A sample every `sample_interval_s` (and a progress line every 5 s) until `stop`, and one
        more then: the deployment once every reply is in (`_last_state`)."""
        next_log = 0.0
        while True:
            t, last = self.now(), stop.is_set()
            replicas, engines = await (self._last_state() if last else self.read_state())
            running, starting = replicas.get("RUNNING", 0), replicas.get("STARTING", 0)
            held = starting * _workers_per_replica(self.run)
            s = Sample(t, running, starting, self.in_flight, engines, held)
            self.samples.append(s)
            if t >= next_log:
                next_log = t + 5.0
                self.log(_progress(self.run.name, s, self.records))
            if last:
                return
            wait = max(0.0, self.scenario.sample_interval_s - (self.now() - t))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=wait)

    async def _last_state(self) -> tuple[dict[str, int], list[dict[str, Any]]]:
        """The deployment once every reply is in. With rebalancing on, the engines' balance comes
        from the router service a reply after the steps that it counts: read again (at most
        LATE_FIGURES_S) until an engine shows it, however far behind a busy machine left it."""
        deadline = time.perf_counter() + LATE_FIGURES_S
        while True:
            replicas, engines = await self.read_state()
            balance = any("balancedness" in (e.get("balancing") or {}) for e in engines)
            if balance or not self.run.app.rebalance.enabled or time.perf_counter() > deadline:
                return replicas, engines
            await asyncio.sleep(0.2)


def _workers_per_replica(run: Run) -> int:
    """The workers an engine replica starts with (0: the single-process engine has none)."""
    app = run.app
    if app.expert_workers == 0:
        return 0
    attention = app.tiers.attention_workers or app.attention_workers
    return attention + (app.tiers.expert_workers or app.expert_workers)


def _progress(name: str, s: Sample, records: list[RequestRecord]) -> str:
    sent = sum(1 for r in records if r.sent_s == r.sent_s)  # not nan
    answered = sum(1 for r in records if r.finished_s == r.finished_s)
    failed = sum(1 for r in records if r.finished_s == r.finished_s and not r.ok)
    f = s.flat()
    bal = f["balancedness"]
    return (
        f"  [{name}] t={s.t_s:6.1f}s  sent {sent}/{len(records)}  answered {answered} ({failed} failed)  "
        f"in flight {s.in_flight}  replicas {s.replicas_running}"
        + (f" (+{s.replicas_starting} starting)" if s.replicas_starting else "")
        + f"  engine running {f['engine_running']:g} waiting {f['engine_waiting']:g}"
        + (f"  balancedness {bal:.2f}" if bal == bal else "")
        + (
            f"  workers {f['attention_workers']:g} attention + {f['expert_workers']:g} expert"
            if f["expert_workers"] == f["expert_workers"]
            else ""
        )
    )


# -- deployments ----------------------------------------------------------------------------


class Deployer:
    """Ray and Serve for the experiment: joins or starts Ray, starts Serve's HTTP proxy if it is
    not running, deploys one variant at a time, and on close stops what it started."""

    def __init__(self, address: str | None, num_cpus: float | None, host: str, http_port: int, log: Log):
        self.log = log
        self.started_ray = not ray.is_initialized()
        if self.started_ray:
            ray.init(address=address, num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
        self.started_serve = not serve.status().proxies
        if self.started_serve:
            serve.start(http_options={"host": host, "port": http_port})
        self.base_url = f"http://{host}:{http_port}"

    def check_free(self, replace: bool) -> None:
        if APP_NAME in serve.status().applications and not replace:
            raise ValueError(
                f"a Serve application named {APP_NAME!r} is already deployed on this Ray cluster; the "
                "experiment deploys its own variants under that name (pass --replace to let it)"
            )

    def deploy(self, run: Run, model_dir: str) -> tuple[str, float]:
        """Deploy `run`'s application; the served model's name and the seconds it took."""
        config = run.app.model_copy(update={"model": model_dir})
        start = time.perf_counter()
        serve.run(build_app(config), name=APP_NAME, route_prefix="/")
        try:
            listed = httpx.get(f"{self.base_url}/v1/models", timeout=30).json()["data"][0]["id"]
        except Exception as e:
            raise RuntimeError(
                f"the application was deployed but {self.base_url}/v1/models does not list it ({e}); is "
                "Serve's HTTP proxy running with other options? (--http-port)"
            ) from e
        if listed != config.model_name:
            raise RuntimeError(f"{self.base_url} serves {listed!r}, not {config.model_name!r}")
        self.engine_handle = serve.get_deployment_handle(ENGINE_DEPLOYMENT, app_name=APP_NAME)
        return listed, time.perf_counter() - start

    async def read_state(self) -> tuple[dict[str, int], list[dict[str, Any]]]:
        """Serve's replica states of the engine deployment, and each engine replica's gauges."""
        status = await asyncio.to_thread(serve.status)
        app = status.applications.get(APP_NAME)
        dep = app.deployments.get(ENGINE_DEPLOYMENT) if app else None
        replicas = {str(k): int(v) for k, v in (dep.replica_states.items() if dep else [])}
        try:
            results = await self.engine_handle.broadcast("metrics").results_async(
                timeout_s=5.0, return_exceptions=True
            )
        except Exception:  # replicas coming and going: a missing sample, not a failed experiment
            results = []
        return replicas, [r for r in results if isinstance(r, dict)]

    def delete(self) -> None:
        serve.delete(APP_NAME)

    def close(self) -> None:
        if self.started_serve or self.started_ray:
            serve.shutdown()
        if self.started_ray:
            ray.shutdown()


def run_scenario(
    scenario: Scenario,
    out_dir: Path,
    *,
    address: str | None = None,
    num_cpus: float | None = None,
    host: str = "127.0.0.1",
    http_port: int = 8000,
    replace: bool = False,
    log: Log = print,
) -> list[RunResult]:
    """Every variant in turn; each variant's results are written as soon as it ends."""
    runs = scenario.runs()
    ck = scenario.checkpoint
    default_dir = None
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "scenario.yaml").write_text(_scenario_yaml(scenario))
    deployer = Deployer(address, num_cpus, host, http_port, log)
    results = []
    try:
        deployer.check_free(replace)
        for i, run in enumerate(runs):
            if run.app.model:
                model_dir = resolve_model(run.app.model)
            else:
                default_dir = default_dir or str(
                    default_checkpoint(ck.preset, ck.seed, ck.expert_skew, ck.skew_seed)
                )
                model_dir = default_dir
            records = draw_requests(run, scenario.seed)
            check_context(records, ModelConfig.from_file(Path(model_dir)).max_position_embeddings, run)
            log(f"[{i + 1}/{len(runs)}] {run.name}: deploying ({run.describe()})")
            model, deploy_s = deployer.deploy(run, model_dir)
            log(
                f"[{i + 1}/{len(runs)}] {run.name}: ready in {deploy_s:.1f} s; offering "
                f"{len(records)} requests over {run.load.duration_s:g} s ({run.load.arrivals})"
            )
            try:
                samples, end_s = asyncio.run(
                    offer_load(deployer.base_url, model, run, scenario, records, deployer.read_state, log)
                )
            finally:
                deployer.delete()
            result = RunResult(run, records, samples, run.load.duration_s, end_s, deploy_s, model_dir)
            write_run(result, scenario, out_dir / run.name)
            results.append(result)
            write_summary(results, scenario, out_dir)  # after each: an interrupted run keeps its table
    finally:
        deployer.close()
    return results


def _scenario_yaml(scenario: Scenario) -> str:
    return yaml.safe_dump(scenario.model_dump(mode="json"), sort_keys=False)
