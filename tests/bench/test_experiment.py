"""Autoscaling experiments: scenario files are checked before anything deploys, the report's
arithmetic is right on known records, and a short real experiment on Ray Serve (the tiny
model, a few seconds of load) writes its plots and table."""

from __future__ import annotations

import csv
import json
import math
import socket
from pathlib import Path

import pytest
import yaml

from bench.experiment.report import summarize, timeseries
from bench.experiment.runner import RequestRecord, RunResult, Sample, draw_requests, run_scenario
from bench.experiment.scenario import Scenario, deep_merge, load_scenario

ROOT = Path(__file__).resolve().parents[2]
SCENARIOS = sorted((ROOT / "experiments").glob("*.yaml"))
PNG = b"\x89PNG\r\n\x1a\n"


def scenario(**overrides) -> Scenario:
    base = {"name": "t", "load": {"duration_s": 10, "arrivals": "poisson:2"}}
    return Scenario.model_validate(deep_merge(base, overrides))


@pytest.mark.parametrize("path", SCENARIOS, ids=[p.stem for p in SCENARIOS])
def test_committed_scenarios_validate(path: Path):
    s = load_scenario(path)
    assert s.runs() and all(r.load.duration_s > 0 for r in s.runs())


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("name: x\nload: {duration_s: 5, arrivals: 'wavy:3'}\n", "load.arrivals"),
        (
            "name: x\nload: {duration_s: 5, arrivals: 'poisson:2', output_tokens: 'uniform:9:3'}\n",
            "output_tokens",
        ),
        ("name: x\nload: {duration_s: 0, arrivals: 'poisson:2'}\n", "duration_s"),
        ("name: x\nload: {duration_s: 5, arrivals: 'poisson:2'}\nap: {}\n", "ap"),
        ("name: x\nload: {duration_s: 5, arrivals: 'poisson:2'}\ncheckpoint: {preset: huge}\n", "huge"),
        (
            "name: x\nload: {duration_s: 5, arrivals: 'poisson:2'}\n"
            "variants: [{name: a, app: {autoscaling: {min_replicas: 3, max_replicas: 2}}}]\n",
            "variant 'a'",
        ),
        (
            "name: x\nload: {duration_s: 5, arrivals: 'poisson:2'}\nvariants: [{name: a}, {name: a}]\n",
            "unique",
        ),
        ("name: x\nload: {duration_s: 5, arrivals: 'poisson:2'}\nvariants: [{name: 'a b'}]\n", "name"),
        ("- just\n- a list\n", "mapping"),
        ("name: [unclosed\n", "YAML"),
    ],
)
def test_bad_scenarios_are_refused_naming_what_is_wrong(tmp_path: Path, text: str, named: str):
    path = tmp_path / "s.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match="s.yaml") as e:
        load_scenario(path)
    assert named in str(e.value)


def test_missing_scenario_file_is_named(tmp_path: Path):
    with pytest.raises(ValueError, match="no such file"):
        load_scenario(tmp_path / "nope.yaml")


def test_variants_merge_deeply_over_the_base():
    s = scenario(
        app={"expert_workers": 2, "autoscaling": {"min_replicas": 1, "max_replicas": 2}},
        variants=[
            {"name": "fixed", "app": {"autoscaling": {"max_replicas": 1}}},
            {"name": "fast", "load": {"arrivals": "poisson:8"}},
        ],
    )
    fixed, fast = s.runs()
    assert (fixed.app.autoscaling.min_replicas, fixed.app.autoscaling.max_replicas) == (1, 1)
    assert fixed.app.expert_workers == 2 and fixed.load.arrivals == "poisson:2"
    assert fast.app.autoscaling.max_replicas == 2 and fast.load.arrivals == "poisson:8"
    assert [r.name for r in scenario().runs()] == ["base"]


def test_the_drawn_requests_follow_the_load_and_repeat_exactly():
    s = scenario(load={"arrivals": "step:1:10:5", "prompt_tokens": "uniform:4:9", "output_tokens": "const:7"})
    (run,) = s.runs()
    a, b = draw_requests(run, seed=3), draw_requests(run, seed=3)
    assert [(r.scheduled_s, r.prompt_tokens) for r in a] == [(r.scheduled_s, r.prompt_tokens) for r in b]
    times = [r.scheduled_s for r in a]
    assert times == sorted(times) and times[0] >= 0 and times[-1] < 10
    assert sum(t >= 5 for t in times) > 3 * sum(t < 5 for t in times)  # 10/s after t=5 against 1/s
    assert all(4 <= r.prompt_tokens <= 9 and r.max_tokens == 7 for r in a)


def _record(i: int, sent: float, first: float, done: float, tokens: int, ok: bool = True) -> RequestRecord:
    return RequestRecord(
        i, sent, 8, tokens, sent, first, done, tokens if ok else 0, ok, "" if ok else "HTTP 429"
    )


def _result(records, samples, duration=4.0, end=6.0) -> RunResult:
    (run,) = scenario(load={"duration_s": duration}).runs()
    return RunResult(run, records, samples, duration, end)


def test_time_series_counts_every_request_and_token_once():
    records = [
        _record(0, 0.2, 0.5, 2.5, 5),  # tokens stream over bins 0-2
        _record(1, 1.1, 1.3, 1.9, 3),
        _record(2, 3.5, 3.9, 5.1, 4),
        _record(3, 3.6, math.nan, 3.7, 0, ok=False),
    ]
    samples = [Sample(0.0, 1, 0, 1, []), Sample(2.1, 1, 1, 2, []), Sample(4.0, 2, 0, 1, [])]
    rows = timeseries(_result(records, samples), 1.0)
    assert len(rows) == 6
    assert sum(r["offered_rps"] for r in rows) == 4
    assert sum(r["achieved_rps"] for r in rows) == 3 and sum(r["failed"] for r in rows) == 1
    assert sum(r["output_tps"] for r in rows) == pytest.approx(12)
    assert rows[0]["output_tps"] == pytest.approx(1 + 4 * 0.5 / 2.0)  # first token + its share of the rest
    assert rows[1]["ttft_p50_ms"] == pytest.approx(200) and math.isnan(rows[2]["ttft_p50_ms"])
    assert rows[1]["tpot_p50_ms"] == pytest.approx(300)  # (1.9 - 1.3) / 2
    assert [r["replicas_running"] for r in rows] == [1, 1, 1, 1, 2, 2]
    assert [r["replicas_starting"] for r in rows] == [0, 0, 1, 1, 0, 0]


def test_summary_figures():
    records = [_record(0, 0.0, 0.1, 1.0, 10), _record(1, 1.0, 1.4, 2.0, 2), _record(2, 2.0, 2.1, 3.0, 1)]
    samples = [Sample(0.0, 1, 0, 0, []), Sample(2.0, 2, 0, 0, []), Sample(5.0, 1, 0, 0, [])]
    s = scenario(slo={"ttft_ms": 200})
    f = summarize(_result(records, samples), s)
    assert (f["requests"], f["completed"], f["failed"]) == (3, 3, 0)
    assert f["offered_rps"] == pytest.approx(3 / 4) and f["achieved_rps"] == pytest.approx(3 / 4)
    assert f["output_tps"] == pytest.approx(13 / 4)
    assert f["ttft_p50_ms"] == pytest.approx(100)
    assert f["goodput_rps"] == pytest.approx(2 / 4) and f["slo_attainment"] == pytest.approx(2 / 3)
    assert f["replicas_max"] == 2 and f["first_scale_up_s"] == 2.0
    assert f["replica_seconds"] == pytest.approx(1 * 2 + 2 * 3 + 1 * 1)


def _engine(attention: int, expert: int, desired: tuple[int, int] | None = None) -> dict:
    want = desired or (attention, expert)
    return {
        "workers": {"attention": attention, "expert": expert},
        "workers_desired": {"attention": want[0], "expert": want[1]},
    }


def test_a_tiers_variant_records_workers_per_tier():
    """Workers per tier summed over replicas, in the time series and as worker-seconds (a
    starting replica's workers count: it holds them); a single-process engine reports none."""
    s = scenario(
        app={"cpus_per_worker": 0.2},
        variants=[
            {"name": "fixed"},
            {"name": "tiers", "app": {"tiers": {"autoscaler": {"enabled": True, "max_expert_workers": 3}}}},
        ],
    )
    fixed, tiers = s.runs()
    assert "tier autoscaler: attention 1-4, expert 1-3" in tiers.describe()
    assert "tier autoscaler" not in fixed.describe()
    samples = [
        Sample(0.0, 1, 0, 0, [_engine(1, 2)]),
        Sample(2.0, 1, 0, 3, [_engine(1, 2, desired=(2, 3))]),  # a resize asked for
        Sample(3.0, 1, 0, 3, []),  # the gauges did not answer: the count before stands
        Sample(4.0, 1, 1, 3, [_engine(2, 3)], starting_workers=3),  # plus a replica starting
        Sample(5.0, 2, 0, 1, [_engine(2, 3), _engine(1, 2)]),
    ]
    result = RunResult(tiers, [], samples, 4.0, 6.0)
    flats = [x.flat() for x in samples]
    assert [f["expert_workers"] for f in flats][:2] == [2, 2] and flats[1]["expert_workers_desired"] == 3
    assert math.isnan(flats[2]["workers"]) and flats[4]["attention_workers"] == 3
    assert [f["workers"] for f in flats if f["workers"] == f["workers"]] == [3, 3, 8, 8]
    f = summarize(result, s)
    assert f["worker_seconds"] == pytest.approx(3 * 2 + 3 * 1 + 3 * 1 + 8 * 1 + 8 * 1)
    assert (f["attention_workers_max"], f["expert_workers_max"]) == (3, 5)
    rows = timeseries(result, 1.0)
    experts = [r["expert_workers"] for r in rows]
    assert experts[:3] + experts[4:] == [2, 2, 2, 3, 5] and math.isnan(experts[3])  # bin 3: no gauges
    single = Sample(0.0, 1, 0, 0, [{"num_running": 1, "workers": {}}]).flat()
    assert math.isnan(single["attention_workers"]) and math.isnan(single["workers"])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_a_short_real_experiment_writes_its_plots_and_table(ray_session, skewed_maverick, tmp_path: Path):
    """experiments/smoke.yaml (shortened) on a real Serve deployment: every request answered,
    the deployment sampled (replicas, engine queue, expert balance), files written."""
    raw = yaml.safe_load((ROOT / "experiments" / "smoke.yaml").read_text())
    # balance figures reach the engine's gauges one load report after they were asked for: with a
    # report every step they are there after a few steps, however slowly a busy machine steps
    app = {"model": str(skewed_maverick), "rebalance": {"report_every": 1}}
    raw = deep_merge(raw, {"app": app, "load": {"duration_s": 4}})
    s = Scenario.model_validate(raw)
    lines: list[str] = []
    (result,) = run_scenario(s, tmp_path, http_port=free_port(), log=lines.append)

    assert result.records and all(r.ok for r in result.records), [r.error for r in result.records]
    assert all(r.output_tokens == r.max_tokens for r in result.records)  # ignore_eos: exact lengths
    assert any("[base] t=" in line for line in lines)  # progress while it runs
    flats = [x.flat() for x in result.samples]
    assert flats and all(f["replicas_running"] == 1 for f in flats)
    assert flats[-1]["balancedness"] == flats[-1]["balancedness"]  # the engine reported balance
    # the engine's queue is sampled, but whether a 0.5 s sample lands while a short request runs is
    # luck: the step count is not. Each step gives a sequence at most one token, and the last
    # sample is taken once every reply is in.
    assert all(f["engine_running"] >= 0 and f["engine_waiting"] >= 0 for f in flats)
    assert result.samples[-1].engine_sum("num_steps") >= max(r.output_tokens for r in result.records)
    assert all((f["attention_workers"], f["expert_workers"]) == (1, 2) for f in flats)  # per tier

    for name in ("comparison.png", "base/timeseries.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG
    with open(tmp_path / "summary.csv") as f:
        (row,) = list(csv.DictReader(f))
    assert row["variant"] == "base" and int(row["completed"]) == len(result.records)
    assert float(row["worker_seconds"]) == pytest.approx(3 * float(row["replica_seconds"]), rel=1e-3)
    assert "| base | " in (tmp_path / "summary.md").read_text()
    with open(tmp_path / "base" / "requests.csv") as f:
        assert len(list(csv.DictReader(f))) == len(result.records)
    with open(tmp_path / "base" / "timeseries.csv") as f:
        rows = list(csv.DictReader(f))
    tokens = sum(float(r["output_tps"]) * s.sample_interval_s for r in rows)
    assert tokens == pytest.approx(sum(r.output_tokens for r in result.records), rel=1e-3)
    placement = json.loads((tmp_path / "base" / "placement.json").read_text())
    (layers,) = placement.values()
    assert layers and all(min(layer) >= 1 for layer in layers)  # every expert has a replica
    again = load_scenario(tmp_path / "scenario.yaml")  # the results folder re-runs as it ran
    assert again.name == "smoke" and again.runs()[0].app == s.runs()[0].app
    # the application is gone and Serve is stopped again: later tests start their own
    from ray import serve

    assert not serve.status().applications


def test_cli_names_a_bad_scenario_and_an_unknown_variant(tmp_path: Path, capsys):
    from cli.main import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nload: {duration_s: 5, arrivals: 'poisson:-1'}\n")
    with pytest.raises(SystemExit) as e:
        main(["experiment", str(bad)])
    assert e.value.code == 2 and "load.arrivals" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["experiment", str(ROOT / "experiments" / "autoscale-step.yaml"), "--only", "nope"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "nope" in err and "fixed-1" in err
