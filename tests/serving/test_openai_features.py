"""What vLLM/OpenAI clients expect of the live server: logprobs (against transformers), echo, n,
batches, best_of, penalties and logit_bias, stop_token_ids, structured output, tool calls,
ignored fields, /tokenize, /detokenize, /v1/models/{id}, x-request-id, /openapi.json, API keys,
CORS, and the gRPC conventions (health, reflection, deadlines, rich errors, logprobs, n).

The application at "/" runs the cluster engine (1 attention + 2 expert workers), so every
feature here also crosses the attention worker -> driver boundary.
"""

from __future__ import annotations

import json
import time

import grpc
import httpx
import jsonschema
import openai
import pytest
import torch
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status

from engine.core import EngineConfig
from engine.llm_engine import LLMEngine
from engine.request import SamplingParams
from model.tokenizer import Tokenizer
from serving import APP_NAME
from serving.client import GRPCClient, ServerError
from serving.proto_gen import llama4_ep_pb2 as pb
from serving.proto_gen import llama4_ep_pb2_grpc
from tests.helpers import hf_model, random_prompts
from tests.serving.conftest import API_KEY, ENGINE, ORIGIN

META = (("application", APP_NAME),)


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.http}/v1", api_key="unused", max_retries=0)


def hf_logprobs(model_dir, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(hf_model(model_dir)(torch.tensor([ids])).logits[0].float(), -1)


# -- logprobs ---------------------------------------------------------------------------------


def test_echo_logprobs_equal_transformers(server, client, tiny_maverick):
    """What lm-eval's loglikelihood requests send: echo, logprobs=1, max_tokens=1."""
    prompt = random_prompts([12], seed=31)[0]
    args = {"model": server.model, "prompt": prompt, "max_tokens": 3, "temperature": 0, "logprobs": 2}
    whole = client.completions.create(**args, echo=True, extra_body={"ignore_eos": True})
    lp = whole.choices[0].logprobs
    assert len(lp.token_logprobs) == len(prompt) + 3 and lp.token_logprobs[0] is None
    ref = hf_logprobs(tiny_maverick, prompt)
    for t in range(1, len(prompt)):
        assert lp.token_logprobs[t] == pytest.approx(float(ref[t - 1, prompt[t]]), abs=1e-3)
        assert max(lp.top_logprobs[t].values()) == pytest.approx(float(ref[t - 1].max()), abs=1e-3)
    # the first generated token is the greedy one: its logprob is the row's maximum
    assert lp.token_logprobs[len(prompt)] == pytest.approx(float(ref[-1].max()), abs=1e-3)
    streamed = client.completions.create(**args, echo=True, stream=True, extra_body={"ignore_eos": True})
    chunks = [c.choices[0] for c in streamed if c.choices]
    assert "".join(c.text for c in chunks) == whole.choices[0].text
    stream_lps = [x for c in chunks if c.logprobs for x in c.logprobs.token_logprobs]
    assert stream_lps == pytest.approx(lp.token_logprobs)


def test_chat_logprobs_streamed_equal_whole(server, client):
    args = {
        "model": server.model, "messages": [{"role": "user", "content": "Count to three."}],
        "max_tokens": 5, "temperature": 0, "logprobs": True, "top_logprobs": 3,
        "extra_body": {"ignore_eos": True},
    }  # fmt: skip
    whole = client.chat.completions.create(**args)
    content = whole.choices[0].logprobs.content
    assert len(content) == 5 and all(len(c.top_logprobs) == 3 for c in content)
    assert all(c.logprob == pytest.approx(c.top_logprobs[0].logprob) for c in content)  # greedy: rank 1
    assert "".join(c.token for c in content) == whole.choices[0].message.content
    streamed = [c for c in client.chat.completions.create(**args, stream=True) if c.choices]
    lps = [x.logprob for c in streamed if c.choices[0].logprobs for x in c.choices[0].logprobs.content]
    assert lps == pytest.approx([c.logprob for c in content])


# -- n, batches, best_of, sampling controls --------------------------------------------------


def test_n_and_batched_prompts(server, client):
    prompts = random_prompts([5, 8], seed=32)
    args = {"model": server.model, "max_tokens": 4, "extra_body": {"ignore_eos": True}}
    greedy = client.completions.create(prompt=prompts, n=2, temperature=0, **args)
    assert sorted(c.index for c in greedy.choices) == [0, 1, 2, 3]
    by_index = {c.index: c.text for c in greedy.choices}
    alone = [client.completions.create(prompt=p, temperature=0, **args).choices[0].text for p in prompts]
    assert [by_index[0], by_index[1], by_index[2], by_index[3]] == [alone[0], alone[0], alone[1], alone[1]]
    assert greedy.usage.prompt_tokens == 13 and greedy.usage.completion_tokens == 16
    sampled = client.completions.create(prompt=prompts[0], n=3, temperature=1.0, seed=7, **args)
    again = client.completions.create(prompt=prompts[0], n=3, temperature=1.0, seed=7, **args)
    texts = [c.text for c in sorted(sampled.choices, key=lambda c: c.index)]
    assert texts == [c.text for c in sorted(again.choices, key=lambda c: c.index)]
    assert len(set(texts)) > 1  # each choice draws with its own seed
    chunks = client.completions.create(prompt=prompts[0], n=3, temperature=1.0, seed=7, stream=True, **args)
    streamed = {}
    for c in chunks:
        for choice in c.choices:
            streamed[choice.index] = streamed.get(choice.index, "") + choice.text
    assert [streamed[i] for i in range(3)] == texts
    best = client.completions.create(prompt=prompts[0], n=1, best_of=3, temperature=1.0, seed=7, **args)
    assert len(best.choices) == 1 and best.choices[0].text in texts and best.choices[0].logprobs is None


def test_logit_bias_penalties_min_tokens_and_stop_token_ids(server, client, tiny_maverick):
    prompt = random_prompts([6], seed=33)[0]
    args = {"model": server.model, "prompt": prompt, "temperature": 0}
    first = client.completions.create(**args, max_tokens=1, logprobs=0, extra_body={"ignore_eos": True})
    tokenize = {"prompt": first.choices[0].text, "add_special_tokens": False}
    first_id = httpx.post(f"{server.http}/tokenize", json=tokenize).json()["tokens"]
    biased = client.completions.create(
        **args, max_tokens=3, logit_bias={"777": 100}, extra_body={"ignore_eos": True}
    )
    text_777 = httpx.post(f"{server.http}/detokenize", json={"tokens": [777] * 3}).json()["prompt"]
    assert biased.choices[0].text == text_777
    # the penalties reach the engine as given: the server's tokens are the engine's own
    penalized = client.completions.create(
        **args, max_tokens=6, presence_penalty=1.5, frequency_penalty=0.5, logit_bias={"777": 8, "5": -3},
        extra_body={"ignore_eos": True, "repetition_penalty": 1.7, "min_tokens": 2},
    )  # fmt: skip
    params = SamplingParams(
        max_tokens=6, presence_penalty=1.5, frequency_penalty=0.5, repetition_penalty=1.7, min_tokens=2,
        logit_bias=((777, 8.0), (5, -3.0)), ignore_eos=True,
    )  # fmt: skip
    (done,) = LLMEngine.from_checkpoint(tiny_maverick, EngineConfig(**ENGINE)).generate([prompt], params)
    assert penalized.choices[0].text == Tokenizer(tiny_maverick).decode_output(done.token_ids)
    if len(first_id) == 1:  # the greedy first token as a stop token id: nothing comes out
        stopped = client.completions.create(**args, max_tokens=4, extra_body={"stop_token_ids": first_id})
        assert stopped.choices[0].finish_reason == "stop" and stopped.choices[0].text == ""
        held = client.completions.create(
            **args, max_tokens=4, extra_body={"stop_token_ids": first_id, "min_tokens": 2}
        )
        assert held.usage.completion_tokens >= 2


# -- structured output and tools -------------------------------------------------------------

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"enum": ["Paris", "Rome", "Oslo"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 9},
    },
    "required": ["city", "days"],
    "additionalProperties": False,
}


@pytest.mark.parametrize("stream", [False, True])
def test_json_schema_output_validates(server, client, stream):
    args = {
        "model": server.model, "messages": [{"role": "user", "content": "Plan a trip."}], "max_tokens": 40,
        "temperature": 1.0, "seed": 3,
        "response_format": {"type": "json_schema", "json_schema": {"name": "trip", "schema": SCHEMA}},
    }  # fmt: skip
    if stream:
        text = "".join(
            c.choices[0].delta.content or ""
            for c in client.chat.completions.create(**args, stream=True)
            if c.choices
        )
    else:
        text = client.chat.completions.create(**args).choices[0].message.content
    jsonschema.validate(json.loads(text), SCHEMA)


TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "Weather in a city", "parameters": SCHEMA},
    }
]


@pytest.mark.parametrize("stream", [False, True])
def test_tool_call_round_trip(server, client, stream):
    messages = [{"role": "user", "content": "What is the weather in Rome?"}]
    args = {"model": server.model, "max_tokens": 40, "temperature": 1.0, "seed": 5, "tools": TOOLS}
    forced = {"type": "function", "function": {"name": "get_weather"}}
    if stream:
        calls, reason = {}, None
        for c in client.chat.completions.create(messages=messages, tool_choice=forced, stream=True, **args):
            for tc in (c.choices[0].delta.tool_calls or []) if c.choices else []:
                calls[tc.index] = tc
            reason = (c.choices[0].finish_reason if c.choices else None) or reason
        (call,) = calls.values()
    else:
        reply = client.chat.completions.create(messages=messages, tool_choice=forced, **args)
        (call,) = reply.choices[0].message.tool_calls
        reason = reply.choices[0].finish_reason
    assert reason == "tool_calls" and call.function.name == "get_weather" and call.id
    jsonschema.validate(json.loads(call.function.arguments), SCHEMA)
    messages += [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": call.id, "type": "function", "function": call.function.model_dump()}],
        },
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature_c": 21}'},
    ]  # fmt: skip
    answer = client.chat.completions.create(
        messages=messages, tool_choice="none", **{**args, "max_tokens": 5}
    )
    assert answer.choices[0].message.content and not answer.choices[0].message.tool_calls
    ids = httpx.post(f"{server.http}/tokenize", json={"messages": messages}).json()["tokens"]
    text = httpx.post(f"{server.http}/detokenize", json={"tokens": ids}).json()["prompt"]
    assert (
        "[get_weather(city=" in text
        and '<|header_start|>ipython<|header_end|>\n\n{"temperature_c": 21}<|eom|>' in text
    )


def test_tool_choice_required_and_auto(server, client):
    args = {"model": server.model, "messages": [{"role": "user", "content": "Weather?"}], "max_tokens": 60,
            "temperature": 1.0, "seed": 9, "tools": TOOLS}  # fmt: skip
    required = client.chat.completions.create(tool_choice="required", **args).choices[0]
    assert (
        required.finish_reason == "tool_calls"
        and required.message.tool_calls[0].function.name == "get_weather"
    )
    auto = client.chat.completions.create(tool_choice="auto", **{**args, "max_tokens": 4}).choices[0]
    assert auto.message.content is not None or auto.message.tool_calls  # random weights: text, most likely


# -- lenient requests, endpoints -------------------------------------------------------------


def test_sdk_style_request_full_of_ignored_fields(server):
    body = {
        "model": server.model,
        "messages": [
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": "hi", "name": "u"},
        ],
        "max_tokens": 2, "tools": [], "logit_bias": None, "parallel_tool_calls": True, "top_logprobs": None,
        "stop": None, "seed": None, "n": None, "store": False, "metadata": {"k": "v"}, "service_tier": "auto",
        "reasoning_effort": "low", "modalities": ["text"], "audio": None, "prediction": None,
        "web_search_options": {},
    }  # fmt: skip
    r = httpx.post(f"{server.http}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] >= 1


def test_tokenize_detokenize_models_request_id_openapi(server):
    with httpx.Client(base_url=server.http, timeout=30) as c:
        tokens = c.post("/tokenize", json={"model": server.model, "prompt": "Hello world"}).json()
        assert tokens["tokens"][0] == 200000 and tokens["count"] == len(tokens["tokens"])
        assert c.post("/detokenize", json={"tokens": tokens["tokens"][1:]}).json() == {
            "prompt": "Hello world"
        }
        assert c.post("/detokenize", json={"tokens": [300000]}).status_code == 400
        assert c.get(f"/v1/models/{server.model}").json()["id"] == server.model
        missing = c.get("/v1/models/gpt-4")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
        r = c.post(
            "/v1/completions",
            json={"model": server.model, "prompt": "x", "max_tokens": 1},
            headers={"x-request-id": "my-id-42"},
        )
        assert r.headers["x-request-id"] == "my-id-42"
        assert c.get("/v1/models").headers["x-request-id"]  # Serve's proxy made one
        doc = c.get("/openapi.json").json()
        assert doc["openapi"].startswith("3.1") and "/v1/chat/completions" in doc["paths"]
        assert "ChatCompletionRequest" in doc["components"]["schemas"]


# -- auth and CORS -----------------------------------------------------------------------------


def test_api_key_and_cors(secure_server):
    base, body = secure_server.http, {"model": secure_server.model, "prompt": "hi", "max_tokens": 1}
    with httpx.Client(base_url=base, timeout=60) as c:
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": API_KEY}):
            r = c.post("/v1/completions", json=body, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        good = {"authorization": f"Bearer {API_KEY}"}
        assert c.post("/v1/completions", json=body, headers=good).status_code == 200
        assert c.get("/health").status_code == 200  # probes need no key
        strict = c.post("/v1/completions", json={**body, "frobnicate": 1}, headers=good)
        assert strict.status_code == 400 and strict.json()["error"]["param"] == "frobnicate"
        preflight = {"origin": ORIGIN, "access-control-request-method": "POST"}
        r = c.options("/v1/completions", headers=preflight)
        assert r.status_code == 204 and r.headers["access-control-allow-origin"] == ORIGIN
        assert "authorization" in r.headers["access-control-allow-headers"].lower()
        r = c.options("/v1/completions", headers={**preflight, "origin": "https://evil.example"})
        assert r.status_code == 405 and "access-control-allow-origin" not in r.headers
    meta = (("application", "secure"),)
    with grpc.insecure_channel(secure_server.grpc) as channel:
        stub = llama4_ep_pb2_grpc.Llama4EPStub(channel)
        request = pb.GenerateRequest(prompt="hi", max_tokens=1)
        with pytest.raises(grpc.RpcError) as info:
            stub.Generate(request, metadata=meta)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as info:
            stub.Generate(request, metadata=(*meta, ("authorization", "Bearer nope")))
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        reply = stub.Generate(request, metadata=(*meta, ("authorization", f"Bearer {API_KEY}")))
        assert reply.usage.completion_tokens == 1


# -- gRPC --------------------------------------------------------------------------------------


def test_grpc_health_and_reflection(server):
    with grpc.insecure_channel(server.grpc) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        assert (
            health.Check(health_pb2.HealthCheckRequest(), metadata=META).status
            == health_pb2.HealthCheckResponse.SERVING
        )
        named = health.Check(health_pb2.HealthCheckRequest(service="llama4_ep.Llama4EP"), metadata=META)
        assert named.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as info:
            health.Check(health_pb2.HealthCheckRequest(service="nope"), metadata=META)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        (reply,) = reflection.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        services = {s.name for s in reply.list_services_response.service}
        assert {"llama4_ep.Llama4EP", "grpc.health.v1.Health"} <= services
        (reply,) = reflection.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(file_containing_symbol="llama4_ep.Llama4EP")])
        )
        assert reply.file_descriptor_response.file_descriptor_proto  # grpcurl can build requests from it


def test_grpc_logprobs_n_and_penalties(server, client):
    prompt = random_prompts([7], seed=34)[0]
    with grpc.insecure_channel(server.grpc) as channel:
        stub = llama4_ep_pb2_grpc.Llama4EPStub(channel)
        request = pb.GenerateRequest(max_tokens=3, logprobs=2, n=2, ignore_eos=True, presence_penalty=0.5)
        request.prompt_token_ids.ids.extend(prompt)
        reply = stub.Generate(request, metadata=META)
        stream = list(stub.GenerateStream(request, metadata=META))
    assert len(reply.choices) == 2 and reply.usage.completion_tokens == 6
    assert [lp.token_id for lp in reply.logprobs] == list(reply.token_ids)
    assert all(len(lp.top) == 2 and lp.rank >= 1 for lp in reply.logprobs)
    http = client.completions.create(
        model=server.model, prompt=prompt, max_tokens=3, temperature=0, logprobs=2,
        presence_penalty=0.5, extra_body={"ignore_eos": True},
    )  # fmt: skip
    assert [lp.logprob for lp in reply.logprobs] == pytest.approx(
        http.choices[0].logprobs.token_logprobs, abs=1e-5
    )
    assert stream[-1].finish.finish_reasons == ["length", "length"]
    assert {m.delta.index for m in stream if m.HasField("delta")} == {0, 1}


def test_grpc_bad_request_has_bad_request_details(server):
    with grpc.insecure_channel(server.grpc) as channel:
        stub = llama4_ep_pb2_grpc.Llama4EPStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.Generate(pb.GenerateRequest(prompt="hi", temperature=3.0), metadata=META)
    status = rpc_status.from_call(info.value)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and status is not None
    bad = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(bad) and bad.field_violations[0].field == "temperature"


def test_grpc_deadline_aborts_the_request_and_frees_its_blocks(server):
    from tests.serving.test_serve_app import engine_metrics, wait_until_idle

    request = pb.GenerateRequest(max_tokens=3000, ignore_eos=True)
    request.prompt_token_ids.ids.extend([200000, 5, 6])
    with grpc.insecure_channel(server.grpc) as channel:
        stub = llama4_ep_pb2_grpc.Llama4EPStub(channel)
        start = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            stub.Generate(request, metadata=META, timeout=2.0)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and time.monotonic() - start < 10
    assert engine_metrics()["num_steps"] > 0
    wait_until_idle()  # aborted: nothing runs and no block is held


def test_grpc_health_not_serving_when_the_engine_is_dead(server, tiny_maverick):
    from ray import serve

    from serving.app import IngressDeployment
    from serving.frontend import IngressSpec

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    class DeadEngine:
        def is_alive(self) -> bool:
            return False

    serve.run(
        IngressDeployment.bind(DeadEngine.bind(), IngressSpec(str(tiny_maverick), "dead")),
        name="dead-health",
        route_prefix="/dead-health",
    )
    try:
        with grpc.insecure_channel(server.grpc) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), metadata=(("application", "dead-health"),)
            )
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
        with GRPCClient(server.grpc) as c:  # the live application still serves
            assert c.generate(prompt="ok", max_tokens=1).usage["completion_tokens"] == 1
    finally:
        serve.delete("dead-health")


def test_grpc_client_error_is_readable(server):
    with GRPCClient(server.grpc) as c, pytest.raises(ServerError) as info:
        c.generate(prompt="hi", top_p=0.0)
    assert info.value.status == "INVALID_ARGUMENT" and "top_p" in info.value.message
