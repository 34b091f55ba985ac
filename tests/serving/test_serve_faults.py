"""Faults through the Serve application, as clients see them: an expert worker killed while 8
completions stream (the official `openai` client); every stream ends with all its tokens, the
same text as a fault-free run. A prompt too long for the KV cache gets one 400; the others are
unaffected. Its own application on the session's Serve instance, at /faults: 2 attention + 3
expert workers with a redundant slot each."""

from __future__ import annotations

import os
import signal
import threading

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from ray import serve

from engine.core import EngineConfig
from engine.llm_engine import LLMEngine
from engine.request import SamplingParams
from model.tokenizer import Tokenizer
from serving.app import ServeAppConfig, build_app
from tests.helpers import random_prompts

ENGINE = {"num_kv_blocks": 256, "block_size": 16}
MAX_TOKENS = 24
PROMPTS = random_prompts([9, 20, 14, 31, 6, 17, 25, 11], seed=61)

APP = "faults"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def base_url(server, tiny_maverick):
    config = ServeAppConfig(
        model=str(tiny_maverick),
        attention_workers=2,
        expert_workers=3,
        redundant_slots=1,
        engine=ENGINE,
        cpus_per_worker=0.1,
    )
    serve.run(build_app(config), name=APP, route_prefix=f"/{APP}")
    try:
        yield f"{server.http}/{APP}"
    finally:
        serve.delete(APP)


def test_an_expert_worker_killed_while_eight_streams_run(base_url, tiny_maverick):
    engine = LLMEngine.from_checkpoint(tiny_maverick, EngineConfig(**ENGINE))
    tokenizer = Tokenizer(tiny_maverick)
    expected = [
        tokenizer.decode_output(c.token_ids)
        for c in engine.generate(PROMPTS, SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True))
    ]
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)
    model = client.models.list().data[0].id
    started = [threading.Event() for _ in PROMPTS]
    texts, usage, errors = [""] * len(PROMPTS), [None] * len(PROMPTS), []

    def stream(i: int) -> None:
        try:
            chunks = client.completions.create(
                model=model, prompt=PROMPTS[i], max_tokens=MAX_TOKENS, temperature=0, stream=True,
                stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
            )  # fmt: skip
            for chunk in chunks:
                if chunk.choices and chunk.choices[0].text:
                    texts[i] += chunk.choices[0].text
                    started[i].set()
                if chunk.usage:
                    usage[i] = chunk.usage.completion_tokens
        except Exception as e:  # the assertion below shows it
            errors.append(f"stream {i}: {e!r}")
        finally:
            started[i].set()

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for event in started:  # every stream has text: the kill lands mid-stream for all of them
        assert event.wait(timeout=120)
    pids = serve.get_deployment_handle("EngineServer", APP).worker_pids.remote().result()
    os.kill(pids["expert"][1], signal.SIGKILL)
    for t in threads:
        t.join(timeout=180)
    assert not errors
    assert usage == [MAX_TOKENS] * len(PROMPTS)
    assert texts == expected
    samples = {
        (s.name, s.labels.get("role")): s.value
        for family in text_string_to_metric_families(httpx.get(f"{base_url}/metrics").text)
        for s in family.samples
    }
    assert samples[("llama4_ep_worker_failures_total", "expert")] == 1
    assert samples[("llama4_ep_recovery_seconds_count", None)] == 1
    assert samples[("llama4_ep_workers", "expert")] == 2
    assert httpx.get(f"{base_url}/health").status_code == 200


def test_a_prompt_too_long_for_the_kv_cache_is_a_400_and_others_stream_on(base_url):
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)
    model = client.models.list().data[0].id
    with pytest.raises(openai.BadRequestError, match=r"needs up to \d+ KV blocks") as info:
        client.completions.create(model=model, prompt=list(range(1, 3001)), max_tokens=8)
    assert "Traceback" not in str(info.value) and "/" not in info.value.body["message"].split("blocks")[0]
    ok = client.completions.create(
        model=model, prompt=PROMPTS[0], max_tokens=8, temperature=0, extra_body={"ignore_eos": True}
    )
    assert ok.usage.completion_tokens == 8
