"""Shared by the shapes-world benchmarks: the held-out evaluation set and one timed generation."""

from __future__ import annotations

import time

import torch

from guidance.shapes.assets import load_scorer, load_world


def heldout_set(num_seeds: int, num_captions: int | None = None):
    """(world, scorer, held-out captions, seeds, the scene of every generated image in `generate`'s order); the
    first `num_captions` captions only when given (smoke runs)."""
    import diffusers

    diffusers.utils.logging.set_verbosity_error()
    world, scorer = load_world(), load_scorer()
    heldout = world.heldout_scenes()[:num_captions]
    seeds = list(range(num_seeds))
    return world, scorer, [world.caption(s) for s in heldout], seeds, heldout * num_seeds


def generate(pipe, captions, seeds, steps, guidance, **extra):
    """Every caption for every seed: images in [0, 1] (n, 3, H, W), the trace and the wall time."""
    generators = [torch.Generator().manual_seed(seed) for seed in seeds for _ in captions]
    prompts = [caption for _ in seeds for caption in captions]
    start = time.perf_counter()
    out = pipe(prompts, num_inference_steps=steps, generator=generators, output_type="pt", guidance=guidance, **extra)
    return out.images, out.trace, time.perf_counter() - start
