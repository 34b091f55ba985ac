"""`llama4-ep generate` and `llama4-ep make-checkpoint`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cluster.config import ClusterConfig
from cluster.engine import generate_on_cluster
from engine.core import EngineConfig
from engine.llm_engine import LLMEngine
from engine.request import SamplingParams
from model.image_processing import ImageError, ImageProcessor, ProcessedImage
from model.synthetic import default_checkpoint, make_checkpoint
from model.tokenizer import Tokenizer
from serving.cli import parallel_min_tokens_setting


def cmd_make_checkpoint(args: argparse.Namespace) -> int:
    if args.expert_skew < 0:
        raise ValueError(f"--expert-skew must be >= 0, got {args.expert_skew}")
    out = make_checkpoint(
        args.preset,
        args.out,
        seed=args.seed,
        max_shard_size=args.max_shard_size,
        expert_skew=args.expert_skew,
        skew_seed=args.skew_seed,
        vision=not args.no_vision,
    )
    files = sorted(p.name for p in Path(out).iterdir())
    print(f"wrote {args.preset} (seed {args.seed}) to {out}: {', '.join(files)}")
    return 0


def _prompts(args: argparse.Namespace, tokenizer: Tokenizer) -> list[list[int]]:
    prompts = []
    for kind, value in args.inputs or []:
        if kind == "prompt":
            prompts.append(tokenizer.encode(value))
        elif kind == "chat":
            prompts.append(tokenizer.apply_chat_template([{"role": "user", "content": value}]))
        else:
            prompts.append(value)
    if not prompts:
        raise ValueError("give at least one of --prompt, --chat or --prompt-ids")
    for i, ids in enumerate(prompts):
        bad = [t for t in ids if not 0 <= t < tokenizer.vocab_size]
        if bad:
            raise ValueError(
                f"prompt {i}: token ids {bad} are outside the vocabulary [0, {tokenizer.vocab_size})"
            )
    return prompts


def _with_images(
    args: argparse.Namespace, model: Path, tokenizer: Tokenizer, prompts: list[list[int]]
) -> tuple[list[list[int]], list[list[ProcessedImage]] | None]:
    """With --image: one --chat message, the images shown before its text, the prompt expanded."""
    if not args.image:
        return prompts, None
    inputs = args.inputs or []
    if len(inputs) != 1 or inputs[0][0] != "chat":
        raise ValueError("--image goes with exactly one --chat (and no other prompt)")
    processor = ImageProcessor.for_checkpoint(model)
    if processor is None:
        raise ValueError(f"--model {str(model)!r} has no vision tower; --image needs one")
    images = []
    for path in args.image:
        try:
            images.append(processor.decode_and_preprocess(Path(path).read_bytes()))
        except OSError as e:
            raise ValueError(f"--image {path!r}: {e.strerror}") from None
        except ImageError as e:
            raise ValueError(f"--image {path!r}: {e}") from None
    parts = [{"type": "image"} for _ in images] + [{"type": "text", "text": inputs[0][1]}]
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": parts}])
    return [processor.expand(prompt, images)], [images]


def cmd_generate(args: argparse.Namespace) -> int:
    model = Path(args.model) if args.model else default_checkpoint()
    if not (model / "config.json").exists():
        raise ValueError(f"--model {str(model)!r}: no config.json there")
    tokenizer = Tokenizer(model)
    prompts = _prompts(args, tokenizer)
    prompts, images = _with_images(args, model, tokenizer, prompts)
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        ignore_eos=args.ignore_eos,
    )
    engine_cfg = EngineConfig(
        dtype=args.dtype,
        device=args.device,
        kv_cache_memory=args.kv_cache_memory,
        **parallel_min_tokens_setting(args.parallel_min_tokens),
    )
    if args.attention_workers or args.expert_workers or args.address or args.vision_workers:
        cluster = ClusterConfig(
            args.attention_workers or 1,
            args.expert_workers or 1,
            device=args.device,
            num_vision_workers=args.vision_workers,
        )
        results = generate_on_cluster(model, prompts, params, engine_cfg, cluster, args.address, images)
    else:
        results = LLMEngine.from_checkpoint(model, engine_cfg).generate(prompts, params, images)
    for i, r in enumerate(results):
        text = tokenizer.decode_output(r.token_ids)
        if args.json:
            print(
                json.dumps(
                    {
                        "index": i,
                        "prompt_token_ids": r.prompt_token_ids,
                        "token_ids": r.token_ids,
                        "text": text,
                        "finish_reason": r.finish_reason.value if r.finish_reason else None,
                    }
                )
            )
        else:
            print(f"--- completion {i} ({len(r.token_ids)} tokens, {r.finish_reason.value}) ---\n{text}")
    return 0
