"""The application on a real Ray Serve instance (1 attention + 2 expert workers): the official
`openai` client, a grpcio client through Serve's gRPC proxy, 16 streams at once, bad input,
overload and cancellation, `/health` and `/metrics`. One application serves the whole module.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import grpc
import httpx
import openai
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from prometheus_client.parser import text_string_to_metric_families

from engine.core import EngineConfig
from engine.llm_engine import LLMEngine
from engine.request import SamplingParams
from model.tokenizer import Tokenizer
from serving import APP_NAME
from serving.app import IngressDeployment
from serving.client import Completion, GRPCClient, ServerError
from serving.engine_server import EngineFailure
from serving.frontend import IngressSpec
from serving.proto_gen import llama4_ep_pb2, llama4_ep_pb2_grpc
from tests.helpers import random_prompts
from tests.serving.conftest import ENGINE, MAX_PENDING

MAX_TOKENS = 8
IGNORE_EOS = {"ignore_eos": True}


@pytest.fixture(scope="module")
def reference(tiny_maverick):
    """The single-process engine's greedy ids and text for a prompt."""
    engine = LLMEngine.from_checkpoint(tiny_maverick, EngineConfig(**ENGINE))
    tokenizer = Tokenizer(tiny_maverick)

    def run(prompts: list[list[int]], max_tokens: int = MAX_TOKENS) -> list[tuple[list[int], str]]:
        done = engine.generate(prompts, SamplingParams(max_tokens=max_tokens, ignore_eos=True))
        return [(c.token_ids, tokenizer.decode_output(c.token_ids)) for c in done]

    run.tokenizer = tokenizer
    return run


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.http}/v1", api_key="unused", max_retries=0)


def engine_metrics() -> dict:
    from ray import serve

    return serve.get_deployment_handle("EngineServer", APP_NAME).metrics.remote().result()


# -- the happy paths ------------------------------------------------------------------------


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list()] == [server.model]
    assert httpx.get(f"{server.http}/health").status_code == 200


@pytest.mark.parametrize("prompt", ["The quick brown fox", [200000, 1263, 7, 99, 4242]])
def test_completion_streamed_equals_non_streamed_and_the_engine(server, client, reference, prompt):
    ids = reference.tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
    ((_, expected),) = reference([ids])
    args = {"model": server.model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0}
    whole = client.completions.create(**args, extra_body=IGNORE_EOS)
    chunks = list(
        client.completions.create(
            **args, stream=True, stream_options={"include_usage": True}, extra_body=IGNORE_EOS
        )
    )
    streamed = "".join(c.choices[0].text for c in chunks if c.choices)
    assert whole.choices[0].text == streamed == expected
    assert whole.choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == MAX_TOKENS
    assert whole.usage.prompt_tokens == chunks[-1].usage.prompt_tokens == len(ids)


def test_chat_streamed_equals_non_streamed_and_the_engine(server, client, reference):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Tell me about experts."},
    ]
    ((_, expected),) = reference([reference.tokenizer.apply_chat_template(messages)])
    args = {"model": server.model, "messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0}
    whole = client.chat.completions.create(**args, extra_body=IGNORE_EOS)
    chunks = list(client.chat.completions.create(**args, stream=True, extra_body=IGNORE_EOS))
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert whole.choices[0].message.content == streamed == expected
    assert whole.choices[0].message.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason == "length"


def test_stop_string_ends_the_completion(server, client, reference):
    prompt = [200000, 17, 4000, 123]
    ((ids, text),) = reference([prompt], max_tokens=12)
    pieces = [reference.tokenizer.decode([t]) for t in ids[3:]]
    stop = next(p for p in pieces if p.strip() and "\ufffd" not in p)
    args = {"model": server.model, "prompt": prompt, "max_tokens": 12, "temperature": 0, "stop": [stop]}
    whole = client.completions.create(**args, extra_body=IGNORE_EOS)
    streamed = "".join(
        c.choices[0].text for c in client.completions.create(**args, stream=True, extra_body=IGNORE_EOS)
    )
    assert whole.choices[0].text == streamed == text[: text.index(stop)]
    assert whole.choices[0].finish_reason == "stop"


def test_grpc_unary_and_stream_equal_the_engine(server, reference):
    prompt = random_prompts([9], seed=41)[0]
    ((ids, text),) = reference([prompt])
    with GRPCClient(server.grpc) as c:
        whole = c.generate(prompt_token_ids=prompt, max_tokens=MAX_TOKENS, ignore_eos=True)
        text_prompt = c.generate(prompt="a text prompt works too", max_tokens=1)
        result = Completion()
        pieces = list(c.stream(result, prompt_token_ids=prompt, max_tokens=MAX_TOKENS, ignore_eos=True))
    assert whole.token_ids == result.token_ids == ids
    assert whole.text == "".join(pieces) == result.text == text
    assert whole.finish_reason == result.finish_reason == "length"
    assert result.usage == {
        "prompt_tokens": 9,
        "completion_tokens": MAX_TOKENS,
        "total_tokens": 9 + MAX_TOKENS,
    }
    assert text_prompt.usage["completion_tokens"] == 1


def test_sixteen_simultaneous_streams(server, reference):
    prompts = random_prompts([3 + 2 * i for i in range(16)], seed=42)
    expected = [text for _, text in reference(prompts)]

    async def one(c: openai.AsyncOpenAI, prompt: list[int]) -> str:
        stream = await c.completions.create(
            model=server.model,
            prompt=prompt,
            max_tokens=MAX_TOKENS,
            temperature=0,
            stream=True,
            extra_body=IGNORE_EOS,
        )
        return "".join([chunk.choices[0].text async for chunk in stream])

    async def main() -> list[str]:
        c = openai.AsyncOpenAI(base_url=f"{server.http}/v1", api_key="unused", max_retries=0)
        return await asyncio.gather(*(one(c, p) for p in prompts))

    assert asyncio.run(main()) == expected


# -- bad input --------------------------------------------------------------------------------


def bad_bodies(model: str) -> list[tuple[str, object, str | None]]:
    """(path, body, the `param` the error names)"""
    ok = {"model": model, "prompt": "hi"}
    chat = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    return [
        ("/v1/completions", b'{"model": "x", "prompt": ', None),
        ("/v1/completions", b"[]", None),
        ("/v1/completions", {"prompt": "hi"}, "model"),
        ("/v1/completions", {"model": model}, "prompt"),
        ("/v1/completions", {**ok, "max_tokens": "8"}, "max_tokens"),
        ("/v1/completions", {**ok, "temperature": 3.0}, "temperature"),
        ("/v1/completions", {**ok, "top_p": 1.5}, "top_p"),
        ("/v1/completions", {**ok, "top_k": -2}, "top_k"),
        ("/v1/completions", {**ok, "n": 17}, "n"),
        ("/v1/completions", {**ok, "logprobs": 21}, "logprobs"),
        ("/v1/completions", {**ok, "guided_regex": "(unclosed"}, "guided_regex"),
        ("/v1/completions", {**ok, "model": "gpt-4"}, "model"),
        ("/v1/completions", {"model": model, "prompt": [1, 202048]}, "prompt"),
        ("/v1/completions", {"model": model, "prompt": list(range(1, 4091)), "max_tokens": 10}, "max_tokens"),
        ("/v1/chat/completions", {**chat, "messages": []}, "messages"),
        (
            "/v1/chat/completions",
            {**chat, "messages": [{"role": "robot", "content": "hi"}]},
            "messages.0.role",
        ),
        ("/v1/chat/completions", {**chat, "stream": 1}, "stream"),
    ]


def test_bad_requests_are_400_with_openai_error_bodies(server, reference):
    with httpx.Client(base_url=server.http, timeout=30) as c:
        for path, body, param in bad_bodies(server.model):
            content = body if isinstance(body, bytes) else json.dumps(body).encode()
            r = c.post(path, content=content, headers={"content-type": "application/json"})
            assert r.status_code == 400, (body, r.text)
            error = r.json()["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["message"]
            assert error["type"] == "invalid_request_error" and error["param"] == param, (body, error)
        # the context error says the numbers
        r = c.post(
            "/v1/completions", json={"model": server.model, "prompt": list(range(1, 4091)), "max_tokens": 10}
        )
        assert all(n in r.json()["error"]["message"] for n in ("4096", "4100", "4090", "10"))
        assert r.json()["error"]["code"] == "context_length_exceeded"
        assert c.get("/v1/nowhere").status_code == 404 and c.get("/v1/completions").status_code == 405
        # and the server still serves
        prompt = [200000, 5, 6]
        r = c.post(
            "/v1/completions", json={"model": server.model, "prompt": prompt, "temperature": 0, **IGNORE_EOS}
        )
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == reference([prompt], 16)[0][1]


def test_openai_client_sees_bad_request(server, client):
    with pytest.raises(openai.BadRequestError, match="maximum context length is 4096"):
        client.completions.create(model=server.model, prompt="hi", max_tokens=5000)


def test_grpc_bad_requests_are_invalid_argument(server):
    cases = [
        {"prompt": "hi", "temperature": 3.0},
        {"prompt": "hi", "max_tokens": 5000},
        {"prompt_token_ids": [300000]},
        {"prompt": "hi", "top_p": 0.0},
    ]
    with GRPCClient(server.grpc) as c:
        for case in cases:
            with pytest.raises(ServerError) as info:
                c.generate(**case)
            assert info.value.status == "INVALID_ARGUMENT" and info.value.message
            with pytest.raises(ServerError) as info:
                list(c.stream(**case))
            assert info.value.status == "INVALID_ARGUMENT"
        with pytest.raises(ServerError, match="4096.*5002"):
            c.generate(prompt="hi", max_tokens=5000)
        channel = grpc.insecure_channel(server.grpc)
        stub = llama4_ep_pb2_grpc.Llama4EPStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.Generate(llama4_ep_pb2.GenerateRequest(), metadata=(("application", APP_NAME),))  # no input
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        channel.close()
        assert c.generate(prompt="still serving", max_tokens=2).usage["completion_tokens"] >= 1


# -- metrics ----------------------------------------------------------------------------------


def test_metrics(server):
    httpx.post(
        f"{server.http}/v1/completions",
        json={"model": server.model, "prompt": "x", "max_tokens": 4},
        timeout=30,
    )
    bad = httpx.post(
        f"{server.http}/v1/completions", json={"model": server.model, "max_tokens": 4}, timeout=30
    )
    assert bad.status_code == 400  # counted below (no prompt)
    # the router service's balance figures reach the engine a load report after the steps they
    # count (the engine never waits for it): run steps until they are there
    for _ in range(20):
        httpx.post(
            f"{server.http}/v1/completions",
            json={"model": server.model, "prompt": "y", "max_tokens": 16, "ignore_eos": True},
            timeout=60,
        )
        samples = {}
        for family in text_string_to_metric_families(httpx.get(f"{server.http}/metrics").text):
            for s in family.samples:
                samples.setdefault(s.name, []).append(s)
        if "llama4_ep_expert_balancedness" in samples:
            break

    def total(name: str, **labels: str) -> float:
        return sum(s.value for s in samples[name] if all(s.labels.get(k) == v for k, v in labels.items()))

    assert total("llama4_ep_requests_total", status="200") > 0
    assert total("llama4_ep_requests_total", status="400") > 0
    assert total("llama4_ep_time_to_first_token_seconds_count") > 0
    assert total("llama4_ep_inter_token_latency_seconds_count") > 0
    assert total("llama4_ep_prompt_tokens_total") > 0 and total("llama4_ep_generation_tokens_total") > 0
    for gauge in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "engine_alive"):
        assert f"llama4_ep_{gauge}" in samples
    per_worker = {s.labels["expert_worker"]: s.value for s in samples["llama4_ep_expert_worker_tokens_total"]}
    assert set(per_worker) == {"0", "1"} and all(v > 0 for v in per_worker.values())
    layers = {s.labels["layer"]: s.value for s in samples["llama4_ep_expert_balancedness"]}
    assert set(layers) == {"all", "0", "1", "2", "3"} and all(0 < v <= 1 for v in layers.values())
    assert total("llama4_ep_placement_version") == 0 and total("llama4_ep_expert_replicas_max") == 1
    steps = {s.labels["le"]: s.value for s in samples["llama4_ep_engine_step_seconds_bucket"]}
    assert steps["+Inf"] >= 2  # the two requests' prefills at least
    assert list(steps.values()) == sorted(steps.values())  # cumulative buckets
    assert total("llama4_ep_engine_step_seconds_sum") > 0


def test_status_command_reads_the_server(server):
    host, port = server.http.removeprefix("http://").split(":")
    out = subprocess.run(
        [sys.executable, "-m", "cli.main", "status", "--host", host, "--port", port],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "engine replica" in out.stdout and "tokens per expert worker" in out.stdout
    assert "balancedness" in out.stdout and "placement v0" in out.stdout


def test_bench_serve_against_the_server(server, capsys):
    from bench.serve import main

    argv = ["--base-url", server.http, "--num-prompts", "6", "--input-len", "8", "--output-len", "4"]
    assert main([*argv, "--request-rate", "20", "--goodput", "ttft:60000"]) == 0
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert figures["completed"] == 6 and figures["failed"] == 0
    assert figures["total_output_tokens"] == 24 and figures["request_goodput"] > 0
    assert figures["mean_ttft_ms"] > 0 and figures["mean_tpot_ms"] > 0 and figures["p99_itl_ms"] > 0
    # from the server's engine_step_seconds over the run
    assert 0 < figures["mean_engine_step_ms"] < figures["mean_e2el_ms"]
    expected = figures["mean_itl_ms"] - figures["mean_engine_step_ms"]
    assert figures["itl_minus_step_ms"] == pytest.approx(expected, abs=0.01)
    # the ingress's own TTFT histogram: a first token reaches the client after the ingress saw it
    assert 0 < figures["mean_server_ttft_ms"] < figures["mean_ttft_ms"]
    expected = figures["mean_ttft_ms"] - figures["mean_server_ttft_ms"]
    assert figures["ttft_outside_server_ms"] == pytest.approx(expected, abs=0.01)


# -- a dead engine ----------------------------------------------------------------------------


def test_dead_engine_is_503_and_unavailable(server, tiny_maverick):
    """The ingress in front of an engine deployment whose step loop has stopped (a stand-in that
    answers as a dead `EngineServer` does)."""
    from ray import serve

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    class DeadEngine:
        async def generate(self, prompt_token_ids, params, request_id):
            yield EngineFailure("engine_dead", "the engine is not running (stopped for the test)")

        def is_alive(self) -> bool:
            return False

    app = IngressDeployment.bind(DeadEngine.bind(), IngressSpec(str(tiny_maverick), "dead-model"))
    serve.run(app, name="dead", route_prefix="/dead")
    try:
        r = httpx.get(f"{server.http}/dead/health")
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_unavailable"
        r = httpx.post(f"{server.http}/dead/v1/completions", json={"model": "dead-model", "prompt": "hi"})
        assert r.status_code == 503 and "not running" in r.json()["error"]["message"]
        with GRPCClient(server.grpc, application="dead") as c, pytest.raises(ServerError) as info:
            c.generate(prompt="hi")
        assert info.value.status == "UNAVAILABLE"
        assert httpx.get(f"{server.http}/health").status_code == 200  # the real one is unaffected
    finally:
        serve.delete("dead")


# -- overload and cancellation (last: they leave the engine busy for a moment) -----------------


def test_queue_full_is_429_and_resource_exhausted_then_serving_goes_on(server):
    body = {"model": server.model, "prompt": [200000, 9], "max_tokens": 2000, "stream": True, **IGNORE_EOS}
    started = 0

    async def long_stream(c: httpx.AsyncClient) -> None:
        nonlocal started
        async with c.stream("POST", "/v1/completions", json=body) as r:
            async for _ in r.aiter_lines():
                started += 1
                await asyncio.sleep(3600)  # hold the request open until cancelled

    async def main():
        async with httpx.AsyncClient(base_url=server.http, timeout=120) as c:
            tasks = [asyncio.create_task(long_stream(c)) for _ in range(MAX_PENDING)]
            for _ in range(600):
                if started >= MAX_PENDING:
                    break
                await asyncio.sleep(0.1)
            over = await c.post("/v1/completions", json={**body, "stream": False})
            with grpc.insecure_channel(server.grpc) as channel:
                stub = llama4_ep_pb2_grpc.Llama4EPStub(channel)
                request = llama4_ep_pb2.GenerateRequest(prompt="x", max_tokens=2)
                try:
                    await asyncio.to_thread(stub.Generate, request, metadata=(("application", APP_NAME),))
                    grpc_status, retry_s = "OK", None
                except grpc.RpcError as e:
                    grpc_status, retry_s = e.code().name, _retry_delay_s(e)
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            return over, grpc_status, retry_s

    over, grpc_status, retry_s = asyncio.run(main())
    assert over.status_code == 429 and over.json()["error"]["code"] == "queue_full"
    assert over.headers.get("retry-after") == "1"
    assert grpc_status == "RESOURCE_EXHAUSTED" and retry_s == 1  # google.rpc.RetryInfo
    wait_until_idle()
    r = httpx.post(
        f"{server.http}/v1/completions", json={"model": server.model, "prompt": "ok", "max_tokens": 3}
    )
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1


def _retry_delay_s(error: grpc.RpcError) -> int | None:
    status = rpc_status.from_call(error)
    for detail in status.details if status else ():
        info = error_details_pb2.RetryInfo()
        if detail.Unpack(info):
            return info.retry_delay.seconds
    return None


def wait_until_idle(timeout_s: float = 60.0) -> dict:
    """The engine's gauges once nothing runs, waits or holds a KV block; fails the test if that
    does not happen within `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        m = engine_metrics()
        if (m["num_running"], m["num_waiting"], m["kv_blocks_used"]) == (0, 0, 0):
            return m
        if time.monotonic() > deadline:
            pytest.fail(f"the engine is not idle after {timeout_s} s: {m}")
        time.sleep(0.2)


def test_cancelled_stream_frees_its_blocks(server):
    body = {
        "model": server.model,
        "prompt": list(range(1, 200)),
        "max_tokens": 2000,
        "stream": True,
        **IGNORE_EOS,
    }
    with (
        httpx.Client(base_url=server.http, timeout=60) as c,
        c.stream("POST", "/v1/completions", json=body) as r,
    ):
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        for _ in range(5):
            next(lines)
        busy = engine_metrics()
    assert busy["num_running"] == 1 and busy["kv_blocks_used"] > 0
    idle = wait_until_idle()
    assert (idle["num_running"], idle["kv_blocks_used"]) == (0, 0)
