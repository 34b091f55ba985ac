"""Resizing the tiers in place through Serve's own mechanism: the application deployed from a
config (what `serve deploy` and a KubeRay RayService do), then the same config with the
EngineServer deployment's user_config edited. Serve calls `reconfigure` on the running replica
(no restart); it resizes while streams run, and every stream ends with its tokens."""

from __future__ import annotations

import threading
import time
from collections import defaultdict

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from ray import serve
from ray.serve.context import _get_global_client
from ray.serve.schema import ServeDeploySchema

from engine.core import EngineConfig
from engine.llm_engine import LLMEngine
from engine.request import SamplingParams
from model.tokenizer import Tokenizer
from serving.app import ServeAppConfig
from serving.status import format_status
from tests.helpers import random_prompts

APP = "tiers"
ENGINE = {"num_kv_blocks": 256, "block_size": 16}
MAX_TOKENS = 40
PROMPTS = random_prompts([9, 20, 14, 31], seed=91)

pytestmark = pytest.mark.slow


def deploy(server, model: str, engine_user_config: dict | None = None) -> None:
    """Apply a Serve config with this one application, as `serve deploy` would (Serve's client is
    private API; the CLI needs the dashboard, which the tests do not run)."""
    port = int(server.http.rsplit(":", 1)[1])
    args = {
        "model": model,
        "attention_workers": 1,
        "expert_workers": 1,
        "engine": ENGINE,
        "cpus_per_worker": 0.1,
    }
    app = {"name": APP, "route_prefix": f"/{APP}", "import_path": "serving.app:build_app", "args": args}
    if engine_user_config is not None:
        app["deployments"] = [{"name": "EngineServer", "user_config": engine_user_config}]
    config = {"http_options": {"host": "127.0.0.1", "port": port}, "applications": [app]}
    _get_global_client().deploy_apps(ServeDeploySchema.model_validate(config), _blocking=True)


def engine_metrics() -> dict:
    return serve.get_deployment_handle("EngineServer", APP).metrics.remote().result()


def test_a_tiers_change_resizes_the_running_replica_in_place(server, tiny_maverick):
    deploy(server, str(tiny_maverick))
    try:
        tokenizer = Tokenizer(tiny_maverick)
        single = LLMEngine.from_checkpoint(tiny_maverick, EngineConfig(**ENGINE))
        done = single.generate(PROMPTS, SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True))
        expected = [tokenizer.decode_output(c.token_ids) for c in done]
        client = openai.OpenAI(base_url=f"{server.http}/{APP}/v1", api_key="unused", max_retries=0)
        before = engine_metrics()
        assert before["workers"] == {"attention": 1, "expert": 1}
        started = [threading.Event() for _ in PROMPTS]
        texts, errors = [""] * len(PROMPTS), []

        def stream(i: int) -> None:
            try:
                for chunk in client.completions.create(
                    model=tiny_maverick.name, prompt=PROMPTS[i], max_tokens=MAX_TOKENS, temperature=0,
                    stream=True, extra_body={"ignore_eos": True},
                ):  # fmt: skip
                    if chunk.choices and chunk.choices[0].text:
                        texts[i] += chunk.choices[0].text
                        started[i].set()
            except Exception as e:
                errors.append(repr(e))
            finally:
                started[i].set()

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(len(PROMPTS))]
        for t in threads:
            t.start()
        for event in started:
            assert event.wait(timeout=120)
        deploy(server, str(tiny_maverick), {"attention_workers": 2, "expert_workers": 2})
        deadline = time.monotonic() + 300
        # done when its seconds are recorded: the switch sets the new members first, then joins
        # them to the new epoch (Ray calls), and only then records the resize
        while (m := engine_metrics())["workers"] != {"attention": 2, "expert": 2} or not m["resize_seconds"]:
            assert time.monotonic() < deadline, m
            time.sleep(0.5)
        for t in threads:
            t.join(timeout=300)
        after = engine_metrics()
        assert not errors and texts == expected
        assert (
            after["replica"] == before["replica"] and after["num_steps"] > before["num_steps"]
        )  # not restarted
        assert after["workers_desired"] == {"attention": 2, "expert": 2} and len(after["resize_seconds"]) == 1
        metrics = httpx.get(f"{server.http}/{APP}/metrics").text
        samples = defaultdict(list)
        for family in text_string_to_metric_families(metrics):
            for sample in family.samples:
                samples[sample.name.removeprefix("llama4_ep_")].append((sample.labels, sample.value))
        desired = {lab["role"]: v for lab, v in samples["workers_desired"]}
        assert desired == {"attention": 2, "expert": 2}
        assert [v for _, v in samples["resize_seconds_count"]] == [1]
        assert "workers: attention 2, expert 2; 1 resize, " in format_status(samples)
    finally:
        serve.delete(APP)


def test_tiers_need_the_cluster_engine():
    with pytest.raises(ValueError, match="tiers need the cluster engine"):
        ServeAppConfig(expert_workers=0, tiers={"expert_workers": 2})
