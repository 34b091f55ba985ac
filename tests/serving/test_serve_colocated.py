"""The colocated layout (`colocate_ingress`): the ingress and the single-process engine in one
Serve replica, deployed as its own application beside the session's. Its replies equal the
engine's over HTTP (streamed and whole, with a stream interval) and gRPC; bad input is a 400 and
serving goes on; /health and /metrics answer from the replica's own engine; a stream the client
leaves frees its KV blocks; a killed engine process is replaced and its stream goes on."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from engine.core import EngineConfig
from engine.llm_engine import LLMEngine
from engine.request import SamplingParams
from model.tokenizer import Tokenizer
from serving.app import ServeAppConfig, build_app
from serving.client import Completion, GRPCClient
from tests.helpers import random_prompts

APP = "colocated"
ENGINE = {"num_kv_blocks": 512, "block_size": 16}
MAX_TOKENS = 9
IGNORE_EOS = {"ignore_eos": True}


@pytest.fixture(scope="module")
def colocated(server, tiny_maverick):
    from ray import serve

    config = ServeAppConfig(
        model=str(tiny_maverick),
        served_model_name="colocated-model",
        expert_workers=0,
        colocate_ingress=True,
        cpus_per_worker=0.01,
        stream_interval=4,
        engine=ENGINE,
    )
    serve.run(build_app(config), name=APP, route_prefix=f"/{APP}")
    try:
        yield f"{server.http}/{APP}"
    finally:
        serve.delete(APP)


@pytest.fixture(scope="module")
def reference(tiny_maverick):
    engine = LLMEngine.from_checkpoint(tiny_maverick, EngineConfig(**ENGINE))
    tokenizer = Tokenizer(tiny_maverick)

    def run(prompt: list[int]) -> tuple[list[int], str]:
        (done,) = engine.generate([prompt], SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True))
        return done.token_ids, tokenizer.decode_output(done.token_ids)

    return run


def metrics(base: str) -> dict[str, float]:
    text = httpx.get(f"{base}/metrics", timeout=30).text
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}


def test_one_deployment_serves_http_equal_to_the_engine(colocated, reference):
    from ray import serve

    status = serve.status().applications[APP]
    assert set(status.deployments) == {"ColocatedServer"}  # no separate engine deployment
    client = openai.OpenAI(base_url=f"{colocated}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list()] == ["colocated-model"]
    prompt = random_prompts([11], seed=51)[0]
    _, text = reference(prompt)
    args = {"model": "colocated-model", "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0}
    whole = client.completions.create(**args, extra_body=IGNORE_EOS)
    chunks = [c for c in client.completions.create(**args, stream=True, extra_body=IGNORE_EOS) if c.choices]
    assert whole.choices[0].text == "".join(c.choices[0].text for c in chunks) == text
    # stream interval 4: the first token alone, then four at a time (9 = 1 + 4 + 4)
    assert len(chunks) <= 3
    assert httpx.get(f"{colocated}/health").status_code == 200


def test_grpc_equals_the_engine(server, colocated, reference):
    prompt = random_prompts([7], seed=52)[0]
    ids, text = reference(prompt)
    with GRPCClient(server.grpc, application=APP) as c:
        whole = c.generate(prompt_token_ids=prompt, max_tokens=MAX_TOKENS, ignore_eos=True)
        result = Completion()
        pieces = list(c.stream(result, prompt_token_ids=prompt, max_tokens=MAX_TOKENS, ignore_eos=True))
    assert whole.token_ids == result.token_ids == ids
    assert whole.text == "".join(pieces) == text


def test_bad_input_is_400_and_serving_goes_on(colocated, reference):
    r = httpx.post(
        f"{colocated}/v1/completions", json={"model": "colocated-model", "max_tokens": 2}, timeout=30
    )
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    too_long = {"model": "colocated-model", "prompt": [1, 2, 3], "max_tokens": 10**6}
    r = httpx.post(f"{colocated}/v1/completions", json=too_long, timeout=30)
    assert r.status_code == 400 and "context length" in r.json()["error"]["message"]
    prompt = random_prompts([5], seed=53)[0]
    body = {"model": "colocated-model", "prompt": prompt, "max_tokens": MAX_TOKENS, **IGNORE_EOS}
    r = httpx.post(f"{colocated}/v1/completions", json={**body, "temperature": 0}, timeout=60)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == reference(prompt)[1]


def test_metrics_come_from_the_replica_and_a_left_stream_frees_its_blocks(colocated):
    body = {"model": "colocated-model", "prompt": list(range(1, 100)), "max_tokens": 2000, "stream": True}
    with (
        httpx.Client(base_url=colocated, timeout=60) as c,
        c.stream("POST", "/v1/completions", json={**body, **IGNORE_EOS}) as r,
    ):
        events = (line for line in r.iter_lines() if line)  # SSE events are blank-line separated
        for _ in range(3):
            assert next(events).startswith("data: ")
        busy = metrics(colocated)
    assert busy["llama4_ep_num_requests_running"] == 1 and busy["llama4_ep_kv_blocks_used"] > 0
    assert busy["llama4_ep_engine_step_seconds_count"] > 0
    deadline = time.monotonic() + 60
    while (idle := metrics(colocated))["llama4_ep_kv_blocks_used"] > 0:
        assert time.monotonic() < deadline, f"blocks still held: {idle}"
        time.sleep(0.2)
    assert idle["llama4_ep_num_requests_running"] == 0


@pytest.mark.slow
def test_a_killed_engine_process_is_replaced_and_its_stream_goes_on_unchanged(colocated, tiny_maverick):
    """A SIGKILL mid-stream: the replica starts a new engine process, the stream waits and then
    goes on, and the text is what an uninterrupted run gives; /metrics counts the loss."""
    import os
    import signal

    from ray import serve

    handle = serve.get_deployment_handle("ColocatedServer", APP)
    (pid,) = handle.worker_pids.remote().result()["engine"]
    prompt, n = list(range(1, 50)), 400
    engine = LLMEngine.from_checkpoint(tiny_maverick, EngineConfig(**ENGINE))
    (done,) = engine.generate([prompt], SamplingParams(max_tokens=n, ignore_eos=True))
    expected = Tokenizer(tiny_maverick).decode_output(done.token_ids)
    body = {"model": "colocated-model", "prompt": prompt, "max_tokens": n, "stream": True, "temperature": 0}
    text = []
    with (
        httpx.Client(base_url=colocated, timeout=120) as c,
        c.stream("POST", "/v1/completions", json={**body, **IGNORE_EOS}) as r,
    ):
        events = (line.removeprefix("data: ") for line in r.iter_lines() if line)
        text.append(json.loads(next(events))["choices"][0]["text"])
        os.kill(pid, signal.SIGKILL)
        rest = list(events)
    assert rest[-1] == "[DONE]", rest[-3:]
    text += [json.loads(e)["choices"][0]["text"] for e in rest[:-1]]
    assert "".join(text) == expected
    (new_pid,) = handle.worker_pids.remote().result()["engine"]
    assert new_pid != pid
    m = metrics(colocated)
    assert m["llama4_ep_worker_failures_total"] == 1 and m["llama4_ep_requests_replayed_total"] == 1
    assert m["llama4_ep_recovery_seconds_count"] == 1
