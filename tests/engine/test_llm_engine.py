"""The single-process engine: greedy equals transformers' generate; sampling, stops, preemption."""

from __future__ import annotations

import pytest
import torch

from attention.threads import FixedThreads, MeasuredThreads
from engine.core import EngineConfig
from engine.detokenizer import IncrementalDetokenizer
from engine.llm_engine import LLMEngine
from engine.protocol import Engine
from engine.request import FinishReason, Request, SamplingParams
from tests.helpers import hf_greedy, random_prompts

GREEDY_32 = SamplingParams(max_tokens=32, ignore_eos=True)


@pytest.fixture(scope="module")
def engines(tiny_maverick, tiny_scout):
    cfg = EngineConfig(num_kv_blocks=1024, block_size=4, token_budget=40)
    return {p: LLMEngine.from_checkpoint(p, cfg) for p in (tiny_maverick, tiny_scout)}


def test_greedy_32_tokens_equal_transformers_generate(tiny_checkpoint, engines):
    prompts = random_prompts([37, 5, 21], seed=11)
    results = engines[tiny_checkpoint].generate(prompts, GREEDY_32)  # one batch, chunked prefill
    for prompt, result in zip(prompts, results, strict=True):
        expected, gap = hf_greedy(tiny_checkpoint, prompt, 32)
        assert gap > 2e-4, "the reference has a near-tie (rounding decides it); pick another prompt"
        assert result.token_ids == expected
        assert result.finish_reason is FinishReason.LENGTH


@pytest.mark.parametrize("parallel_min_tokens", [1, "auto"])
def test_layer_threads_keep_the_greedy_tokens(tiny_maverick, parallel_min_tokens):
    """1: every step's layers on all of torch's threads (here 2); auto: one or two as measured,
    step by step while it measures. The tokens are transformers' either way."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        cfg = EngineConfig(
            num_kv_blocks=1024, block_size=4, token_budget=40, parallel_min_tokens=parallel_min_tokens
        )
        engine = LLMEngine.from_checkpoint(tiny_maverick, cfg)
        assert engine.core.decoder.parallel_min_tokens == parallel_min_tokens
        prompts = random_prompts([37, 5], seed=11)
        for prompt, result in zip(prompts, engine.generate(prompts, GREEDY_32), strict=True):
            assert result.token_ids == hf_greedy(tiny_maverick, prompt, 32)[0]
        policy = engine.core.decoder.thread_policy
        if parallel_min_tokens == "auto":  # 31 decode steps of 2 tokens: measured, then chosen
            assert isinstance(policy, MeasuredThreads) and policy.chosen()[2] in (1, 2)
        else:
            assert isinstance(policy, FixedThreads) and policy.threads(1) == 2
        assert engine.metrics()["layer_threads"] == {0: policy.chosen()}  # the /metrics gauge's source
    finally:
        torch.set_num_threads(before)
    for bad in (0, "fast"):
        with pytest.raises(ValueError, match='parallel_min_tokens must be "auto" or a whole number >= 1'):
            EngineConfig(parallel_min_tokens=bad)


def test_requests_arriving_while_others_decode(tiny_maverick, engines):
    engine = engines[tiny_maverick]
    prompts = random_prompts([12, 30, 7], seed=2)
    alone = [engine.generate([p], GREEDY_32)[0].token_ids for p in prompts]
    outputs: dict[str, list[int]] = {}
    ids = [engine.add(prompts[0], GREEDY_32)]
    for step in range(200):
        if step in (3, 9):
            ids.append(engine.add(prompts[len(ids)], GREEDY_32))
        for out in engine.step():
            outputs.setdefault(out.request_id, []).extend(out.new_token_ids)
        if len(ids) == 3 and not engine.core.has_unfinished:
            break
    assert [outputs[i] for i in ids] == alone


def test_preemption_recomputes_and_loses_nothing(tiny_maverick):
    # 8 layers x blocks of 4: three ~60-token sequences need about 145 blocks at the end
    engine = LLMEngine.from_checkpoint(
        tiny_maverick, EngineConfig(num_kv_blocks=110, block_size=4, token_budget=64)
    )
    prompts = random_prompts([20, 24, 16], seed=4)
    roomy = LLMEngine.from_checkpoint(tiny_maverick, EngineConfig(num_kv_blocks=2048, block_size=4))
    expected = [r.token_ids for r in roomy.generate(prompts, SamplingParams(max_tokens=40, ignore_eos=True))]
    results = engine.generate(prompts, SamplingParams(max_tokens=40, ignore_eos=True))
    assert engine.core.scheduler.num_preemptions >= 1  # the pool ran dry and a request recomputed
    assert [r.token_ids for r in results] == expected
    assert engine.core.kv.usage().blocks_used == 0
    assert roomy.core.scheduler.num_preemptions == 0


def test_seeded_sampling_is_reproducible_and_batch_independent(tiny_maverick, engines):
    engine = engines[tiny_maverick]
    params = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.9, top_k=50, seed=1234, ignore_eos=True)
    prompt = random_prompts([9], seed=6)[0]
    alone = engine.generate([prompt], params)[0].token_ids
    batched = engine.generate([prompt] + random_prompts([14, 3], seed=7), params)[0].token_ids
    other_seed = engine.generate(
        [prompt], SamplingParams(max_tokens=16, temperature=0.9, seed=99, ignore_eos=True)
    )[0].token_ids
    assert alone == batched
    assert alone != other_seed


def test_top_k_one_is_greedy(tiny_maverick, engines):
    engine = engines[tiny_maverick]
    prompt = random_prompts([9], seed=8)[0]
    greedy = engine.generate([prompt], SamplingParams(max_tokens=8, ignore_eos=True))[0].token_ids
    top1 = engine.generate(
        [prompt], SamplingParams(max_tokens=8, temperature=1.5, top_k=1, seed=0, ignore_eos=True)
    )[0].token_ids
    assert top1 == greedy


def test_stop_token_and_stop_string(tiny_maverick, engines):
    engine = engines[tiny_maverick]
    prompt = random_prompts([9], seed=9)[0]
    free = engine.generate([prompt], SamplingParams(max_tokens=12, ignore_eos=True))[0].token_ids
    by_id = engine.generate([prompt], SamplingParams(max_tokens=12, stop_token_ids=(free[4],)))[0]
    assert by_id.token_ids == free[:5] and by_id.finish_reason is FinishReason.STOP
    tok = engine.core.tokenizer
    stop_text = tok.decode(free[6:7]).strip() or tok.decode(free[6:7])
    by_text = engine.generate([prompt], SamplingParams(max_tokens=12, stop=(stop_text,), ignore_eos=True))[0]
    assert by_text.finish_reason is FinishReason.STOP
    # generation ends with the first token whose text completes the stop string ...
    full = tok.decode_output(free)
    first = next(n for n in range(1, len(free) + 1) if stop_text in tok.decode_output(free[:n]))
    assert by_text.token_ids == free[:first]
    # ... and the text is cut exactly before it
    text = IncrementalDetokenizer(tok, (stop_text,)).add(by_text.token_ids, final=True)
    assert text == full[: full.index(stop_text)] and stop_text not in text


def test_prompt_beyond_context_is_rejected(tiny_maverick, engines):
    engine = engines[tiny_maverick]
    with pytest.raises(ValueError, match="context length 4096"):
        engine.add(list(range(4000)), SamplingParams(max_tokens=200))


def test_implements_the_engine_protocol(tiny_maverick, engines):
    engine = engines[tiny_maverick]
    assert isinstance(engine, Engine)
    engine.generate(random_prompts([5], seed=3), SamplingParams(max_tokens=2, ignore_eos=True))
    stats = engine.stats()  # the colocated experts count their rows like an expert worker
    assert [e["worker_idx"] for e in stats["experts"]] == [0]
    assert sum(stats["experts"][0]["rows_computed_per_layer"].values()) > 0


def test_a_readmitted_request_continues_with_the_same_sampled_tokens(tiny_maverick, engines):
    """Seeded draws depend on the seed and the token's index only: a request re-admitted with the
    tokens it already streamed (as after its attention worker was lost) draws the rest again."""
    engine = engines[tiny_maverick]
    prompt = random_prompts([11], seed=12)[0]
    params = SamplingParams(max_tokens=12, temperature=1.0, top_k=40, seed=77, ignore_eos=True)
    whole = engine.generate([prompt], params)[0].token_ids
    engine.core.add_request(Request("again", prompt, params, output_token_ids=whole[:5]))
    rest = []
    while engine.has_unfinished:
        rest += [t for out in engine.step() for t in out.new_token_ids]
    assert whole[:5] + rest == whole


class _FailOnce:
    """A MoE backend whose n-th dispatch raises, as when a peer is lost mid-step."""

    def __init__(self, inner, fail_at: int) -> None:
        self.inner, self.calls, self.fail_at = inner, 0, fail_at

    def dispatch(self, layer_idx, routed_in, expert_idx):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("connection closed by peer")
        return self.inner.dispatch(layer_idx, routed_in, expert_idx)


def test_a_failed_step_is_replayed_never_half_applied(tiny_maverick):
    cfg = EngineConfig(num_kv_blocks=512, block_size=4, token_budget=24)
    prompts = random_prompts([30, 7], seed=13)
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    expected = [r.token_ids for r in LLMEngine.from_checkpoint(tiny_maverick, cfg).generate(prompts, params)]
    engine = LLMEngine.from_checkpoint(tiny_maverick, cfg)
    experts = _FailOnce(engine.core.decoder.experts, fail_at=7)  # inside the 2nd step (4 MoE layers)
    engine.core.decoder.experts = experts
    ids = [engine.add(p, params) for p in prompts]
    tokens = {i: [] for i in ids}
    failures = 0
    while engine.has_unfinished:
        try:
            outputs = engine.step()
        except RuntimeError:
            failures += 1
            assert engine.core.has_pending_step
            engine.abort(ids[1])  # an abort meanwhile waits for the replay
            assert engine.core.scheduler.num_running == 2
            ids = ids[:1]
            continue
        for out in outputs:
            tokens[out.request_id] += out.new_token_ids
    assert failures == 1 and not engine.core.has_pending_step
    assert tokens[ids[0]] == expected[0]
    assert engine.core.kv.usage().blocks_used == 0
