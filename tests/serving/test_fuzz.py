"""A bounded schemathesis run over /openapi.json finds no 5xx, and the server keeps serving.

The ingress under test is the real one; behind it stands a fast stand-in engine (one token per
request, logprobs when asked), so the fuzzer's valid requests with max_tokens in the thousands
do not turn into minutes of CPU decoding: what is fuzzed is the HTTP layer's validation."""

from __future__ import annotations

import shutil
import subprocess

import httpx
import pytest

from engine.core import RequestOutput
from engine.logits import TokenLogprob
from engine.request import FinishReason

MAX_EXAMPLES = 15  # fuzzed examples per operation, after the coverage phase
TIMEOUT_S = 420  # a busy machine: a request that waits past --request-timeout counts as an error


@pytest.mark.slow
def test_schemathesis_finds_no_server_error(server, tiny_maverick, tmp_path):
    from ray import serve

    from serving.app import IngressDeployment
    from serving.frontend import IngressSpec

    st = shutil.which("st") or shutil.which("schemathesis")
    if st is None:
        pytest.skip("schemathesis is not installed")

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    class OneTokenEngine:
        async def generate(self, prompt_token_ids, params, request_id):
            lp = (
                (TokenLogprob(5, -1.0, 1, ((5, -1.0),) * (params.logprobs or 0)),)
                if params.logprobs is not None
                else ()
            )
            prompt = ()
            if params.prompt_logprobs is not None:
                prompt = (None, *(TokenLogprob(t, -2.0, 3) for t in prompt_token_ids[1:]))
            n = len(prompt_token_ids)
            yield RequestOutput(request_id, (5,), True, FinishReason.LENGTH, n, 1, lp, prompt)

        def is_alive(self) -> bool:
            return True

        def metrics(self) -> dict:
            gauges = ("num_running", "num_waiting", "kv_blocks_used", "num_steps")
            return {"replica": "fuzz", "alive": True, "kv_blocks_total": 1, "expert_worker_tokens": [],
                    "balancing": {}, **dict.fromkeys(gauges, 0)}  # fmt: skip

    spec = IngressSpec(str(tiny_maverick), "fuzz-model")
    serve.run(IngressDeployment.bind(OneTokenEngine.bind(), spec), name="fuzz", route_prefix="/fuzz")
    base = f"{server.http}/fuzz"
    try:
        out = subprocess.run(
            [st, "run", f"{base}/openapi.json", "--url", base, "--checks", "not_a_server_error",
             "--max-examples", str(MAX_EXAMPLES), "--request-timeout", "120", "--generation-deterministic",
             # One worker: with two, schemathesis runs hypothesis in two threads, and CPython 3.11's
             # ast.parse (hypothesis describes its lambdas with it) is not thread-safe: "AST
             # constructor recursion depth mismatch", a failure of the fuzzer and not of the server.
             "--workers", "1", "--phases", "examples,coverage,fuzzing"],
            capture_output=True, text=True, timeout=TIMEOUT_S, cwd=tmp_path,
        )  # fmt: skip
        assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
        r = httpx.post(
            f"{base}/v1/completions", json={"model": "fuzz-model", "prompt": "still here"}, timeout=30
        )
        assert r.status_code == 200
    finally:
        serve.delete("fuzz")
