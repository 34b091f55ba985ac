"""Test helpers: the transformers referee and prompt pools."""

from __future__ import annotations

import functools
from pathlib import Path

import torch


@functools.cache
def hf_model(model_dir: Path):
    """transformers' Llama4ForCausalLM on the same weights (cached per checkpoint)."""
    from model.hf_reference import load_hf_causal_lm

    return load_hf_causal_lm(model_dir)


def random_prompts(lengths: list[int], seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 200000, (n,), generator=g).tolist() for n in lengths]


def hf_greedy(model_dir: Path, prompt: list[int], max_new_tokens: int) -> tuple[list[int], float]:
    """transformers' greedy continuation, and the smallest top-1/top-2 logit gap along it.

    A gap near zero is a tie that rounding may break either way; tests assert it is clear of
    zero so that an exact token comparison is meaningful.
    """
    model = hf_model(model_dir)
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
            output_scores=True,
            return_dict_in_generate=True,
        )
    gaps = [float(s[0].topk(2).values[0] - s[0].topk(2).values[1]) for s in out.scores]
    return out.sequences[0, len(prompt) :].tolist(), min(gaps)


def run_with_late_arrivals(
    engine,
    prompts: list[list[int]],
    late: list[list[int]],
    params,
    arrival_steps: tuple[int, ...],
    on_step=None,
) -> list[list[int]]:
    """Submit `prompts`, then each of `late` at the given steps while the first ones decode;
    return the generated tokens per request, in submission order. `on_step(engine)` runs after
    every step."""
    ids = [engine.add(p, params) for p in prompts]
    tokens: dict[str, list[int]] = {i: [] for i in ids}
    step = 0
    while engine.has_unfinished or len(ids) < len(prompts) + len(late):
        if step in arrival_steps:
            rid = engine.add(late[len(ids) - len(prompts)], params)
            ids.append(rid)
            tokens[rid] = []
        for out in engine.step():
            tokens[out.request_id].extend(out.new_token_ids)
        if on_step is not None:
            on_step(engine)
        step += 1
    return [tokens[i] for i in ids]


@functools.cache
def hf_vision_model(model_dir: Path):
    """transformers' Llama4ForConditionalGeneration on the same weights (cached per checkpoint)."""
    from model.hf_reference import load_hf_conditional_generation

    return load_hf_conditional_generation(model_dir)


def random_image(height: int, width: int, seed: int = 0) -> torch.Tensor:
    """uint8 [3, height, width]: seeded noise over a gradient (what a decoder would give)."""
    g = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(0, 200, width)[None, None, :].expand(3, height, width)
    return (ramp + torch.randint(0, 56, (3, height, width), generator=g)).to(torch.uint8)


def image_prompt_ids(processor, parts: list, seed: int = 0) -> tuple[list[int], list]:
    """A prompt of text pieces (token-id lists) and images ((height, width) sizes), expanded as the
    processor does; returns the ids and the ProcessedImages in order."""
    from model.vision_config import IMAGE

    ids, images = [200000], []
    for i, part in enumerate(parts):
        if isinstance(part, tuple):
            images.append(processor.preprocess(random_image(*part, seed=seed + i)))
            ids.append(IMAGE)
        else:
            ids += part
    return processor.expand(ids, images), images


def hf_image_logits(model_dir: Path, prompt: list[int], images: list, rows: torch.Tensor) -> torch.Tensor:
    """transformers' logits [len(rows), V] (fp32) at positions `rows` of one prompt with its images."""
    model = hf_vision_model(model_dir)
    with torch.no_grad():
        pixels = torch.cat([im.pixel_values for im in images]).float() if images else None
        out = model(input_ids=torch.tensor([prompt]), pixel_values=pixels, logits_to_keep=rows)
        return out.logits[0].float()


def checked_rows(prompt: list[int], every: int = 13) -> torch.Tensor:
    """Positions whose logits a test compares: every `every`-th, every non-`<|patch|>` token (the
    text around and after the images) and the last one; the full [T, V] logits of a long prompt
    would cost more than the forward pass."""
    keep = {i for i, t in enumerate(prompt) if i % every == 0 or t != 200092} | {len(prompt) - 1}
    return torch.tensor(sorted(keep))


def hf_greedy_with_images(model_dir: Path, prompt: list[int], images: list, max_new_tokens: int):
    """transformers' greedy continuation of a prompt with images, and the smallest top-1/top-2
    logit gap along it (see hf_greedy)."""
    model = hf_vision_model(model_dir)
    pixels = torch.cat([im.pixel_values for im in images]).float()
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor([prompt]),
            pixel_values=pixels,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
            output_scores=True,
            return_dict_in_generate=True,
        )
    gaps = [float(s[0].topk(2).values[0] - s[0].topk(2).values[1]) for s in out.scores]
    return out.sequences[0, len(prompt) :].tolist(), min(gaps)
