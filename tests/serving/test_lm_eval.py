"""lm-eval's `local-completions` model against the live server, on a local three-question task:
its loglikelihoods (echo + logprobs requests) equal the engine's own prompt logprobs and
transformers' log-softmax over the same tokens."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.core import EngineConfig
from engine.llm_engine import LLMEngine
from engine.request import SamplingParams
from model.tokenizer import Tokenizer
from tests.helpers import hf_model

TASK_DIR = Path(__file__).parent / "lm_eval_task"


@pytest.mark.slow
def test_lm_eval_loglikelihoods_equal_the_engine_and_transformers(server, tiny_maverick, monkeypatch):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    results = lm_eval.simple_evaluate(
        model="local-completions",
        model_args={
            "model": server.model,
            "base_url": f"{server.http}/v1/completions",
            "tokenizer_backend": "remote",
            "num_concurrent": 1,
            "max_retries": 1,
        },
        tasks=["llama4ep_tiny"],
        task_manager=TaskManager(include_path=str(TASK_DIR)),
        log_samples=True,
    )
    samples = results["samples"]["llama4ep_tiny"]
    assert len(samples) == 3 and 0.0 <= results["results"]["llama4ep_tiny"]["acc,none"] <= 1.0
    tokenizer = Tokenizer(tiny_maverick)
    engine = LLMEngine.from_checkpoint(tiny_maverick, EngineConfig(num_kv_blocks=256, block_size=16))
    model = hf_model(tiny_maverick)
    for sample in samples:
        for (context, continuation), (loglikelihood, _) in zip(
            _pairs(sample), sample["filtered_resps"], strict=True
        ):
            ctx = tokenizer.encode(context, bos=False)
            ids = ctx + tokenizer.encode(context + continuation, bos=False)[len(ctx) :]  # lm-eval's split
            with torch.no_grad():
                ref = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
            from_hf = sum(float(ref[t - 1, ids[t]]) for t in range(len(ctx), len(ids)))
            from_engine = sum(e.logprob for e in engine_prompt_logprobs(engine, ids)[len(ctx) :])
            assert float(loglikelihood) == pytest.approx(from_hf, abs=1e-3)
            assert float(loglikelihood) == pytest.approx(from_engine, abs=1e-4)


def _pairs(sample: dict) -> list[tuple[str, str]]:
    """(context, continuation) of each choice, in either layout lm-eval logs them."""
    args = sample["arguments"]
    if isinstance(args, dict):
        return [(a["arg_0"], a["arg_1"]) for a in args.values()]
    return [tuple(a) for a in args]


def engine_prompt_logprobs(engine: LLMEngine, ids: list[int]) -> list:
    rid = engine.add(ids, SamplingParams(max_tokens=1, prompt_logprobs=0))
    entries = []
    while engine.has_unfinished:
        for out in engine.step():
            if out.request_id == rid:
                entries += out.prompt_logprobs
    return entries
