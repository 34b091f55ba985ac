"""`llama4-ep bench vision`: images per second of the vision-encoder tier, and the time to first
token of a one-image chat request against a text-only request of the same length, in one run.

With `--vision-workers N` (default 1) the images go through the cluster engine's vision tier
(Ray actors) and the throughput is that tier's: one call per worker carrying `--images` images,
timed from the driver. With 0, the encoder runs in this process, and so does the engine
(`--expert-workers 0`) or the attention workers encode (`--expert-workers N`).

TTFT is measured on an idle engine, one request at a time, image and text requests taking turns;
the text request has exactly as many prompt tokens as the image one (random ids), so the
difference is what the image costs: preprocessing is done beforehand, so encoding and fetching
its features is what shows.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import ray
import torch

from attention.vision import VisionEncoder
from cluster.config import ClusterConfig
from cluster.engine import ClusterEngine
from engine.core import EngineConfig
from engine.llm_engine import LLMEngine
from engine.request import SamplingParams
from model.checkpoint import CheckpointReader, parse_dtype
from model.image_processing import ImageProcessor, ProcessedImage
from model.synthetic import default_checkpoint
from model.tokenizer import Tokenizer

BENCH_PRESET = "bench-maverick"  # hidden 256, 8 layers; a 4-layer, 128-wide vision tower
ONE_TOKEN = SamplingParams(max_tokens=1, ignore_eos=True)


def cmd_vision(args: argparse.Namespace) -> int:
    model = Path(args.model) if args.model else default_checkpoint(BENCH_PRESET)
    processor = ImageProcessor.for_checkpoint(model)
    if processor is None:
        raise ValueError(f"--model {str(model)!r} has no vision tower")
    if min(args.images, args.reps) < 1 or min(args.vision_workers, args.expert_workers) < 0:
        raise ValueError("--images and --reps must be >= 1, worker counts >= 0")
    if args.vision_workers and not args.expert_workers:
        raise ValueError("--vision-workers need the cluster engine (--expert-workers >= 1)")
    image = processor.preprocess(_image(args.image_size))
    engine_cfg = EngineConfig(num_kv_blocks=2048, token_budget=4096, dtype=args.dtype)
    engine = _engine(model, args, engine_cfg)
    try:
        rate = _images_per_second(engine, model, image, args)
        ttft = _ttft(engine, model, processor, image, args.reps)
    finally:
        engine.close()
    figures = {
        "vision_workers": args.vision_workers,
        "tiles_per_image": image.num_tiles,
        "images_per_call": args.images,
        "images_per_second": round(rate, 2),
        "tiles_per_second": round(rate * image.num_tiles, 2),
        "prompt_tokens": ttft["prompt_tokens"],
        "ttft_image_ms": round(ttft["image"] * 1e3, 1),
        "ttft_text_ms": round(ttft["text"] * 1e3, 1),
        "ttft_image_over_text": round(ttft["image"] / ttft["text"], 2),
    }
    _print(figures)
    return 0


def _image(size: str) -> torch.Tensor:
    try:
        h, w = (int(v) for v in size.lower().split("x"))
    except ValueError:
        raise ValueError(f"--image-size {size!r} is not HxW (e.g. 672x672)") from None
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)


def _engine(model: Path, args: argparse.Namespace, engine_cfg: EngineConfig) -> Any:
    if args.expert_workers == 0:
        return LLMEngine.from_checkpoint(model, engine_cfg)
    cluster = ClusterConfig(
        args.attention_workers, args.expert_workers, num_vision_workers=args.vision_workers
    )
    return ClusterEngine(model, cluster, engine_cfg)


def _images_per_second(engine: Any, model: Path, image: ProcessedImage, args: argparse.Namespace) -> float:
    """The fastest of `reps` rounds: every vision worker (or the in-process encoder) encodes
    `--images` images in one call."""
    batch = [image] * args.images
    if args.vision_workers:
        workers = engine.vision.workers

        def run() -> None:
            ray.get([w.encode.remote([batch]) for w in workers])

        per_round = args.images * len(workers)
    else:
        with CheckpointReader(model) as reader:
            encoder = VisionEncoder.from_checkpoint(reader, parse_dtype(args.dtype))

        def run() -> None:
            encoder.encode_images(batch)

        per_round = args.images
    run()  # warm up
    best = min(_seconds(run) for _ in range(args.reps))
    return per_round / best


def _seconds(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _ttft(engine: Any, model: Path, processor: ImageProcessor, image: ProcessedImage, reps: int) -> dict:
    """Median seconds from `add` to the first token, image and text requests taking turns."""
    tokenizer = Tokenizer(model)
    parts = [{"type": "image"}, {"type": "text", "text": "Describe this image."}]
    with_image = processor.expand(
        tokenizer.apply_chat_template([{"role": "user", "content": parts}]), [image]
    )
    g = torch.Generator().manual_seed(1)
    text_only = [200000, *torch.randint(0, 200000, (len(with_image) - 1,), generator=g).tolist()]
    _first_token(engine, text_only, [])  # warm up both paths
    _first_token(engine, with_image, [image])
    times: dict[str, list[float]] = {"image": [], "text": []}
    for _ in range(reps):
        times["image"].append(_first_token(engine, with_image, [image]))
        times["text"].append(_first_token(engine, text_only, []))
    return {
        "image": statistics.median(times["image"]),
        "text": statistics.median(times["text"]),
        "prompt_tokens": len(with_image),
    }


def _first_token(engine: Any, prompt: list[int], images: list[ProcessedImage]) -> float:
    t0 = time.perf_counter()
    rid = engine.add(prompt, ONE_TOKEN, images=images)
    while True:
        for out in engine.step():
            if out.request_id == rid and out.new_token_ids:
                elapsed = time.perf_counter() - t0
                while engine.has_unfinished:
                    engine.step()
                return elapsed


def _print(f: dict) -> None:
    workers = f"{f['vision_workers']} vision workers" if f["vision_workers"] else "in-process"
    print(
        f"vision encoder ({workers}), {f['tiles_per_image']} tiles an image, {f['images_per_call']} a call:"
    )
    print(f"  {f['images_per_second']:.2f} images/s ({f['tiles_per_second']:.2f} tiles/s)")
    print(f"time to first token, {f['prompt_tokens']}-token prompt:")
    print(f"  with one image  {f['ttft_image_ms']:8.1f} ms")
    print(f"  text only       {f['ttft_text_ms']:8.1f} ms  (image / text: {f['ttft_image_over_text']:.2f}x)")
    print(json.dumps(f))
