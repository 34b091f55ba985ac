"""Logprobs (against transformers), penalties, min_tokens, logit_bias and guided decoding in the step."""

from __future__ import annotations

import json

import pytest
import torch

from engine.core import EngineConfig
from engine.llm_engine import LLMEngine
from engine.logits import process, token_logprobs
from engine.request import Guided, Request, SamplingParams
from tests.helpers import hf_model, random_prompts


@pytest.fixture(scope="module")
def engine(tiny_maverick):
    # a small token budget: a 40-token prompt runs as three chunks, two of which sample nothing
    return LLMEngine.from_checkpoint(
        tiny_maverick, EngineConfig(num_kv_blocks=512, block_size=4, token_budget=16)
    )


def run(engine: LLMEngine, prompt: list[int], params: SamplingParams) -> tuple[list[int], list, list]:
    rid = engine.add(prompt, params)
    tokens, logprobs, prompt_logprobs = [], [], []
    while engine.has_unfinished:
        for out in engine.step():
            assert out.request_id == rid
            tokens += out.new_token_ids
            logprobs += out.logprobs
            prompt_logprobs += out.prompt_logprobs
    return tokens, logprobs, prompt_logprobs


def test_logprobs_equal_transformers_log_softmax(tiny_maverick, engine):
    prompt = random_prompts([40], seed=21)[0]
    params = SamplingParams(max_tokens=4, ignore_eos=True, logprobs=5, prompt_logprobs=3)
    tokens, logprobs, prompt_logprobs = run(engine, prompt, params)
    with torch.no_grad():
        ref = torch.log_softmax(
            hf_model(tiny_maverick)(torch.tensor([prompt + tokens])).logits[0].float(), -1
        )
    assert len(logprobs) == len(tokens) == 4 and len(prompt_logprobs) == len(prompt)
    assert prompt_logprobs[0] is None
    for t, entry in enumerate(prompt_logprobs[1:], start=1):
        assert entry.token_id == prompt[t]
        assert entry.logprob == pytest.approx(float(ref[t - 1, prompt[t]]), abs=1e-4)
        assert [i for i, _ in entry.top] == ref[t - 1].topk(3).indices.tolist()
    for j, entry in enumerate(logprobs):
        row = ref[len(prompt) - 1 + j]
        assert entry.token_id == tokens[j] == int(row.argmax()) and entry.rank == 1
        assert entry.logprob == pytest.approx(float(row.max()), abs=1e-4)
        assert len(entry.top) == 5
        for (i, lp), ref_i in zip(entry.top, row.topk(5).indices.tolist(), strict=True):
            assert i == ref_i and lp == pytest.approx(float(row[i]), abs=1e-4)


def test_logprobs_do_not_change_seeded_draws(engine):
    prompt = random_prompts([7], seed=3)[0]
    base = SamplingParams(max_tokens=8, temperature=1.0, seed=5, ignore_eos=True)
    with_lp = SamplingParams(max_tokens=8, temperature=1.0, seed=5, ignore_eos=True, logprobs=2)
    assert run(engine, prompt, base)[0] == run(engine, prompt, with_lp)[0]


def test_processors_one_row_at_a_time():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, 0.0]])
    request = Request("r", [0, 1], SamplingParams(max_tokens=4, repetition_penalty=2.0, stop_token_ids=(4,)))
    request.output_token_ids = [3, 3]
    out = process(logits, [request])
    assert out.tolist() == [[1.0, -2.0, 0.5, 1.5, 0.0]]  # positive halved, negative doubled
    request = Request("r", [0], SamplingParams(max_tokens=4, presence_penalty=0.5, frequency_penalty=1.0))
    request.output_token_ids = [3, 3, 2]
    assert process(logits, [request]).tolist() == [[2.0, -1.0, -1.0, 0.5, 0.0]]
    request = Request(
        "r", [0], SamplingParams(max_tokens=4, logit_bias=((1, 10.0),), min_tokens=1, stop_token_ids=(4,))
    )
    assert process(logits, [request]).tolist() == [[2.0, 9.0, 0.5, 3.0, float("-inf")]]
    assert process(logits, [Request("r", [0])]) is logits  # nothing to do: no copy


def test_token_logprobs_rank_and_top():
    logits = torch.tensor([[1.0, 3.0, 2.0]])
    (entry,) = token_logprobs(logits, [2], [2])
    ref = torch.log_softmax(logits[0], -1)
    assert entry.rank == 2 and entry.logprob == pytest.approx(float(ref[2]))
    assert [i for i, _ in entry.top] == [1, 2]


def test_min_tokens_logit_bias_and_penalties_in_the_engine(engine):
    prompt = random_prompts([6], seed=9)[0]
    greedy, _, _ = run(engine, prompt, SamplingParams(max_tokens=6, ignore_eos=True))
    stop = greedy[0]  # make the greedy first token a stop token: min_tokens must hold it back
    held, _, _ = run(engine, prompt, SamplingParams(max_tokens=6, stop_token_ids=(stop,), min_tokens=3))
    assert stop not in held[:3] and len(held) >= 3
    stopped, _, _ = run(engine, prompt, SamplingParams(max_tokens=6, stop_token_ids=(stop,)))
    assert stopped == [stop]
    biased, _, _ = run(
        engine, prompt, SamplingParams(max_tokens=3, ignore_eos=True, logit_bias=((777, 100.0),))
    )
    assert biased == [777, 777, 777]
    repeated, _, _ = run(
        engine, prompt, SamplingParams(max_tokens=3, ignore_eos=True, logit_bias=((777, 30.0),))
    )
    penalized, _, _ = run(
        engine,
        prompt,
        SamplingParams(
            max_tokens=3,
            ignore_eos=True,
            logit_bias=((777, 30.0),),
            presence_penalty=2.0,
            frequency_penalty=2.0,
            repetition_penalty=2.0,
        ),
    )
    assert repeated == [777, 777, 777] and penalized.count(777) < 3


@pytest.mark.parametrize(
    ("guided", "check"),
    [
        (
            Guided(
                "json_schema",
                json.dumps(
                    {
                        "type": "object",
                        "properties": {
                            "city": {"enum": ["Paris", "Rome"]},
                            "n": {"type": "integer", "minimum": 0, "maximum": 9},
                        },
                        "required": ["city", "n"],
                        "additionalProperties": False,
                    }
                ),
            ),
            lambda text: set(json.loads(text)) == {"city", "n"},
        ),
        (
            Guided("regex", "[ab]{4}c"),
            lambda text: len(text) == 5 and set(text[:4]) <= {"a", "b"} and text[4] == "c",
        ),
        (Guided("choice", json.dumps(["yes", "no", "maybe"])), lambda text: text in ("yes", "no", "maybe")),
    ],
)
def test_guided_output_follows_the_grammar(engine, guided, check):
    prompt = random_prompts([5], seed=1)[0]
    params = SamplingParams(max_tokens=40, temperature=1.0, seed=11, guided=guided)
    tokens, _, _ = run(engine, prompt, params)
    text = engine.core.tokenizer.decode_output(tokens)
    assert tokens[-1] in params.stop_token_ids, text  # the grammar finished, then a stop token
    assert check(text), text


def test_bad_grammar_is_a_value_error(engine):
    with pytest.raises(ValueError, match="regex"):
        engine.add([1, 2], SamplingParams(guided=Guided("regex", "(unclosed")))
    assert not engine.has_unfinished
