"""The GPU check (issue 12): the colocated engine on one GPU against transformers, one JSON line.

    scripts/gpu-check.sh                      # = python -m bench.gpu (cuda, the full check)
    python -m bench.gpu --device cpu --tiny   # the same steps at toy sizes on a CPU (a dry run)

1. Tokens: greedy tokens of the colocated engine in fp32 equal transformers' `Llama4ForCausalLM`
   in fp32 on the same device, on the tiny presets (`tokens_equal`). Logits in bf16: the RMS
   error of the engine's bf16 prefill logits against transformers' fp32 ones must be at most
   `BF16_TOLERANCE` times transformers' own bf16 error (random tiny models route chaotically, so
   an absolute bound would say more about the model than about the engine).
2. Decode: tokens/s of the engine at each batch (1, 32, 256) on a Scout-shaped model cut to a
   few layers at full width (hidden 5120, 16 experts, bf16, random weights made on the device
   by transformers' own initialisation and shared with the engine, no copy), against
   transformers' `generate` on the same weights (`decode_tok_s`, `vs_transformers`).
3. MoE layer: the time of one MoE layer (gate, routed experts, shared expert) at batch 1-256
   against the HBM roofline, the active weight bytes read / the measured device-to-device copy
   bandwidth (`moe_roofline_fraction`: 1.0 is at the roofline).

It imports neither Ray nor the serving stack (the GPU machine has torch, safetensors and
transformers only): the engine is built here from its parts, without a tokenizer.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from attention.decoder import Llama4Decoder, TensorSource, load_non_expert_weights
from attention.paged import KVPool, SeqChunk, build_batch
from bench.gpu_args import add_gpu_arguments
from engine.core import EngineConfig, EngineCore
from engine.llm_engine import LLMEngine
from engine.request import SamplingParams
from experts.slots import LocalExperts
from experts.swiglu import uses_grouped_mm
from model.checkpoint import CheckpointReader, TensorDict
from model.config import ModelConfig
from model.device import resolve_device, resolve_dtype, synchronize
from model.hf_reference import load_hf_causal_lm
from model.presets import preset_config
from model.synthetic import make_checkpoint
from sim.models import REAL_MODELS

BF16_TOLERANCE = 1.5  # the engine's bf16 logit error may be this many times transformers' own
SEEDS = {"tiny-maverick": 0, "tiny-scout": 1}  # the tests' checkpoints
EXTRA_REPS = 7  # runs a decode rate may add while noise hides the decode (see `_rate`)


@dataclass(frozen=True)
class Spec:
    device: str = "cuda"
    tiny: bool = False  # toy sizes everywhere (a dry run of the steps, e.g. on a CPU)
    layers: int = 4  # of the Scout-shaped model
    batches: tuple[int, ...] = (1, 32, 256)
    moe_batches: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256)
    new_tokens: int = 32
    prompt_len: int = 16
    reps: int = 3
    check_tokens: int = 16
    presets: tuple[str, ...] = ("tiny-maverick", "tiny-scout")

    @classmethod
    def dry_run(cls, device: str) -> Spec:
        return cls(device, True, 2, (1, 4), (1, 4), 4, 8, 1, 6, ("tiny-scout",))


# -- building the engine from its parts (no tokenizer: the GPU machine has no llama-models) --


def build_engine(source: TensorSource, engine_cfg: EngineConfig, device: torch.device) -> LLMEngine:
    dtype = resolve_dtype(engine_cfg.dtype, device)
    weights = load_non_expert_weights(source, dtype, device)
    decoder = Llama4Decoder(source.config, weights, LocalExperts.from_checkpoint(source, dtype, device))
    return LLMEngine(EngineCore(source.config, decoder, engine_cfg))


def _prompts(batch: int, length: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 200000, (batch, length), generator=g).tolist()


# -- 1. tokens and bf16 logits on the tiny presets ------------------------------------------


def check_tokens(spec: Spec, device: torch.device, workdir: Path) -> dict:
    equal, gaps, rms = {}, {}, {}
    for preset in spec.presets:
        model_dir = make_checkpoint(preset, workdir / preset, seed=SEEDS[preset])
        hf = load_hf_causal_lm(model_dir).to(device)
        prompts = _prompts(3, 11, seed=7)
        with CheckpointReader(model_dir) as reader:
            cfg = EngineConfig(num_kv_blocks=1024, block_size=16, dtype="float32", device=str(device))
            ours = build_engine(reader, cfg, device).generate(prompts, _greedy(spec.check_tokens))
        ref = [_hf_greedy(hf, p, spec.check_tokens, device) for p in prompts]
        equal[preset] = all(r.token_ids == t for r, (t, _) in zip(ours, ref, strict=True))
        gaps[preset] = round(min(g for _, g in ref), 5)
        # many positions: single ones swing with the routing (random tiny models route chaotically)
        rms[preset] = _bf16_errors(model_dir, hf, _prompts(8, 32, seed=1), device)
        del hf
    ok = all(r["engine"] <= BF16_TOLERANCE * r["transformers"] for r in rms.values())
    return {
        "tokens_equal": all(equal.values()),
        "tokens_equal_per_preset": equal,
        "reference_min_top2_gap": gaps,
        "bf16_logits_rms_error": rms,
        "bf16_logits_within_tolerance": ok,
    }


def _greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, ignore_eos=True)


def _hf_greedy(hf, prompt: list[int], n: int, device: torch.device) -> tuple[list[int], float]:
    """transformers' greedy tokens, and the smallest top-1/top-2 logit gap along them (a near
    tie is where fp32 rounding on another device may pick the other token)."""
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([prompt]).to(device),
            max_new_tokens=n,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
            output_scores=True,
            return_dict_in_generate=True,
        )
    top2 = [s[0].topk(2).values for s in out.scores]
    return out.sequences[0, len(prompt) :].tolist(), min(float(v[0] - v[1]) for v in top2)


def _bf16_errors(model_dir: Path, hf_fp32, prompts: list[list[int]], device: torch.device) -> dict:
    """RMS error against transformers' fp32 logits of the engine's bf16 logits and of
    transformers' own bf16 logits, over every position of every prompt."""
    hf_bf16 = load_hf_causal_lm(model_dir, dtype=torch.bfloat16).to(device)
    with CheckpointReader(model_dir) as reader:
        weights = load_non_expert_weights(reader, torch.bfloat16, device)
        experts = LocalExperts.from_checkpoint(reader, torch.bfloat16, device)
        decoder = Llama4Decoder(reader.config, weights, experts)
    sq = {"engine": 0.0, "transformers": 0.0}
    count = 0
    for p in prompts:
        with torch.no_grad():
            ref = hf_fp32(torch.tensor([p]).to(device)).logits[0].float()
            theirs = hf_bf16(torch.tensor([p]).to(device)).logits[0].float()
        ours = _prefill_logits(decoder, p)
        sq["engine"] += float(((ours - ref) ** 2).sum())
        sq["transformers"] += float(((theirs - ref) ** 2).sum())
        count += ref.numel()
    return {k: round((v / count) ** 0.5, 5) for k, v in sq.items()}


def _prefill_logits(decoder: Llama4Decoder, prompt: list[int]) -> torch.Tensor:
    """Logits [n, V] of every position of one prompt, prefilled in one step."""
    cfg, block = decoder.cfg, 16
    per_layer = -(-len(prompt) // block)
    pool = KVPool(
        per_layer * cfg.num_hidden_layers,
        block,
        cfg.num_key_value_heads,
        cfg.head_dim,
        decoder.dtype,
        decoder.device,
    )

    def key_start(layer: int, start: int) -> int:
        return start // cfg.attention_chunk_size * cfg.attention_chunk_size if cfg.is_chunked(layer) else 0

    def table(_request: str, layer: int) -> list[int]:
        return list(range(layer * per_layer, (layer + 1) * per_layer))

    batch = build_batch(
        [SeqChunk("p", prompt, 0)], table, key_start, cfg.num_hidden_layers, block, decoder.device
    )
    with torch.no_grad():
        return decoder.logits(decoder.forward(batch, pool))


# -- 2. decode throughput on a Scout-shaped model --------------------------------------------


def scout_cut(spec: Spec) -> dict:
    """Scout's text config (tiny-scout's for a dry run) cut to `spec.layers` layers."""
    base = preset_config("tiny-scout") if spec.tiny else json.loads(json.dumps(REAL_MODELS["scout"]))
    return {**base, "num_hidden_layers": spec.layers, "max_position_embeddings": 4096}


@contextmanager
def _default_dtype(dtype: torch.dtype):
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def random_model(text: dict, device: torch.device, dtype: torch.dtype):
    """transformers' Llama4ForCausalLM with its own random initialisation, made on `device`."""
    from transformers import Llama4ForCausalLM, Llama4TextConfig  # lazy: transformers is a bench extra

    hf_cfg = Llama4TextConfig(**{k: v for k, v in text.items() if k not in ("model_type", "torch_dtype")})
    hf_cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device), _default_dtype(dtype):
        return Llama4ForCausalLM(hf_cfg).eval()


def shared_weights(hf, cfg: ModelConfig) -> TensorDict:
    """The transformers model's parameters under the engine's canonical names (the same tensors)."""
    tensors = {name.removeprefix("model."): t.detach() for name, t in hf.state_dict().items()}
    return TensorDict(cfg, tensors)


def decode_rates(spec: Spec, device: torch.device, hf, source: TensorDict) -> dict:
    budget = max(spec.batches) * spec.prompt_len
    blocks = max(spec.batches) * -(-(spec.prompt_len + spec.new_tokens) // 16) * spec.layers + 64
    cfg = EngineConfig(blocks, 16, max(spec.batches), budget, "bfloat16", str(device))
    engine = build_engine(source, cfg, device)
    ours, theirs = {}, {}
    for batch in spec.batches:
        prompts = _prompts(batch, spec.prompt_len)
        ids = torch.tensor(prompts).to(device)

        def run_ours(n: int, prompts=prompts) -> None:
            engine.generate(prompts, _greedy(n))

        def run_theirs(n: int, ids=ids) -> None:
            with torch.no_grad():
                hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                            do_sample=False, eos_token_id=None, pad_token_id=0)  # fmt: skip

        ours[str(batch)] = _rate(run_ours, batch, spec, device)
        theirs[str(batch)] = _rate(run_theirs, batch, spec, device)
    return {
        "decode_tok_s": ours,
        "transformers_decode_tok_s": theirs,
        "vs_transformers": {b: round(ours[b] / theirs[b], 2) for b in ours},
    }


def _rate(run: Callable[[int], None], batch: int, spec: Spec, device: torch.device) -> float:
    """Decode tokens/s: the time of `new_tokens` tokens minus that of the first (the prefill),
    each the fastest of `reps` runs, or of more while the difference is not positive (on a busy
    CPU a one-token run can take longer than the fastest full one: a tiny model's decode is short)."""
    run(2)  # warm up (kernels, allocator)
    first, total = [], []
    for _ in range(spec.reps + EXTRA_REPS):
        first.append(_timed(lambda: run(1), device))
        total.append(_timed(lambda: run(spec.new_tokens), device))
        if len(first) >= spec.reps and min(total) > min(first):
            break
    decode_s = min(total) - min(first)
    if decode_s <= 0:
        raise RuntimeError(f"decode time not measurable: {len(first)} runs, the machine is too busy")
    return round(batch * (spec.new_tokens - 1) / decode_s, 1)


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t0


# -- 3. the MoE layer against the HBM roofline -----------------------------------------------


def copy_bandwidth(device: torch.device, nbytes: int) -> float:
    """Bytes/s a device-to-device copy moves (each byte read once and written once)."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = min(_timed(lambda: dst.copy_(src), device) for _ in range(5))
    return 2 * nbytes / best


def moe_roofline(spec: Spec, device: torch.device, decoder: Llama4Decoder, bandwidth: float) -> dict:
    """Per batch: roofline time / measured time of the first MoE layer, for random inputs."""
    cfg, layer = decoder.cfg, decoder.cfg.moe_layers[0]
    lw = decoder.weights.layers[layer]
    expert_bytes = 3 * cfg.hidden_size * cfg.intermediate_size * decoder.dtype.itemsize
    fractions, reps = {}, 3 if spec.tiny else 20
    g = torch.Generator().manual_seed(0)
    for batch in spec.moe_batches:
        x = torch.randn(batch, cfg.hidden_size, generator=g).to(device=device, dtype=decoder.dtype)
        with torch.no_grad():
            active = int(torch.unique(torch.topk(x @ lw.router.T, 1).indices).numel())
            decoder.moe(layer, x)  # warm up
            seconds = _timed(lambda x=x: [decoder.moe(layer, x) for _ in range(reps)], device) / reps
        read = (active + 1) * expert_bytes + lw.router.numel() * lw.router.element_size()  # + shared
        fractions[str(batch)] = float(f"{read / bandwidth / seconds:.4g}")
    return fractions


# -- the check -------------------------------------------------------------------------------


def run_check(spec: Spec) -> dict:
    device = resolve_device(spec.device)
    t0 = time.perf_counter()
    figures: dict = {"device": _device_name(device), "torch": torch.__version__}
    with tempfile.TemporaryDirectory(prefix="llama4-ep-gpu-check-") as tmp:
        figures |= check_tokens(spec, device, Path(tmp))
    _say(f"tokens checked ({time.perf_counter() - t0:.0f} s)")
    text = scout_cut(spec)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    hf = random_model(text, device, dtype)
    source = shared_weights(hf, ModelConfig.from_dict(text))
    figures |= decode_rates(spec, device, hf, source)
    _say(f"decode measured ({time.perf_counter() - t0:.0f} s)")
    weights = load_non_expert_weights(source, dtype, device)
    decoder = Llama4Decoder(source.config, weights, LocalExperts.from_checkpoint(source, dtype, device))
    bandwidth = copy_bandwidth(device, 2**20 if spec.tiny else 2**31)
    figures["copy_bandwidth_gb_s"] = round(bandwidth / 1e9, 1)
    figures["grouped_gemm"] = uses_grouped_mm(torch.empty(1, dtype=dtype, device=device))
    figures["moe_roofline_fraction"] = moe_roofline(spec, device, decoder, bandwidth)
    figures["scout_cut"] = {
        "layers": spec.layers,
        "hidden": text["hidden_size"],
        "experts": text["num_local_experts"],
    }
    figures["seconds"] = round(time.perf_counter() - t0, 1)
    return figures


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _say(line: str) -> None:
    print(f"gpu-check: {line}", file=sys.stderr, flush=True)


def spec_from(args: argparse.Namespace) -> Spec:
    spec = Spec.dry_run(args.device) if args.tiny else Spec(args.device)
    if args.layers is not None:
        if args.layers < 1:
            raise ValueError(f"--layers must be >= 1, got {args.layers}")
        spec = replace(spec, layers=args.layers)
    return spec


def cmd_gpu(args: argparse.Namespace) -> int:
    figures = run_check(spec_from(args))
    print(json.dumps(figures))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.splitlines()[0])
    add_gpu_arguments(p)
    args = p.parse_args(argv)
    try:
        return cmd_gpu(args)
    except ValueError as e:
        p.exit(2, f"{p.prog}: error: {e}\n")


if __name__ == "__main__":
    sys.exit(main())
