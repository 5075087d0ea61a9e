"""Shared by the shapes-world benchmarks: the held-out evaluation set and one timed generation."""

from __future__ import annotations

import time

import torch

from guidance.shapes.assets import load_scorer, load_world

TRAINING_SEED_OFFSET = 1000  # the training split's seeds: never those of a held-out run


def heldout_set(num_seeds: int, num_captions: int | None = None, split: str = "heldout"):
    """(world, scorer, captions, seeds, the scene of every generated image in `generate`'s order) of the held-out
    captions, or with `split="training"` of as many training captions (drawn once, seed 0) on other seeds: where
    settings are chosen. The first `num_captions` captions only when given (smoke runs)."""
    import diffusers

    diffusers.utils.logging.set_verbosity_error()
    if split not in ("heldout", "training"):
        raise ValueError(f"`split` must be 'heldout' or 'training', got {split!r}")
    world, scorer = load_world(), load_scorer()
    scenes = world.heldout_scenes()
    seeds = list(range(num_seeds))
    if split == "training":
        pool = world.training_scenes()
        order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(0)).tolist()
        scenes = [pool[i] for i in order[: len(scenes)]]
        seeds = [TRAINING_SEED_OFFSET + seed for seed in seeds]
    scenes = scenes[:num_captions]
    return world, scorer, [world.caption(s) for s in scenes], seeds, scenes * num_seeds


def generate(pipe, captions, seeds, steps, guidance, **extra):
    """Every caption for every seed: images in [0, 1] (n, 3, H, W), the trace and the wall time."""
    generators = [torch.Generator().manual_seed(seed) for seed in seeds for _ in captions]
    prompts = [caption for _ in seeds for caption in captions]
    start = time.perf_counter()
    out = pipe(prompts, num_inference_steps=steps, generator=generators, output_type="pt", guidance=guidance, **extra)
    return out.images, out.trace, time.perf_counter() - start
