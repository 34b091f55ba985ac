"""`llama4-ep experiment SCENARIO.yaml`: run a scenario's variants and write a results folder."""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def add_experiment_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "experiment",
        help="run an autoscaling experiment (a YAML scenario) against a live Serve deployment",
        description="Deploys each variant of the scenario on Ray Serve in turn, offers its open-loop "
        "load over HTTP, records latency, load, replicas, queue depth and expert balance over time, "
        "and writes plots and a summary table. Scenarios: experiments/*.yaml.",
    )
    p.add_argument("scenario", help="the scenario file (YAML)")
    p.add_argument("--out", default=None, help="results folder (default: results/<name>-<time>)")
    p.add_argument("--only", action="append", default=None, metavar="VARIANT", help="run only these")
    p.add_argument("--address", default=None, help="join this Ray cluster (default: start a local one)")
    p.add_argument("--num-cpus", type=float, default=None, help="CPUs of the local Ray instance")
    p.add_argument("--host", default="127.0.0.1", help="Serve's HTTP host")
    p.add_argument("--http-port", type=int, default=8000, help="Serve's HTTP port (default %(default)s)")
    p.add_argument(
        "--replace", action="store_true", help="replace a llama4-ep application already deployed there"
    )
    p.set_defaults(func=_cmd_experiment)


def _cmd_experiment(args: argparse.Namespace) -> int:
    # lazy: start-up time of the CLI (the runner loads Ray, Serve and torch)
    from bench.experiment.report import markdown_summary, summarize  # lazy: see above
    from bench.experiment.runner import run_scenario  # lazy: see above
    from bench.experiment.scenario import load_scenario  # lazy: see above

    scenario = load_scenario(args.scenario)
    if args.only:
        known = [v.name for v in scenario.variants]
        unknown = [name for name in args.only if name not in known]
        if unknown:
            raise ValueError(f"--only {', '.join(unknown)}: the scenario's variants are {known}")
        scenario = scenario.model_copy(
            update={"variants": [v for v in scenario.variants if v.name in args.only]}
        )
    out = Path(args.out or f"results/{scenario.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    print(f"experiment {scenario.name!r}: {len(scenario.runs())} run(s); results in {out}", flush=True)
    results = run_scenario(
        scenario,
        out,
        address=args.address,
        num_cpus=args.num_cpus,
        host=args.host,
        http_port=args.http_port,
        replace=args.replace,
        log=lambda line: print(line, flush=True),
    )
    print(markdown_summary([summarize(r, scenario) for r in results], scenario))
    print(f"results: {out} (summary.md, summary.csv, comparison.png, <variant>/timeseries.png)")
    return 0
