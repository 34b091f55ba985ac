"""The decoder against transformers' Llama4ForCausalLM on the same weights."""

from __future__ import annotations

import torch

from attention.decoder import Llama4Decoder, _tensors, load_non_expert_weights
from attention.paged import KVPool, SeqChunk, build_batch
from experts.slots import LocalExperts
from model import host_memory
from model.checkpoint import CheckpointReader
from tests.helpers import hf_model, random_prompts

BLOCK = 4


class Contiguous:
    """Trivial block tables for tests: request r, layer l owns a private run of blocks."""

    def __init__(self, num_layers: int, blocks_per_seq: int) -> None:
        self.ids: dict[str, int] = {}
        self.num_layers, self.per = num_layers, blocks_per_seq

    def __call__(self, request_id: str, layer: int) -> list[int]:
        seq = self.ids.setdefault(request_id, len(self.ids))
        base = (seq * self.num_layers + layer) * self.per
        return list(range(base, base + self.per))


def decoder_for(model_dir) -> Llama4Decoder:
    with CheckpointReader(model_dir) as reader:
        weights = load_non_expert_weights(reader, torch.float32)
        return Llama4Decoder(reader.config, weights, LocalExperts.from_checkpoint(reader, torch.float32))


def run_chunks(dec: Llama4Decoder, steps: list[list[SeqChunk]], tables: Contiguous, pool: KVPool) -> list:
    cfg = dec.cfg

    def key_start(layer: int, start: int) -> int:
        c = cfg.attention_chunk_size
        return start // c * c if cfg.is_chunked(layer) else 0

    logits = []
    for chunks in steps:
        batch = build_batch(chunks, tables, key_start, cfg.num_hidden_layers, BLOCK)
        logits.append(dec.logits(dec.forward(batch, pool)))
    return logits


def new_pool(dec: Llama4Decoder, blocks: int = 2048) -> KVPool:
    return KVPool(blocks, BLOCK, dec.cfg.num_key_value_heads, dec.cfg.head_dim, torch.float32)


def test_batched_prefill_logits_match_transformers(tiny_checkpoint):
    # lengths cross several chunk boundaries (chunk 16) and temperature-tuning steps (floor 12)
    prompts = random_prompts([70, 9, 33, 1, 48])
    dec = decoder_for(tiny_checkpoint)
    (logits,) = run_chunks(
        dec,
        [[SeqChunk(f"r{i}", p, 0) for i, p in enumerate(prompts)]],
        Contiguous(dec.cfg.num_hidden_layers, 32),
        new_pool(dec),
    )
    ref_model = hf_model(tiny_checkpoint)
    offset = 0
    for p in prompts:
        with torch.no_grad():
            ref = ref_model(torch.tensor([p])).logits[0].float()
        torch.testing.assert_close(logits[offset : offset + len(p)], ref, atol=1e-4, rtol=0)
        offset += len(p)


def test_incremental_decode_equals_full_recompute(tiny_checkpoint):
    prompt = random_prompts([50], seed=3)[0]
    dec = decoder_for(tiny_checkpoint)
    (full,) = run_chunks(
        dec, [[SeqChunk("full", prompt, 0)]], Contiguous(dec.cfg.num_hidden_layers, 32), new_pool(dec)
    )
    # prefill 11 tokens, then chunks of 7 crossing the chunk boundaries, then one token at a time
    steps, pos = [[SeqChunk("inc", prompt[:11], 0)]], 11
    for size in (7, 7, 7):
        steps.append([SeqChunk("inc", prompt[pos : pos + size], pos)])
        pos += size
    steps += [[SeqChunk("inc", prompt[i : i + 1], i)] for i in range(pos, len(prompt))]
    parts = run_chunks(dec, steps, Contiguous(dec.cfg.num_hidden_layers, 32), new_pool(dec))
    torch.testing.assert_close(torch.cat(parts), full, atol=1e-4, rtol=0)


def test_empty_batch_runs_every_layer(tiny_maverick):
    """A lock-step rank with no tokens still runs the layers (and joins every exchange)."""
    dec = decoder_for(tiny_maverick)
    calls = []
    inner = dec.experts

    class Counting:
        def dispatch(self, layer_idx, routed_in, expert_idx):
            calls.append((layer_idx, routed_in.shape[0]))
            return inner.dispatch(layer_idx, routed_in, expert_idx)

    dec.experts = Counting()
    (logits,) = run_chunks(dec, [[]], Contiguous(dec.cfg.num_hidden_layers, 4), new_pool(dec, 64))
    assert logits.shape == (0, dec.cfg.vocab_size)
    assert calls == [(layer, 0) for layer in dec.cfg.moe_layers]


def test_bfloat16_compute_is_close_to_float32(tiny_maverick):
    prompt = random_prompts([20], seed=5)[0]
    with CheckpointReader(tiny_maverick) as reader:
        w = load_non_expert_weights(reader, torch.bfloat16)
        dec = Llama4Decoder(reader.config, w, LocalExperts.from_checkpoint(reader, torch.bfloat16))
    pool = KVPool(256, BLOCK, dec.cfg.num_key_value_heads, dec.cfg.head_dim, torch.bfloat16)
    (low,) = run_chunks(dec, [[SeqChunk("a", prompt, 0)]], Contiguous(dec.cfg.num_hidden_layers, 8), pool)
    (ref,) = run_chunks(
        decoder_for(tiny_maverick),
        [[SeqChunk("a", prompt, 0)]],
        Contiguous(dec.cfg.num_hidden_layers, 8),
        new_pool(dec, 256),
    )
    assert (low.argmax(-1) == ref.argmax(-1)).float().mean() > 0.8


def test_weights_in_huge_pages_give_the_same_logits(tiny_maverick, monkeypatch):
    """The tiny preset's weights are below a 2 MB page; with the threshold at 0 they take the path
    bench-maverick's take, and the logits stay bit for bit those of torch's own memory."""
    steps = [[SeqChunk(f"r{i}", p, 0) for i, p in enumerate(random_prompts([9, 20, 1]))]]
    plain = decoder_for(tiny_maverick)
    monkeypatch.setattr(host_memory, "MIN_BYTES", 0)
    placed = decoder_for(tiny_maverick)
    layer_tensors = [t for lw in placed.weights.layers for t in _tensors(lw)]
    assert len({t.untyped_storage().data_ptr() for t in layer_tensors}) == 1  # one mapping
    stacked = [t for s in placed.experts.slots.values() for t in s.compute_weights()]
    assert all(t.data_ptr() % host_memory.HUGE_PAGE == 0 for t in stacked)
    layers = plain.cfg.num_hidden_layers
    (want,) = run_chunks(plain, steps, Contiguous(layers, 8), new_pool(plain))
    (got,) = run_chunks(placed, steps, Contiguous(layers, 8), new_pool(placed))
    assert torch.equal(got, want)
