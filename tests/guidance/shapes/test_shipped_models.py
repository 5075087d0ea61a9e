"""The shapes-world models shipped in assets/: plain diffusers and open_clip load them, our pipelines equal
diffusers on them, and they follow held-out captions (judged by the shipped attribute scorer).

The quality figures are the benchmark's (benchmarks/shapes_quality.py, 2 seeds); these tests use one seed and
bounds a few points under the measured values, so that a broken or swapped asset fails them.
"""

import numpy as np
import pytest
import torch
from conftest import seeded

from guidance import ClassifierFreeGuidance
from guidance.shapes.assets import asset_path, load_scorer, load_world
from pipelines.application.models import load_shapes_pipeline

# benchmarks/shapes_quality.py, 2 seeds: shapes-sd at 7.5 reaches color 99.0 / shape 95.8 (69.8 / 79.2 at scale 1)
MIN_SD_COLOR, MIN_SD_SHAPE = 0.9, 0.85
MIN_SD3_SHAPE = 0.85  # measured 96.9 at scale 5 (88.5 at scale 1)


@pytest.fixture(scope="module")
def heldout():
    world = load_world()
    scenes = world.heldout_scenes()
    return world, load_scorer(), scenes, [world.caption(s) for s in scenes]


def accuracy(pipe, heldout, scale, **extra):
    world, scorer, scenes, captions = heldout
    generators = [torch.Generator().manual_seed(0) for _ in captions]
    images = pipe(
        captions,
        num_inference_steps=20,
        generator=generators,
        output_type="pt",
        guidance=ClassifierFreeGuidance(scale),
        **extra,
    ).images
    return scorer.accuracy(images * 2 - 1, scenes, world)


def test_shapes_sd_equals_plain_diffusers_at_constant_cfg():
    from diffusers import StableDiffusionPipeline

    reference = StableDiffusionPipeline.from_pretrained(asset_path("shapes-sd"))
    guided = load_shapes_pipeline("shapes-sd")
    for pipe in (reference, guided):
        pipe.set_progress_bar_config(disable=True)
    kwargs = dict(
        prompt=["a large red circle at the left on white", "a small blue square at the top on black"],
        num_inference_steps=20,
        output_type="np",
    )
    expected = reference(**kwargs, generator=seeded(), guidance_scale=7.5).images
    result = guided(**kwargs, generator=seeded(), guidance=ClassifierFreeGuidance(7.5)).images
    assert np.abs(result - expected).max() <= 1e-4


def test_guidance_makes_shapes_sd_follow_held_out_captions(heldout):
    pipe = load_shapes_pipeline("shapes-sd")
    pipe.set_progress_bar_config(disable=True)
    unguided, guided = accuracy(pipe, heldout, 1.0), accuracy(pipe, heldout, 7.5)
    assert guided["color"] >= MIN_SD_COLOR and guided["shape"] >= MIN_SD_SHAPE
    assert guided["color"] >= unguided["color"] + 0.05 and guided["shape"] >= unguided["shape"] + 0.05


def test_shapes_sd3_follows_held_out_captions_and_loads_in_diffusers(heldout):
    from diffusers import StableDiffusion3Pipeline

    folder = asset_path("shapes-sd3")
    assert StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None).vae is not None
    pipe = load_shapes_pipeline("shapes-sd3")
    pipe.set_progress_bar_config(disable=True)
    result = accuracy(pipe, heldout, 5.0, max_sequence_length=16)
    assert result["color"] >= 0.9 and result["position"] >= 0.9 and result["shape"] >= MIN_SD3_SHAPE


def test_shapes_clip_retrieves_the_captions_of_real_held_out_images():
    import open_clip

    folder = asset_path("shapes-clip")
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    world = load_world()
    every, heldout = world.all_scenes(), world.heldout_scenes()
    with torch.no_grad():
        text = model.eval().encode_text(tokenizer([world.caption(s) for s in every]), normalize=True)
        images = model.encode_image(world.render(heldout, torch.Generator().manual_seed(3)), normalize=True)
    best = (images @ text.T).argmax(-1).tolist()
    assert sum(every[i] == scene for i, scene in zip(best, heldout, strict=True)) >= 6  # of 8


def test_shipped_scorer_reads_every_attribute_of_real_images(heldout):
    world, scorer, scenes, _ = heldout
    images = world.render(scenes * 4, torch.Generator().manual_seed(5))
    assert all(value == 1.0 for value in scorer.accuracy(images, scenes * 4, world).values())


@pytest.mark.parametrize("name", ["shapes-sd", "shapes-sd3"])
def test_adaptive_guidance_and_shipped_linear_ag_save_passes_and_keep_accuracy(heldout, name):
    from guidance import AdaptiveGuidance, LinearAdaptiveGuidance
    from guidance.shapes.assets import ASSETS

    pipe = load_shapes_pipeline(name)
    pipe.set_progress_bar_config(disable=True)
    world, scorer, scenes, captions = heldout
    extra = {"max_sequence_length": 16} if name == "shapes-sd3" else {}
    linear = LinearAdaptiveGuidance.from_pretrained(ASSETS / "linear-ag" / f"{name}-20")
    results = {}
    for method, policy in {"cfg": ClassifierFreeGuidance(7.5), "ag": AdaptiveGuidance(7.5), "linear": linear}.items():
        generators = [torch.Generator().manual_seed(0) for _ in captions]
        out = pipe(captions, num_inference_steps=20, generator=generators, output_type="pt", guidance=policy, **extra)
        results[method] = (out.trace.nfe, scorer.accuracy(out.images * 2 - 1, scenes, world))
    assert results["cfg"][0] == 40 and results["ag"][0] <= 30 and results["linear"][0] == 24
    # measured: shapes-sd3 within 1 point of CFG (2 seeds); shapes-sd 5-7 points under it on 2 seeds and 12.5
    # points of shape on this seed alone (docs/shapes-world.md: it needs guidance until late)
    tolerance = {"shapes-sd": 0.15, "shapes-sd3": 0.05}[name]
    for method in ("ag", "linear"):
        for attribute in ("color", "shape"):
            assert results[method][1][attribute] >= results["cfg"][1][attribute] - tolerance, (method, attribute)
    with pytest.raises(ValueError, match=r"fitted for \w+Scheduler with 20 inference steps \(20 timesteps\)"):
        pipe(captions[:1], num_inference_steps=10, guidance=linear, **extra)


def test_shipped_dynamic_guidance_evaluators_load_and_score_in_the_pipeline():
    from guidance import DynamicGuidance
    from guidance.evaluators.discriminator import FidelityDiscriminator
    from guidance.evaluators.latent import LatentEvaluator
    from guidance.shapes.assets import ASSETS

    evaluators = [
        FidelityDiscriminator.from_pretrained(ASSETS / "shapes-sd-fidelity"),
        LatentEvaluator.from_pretrained(ASSETS / "shapes-sd-latent-clip"),
        LatentEvaluator.from_pretrained(ASSETS / "shapes-sd-latent-fidelity", name="latent-fidelity"),
    ]
    world = load_world()
    real = world.render(world.sample(32, seeded(4)), seeded(4))
    assert (evaluators[0].logits(real) > 0).float().mean() >= 0.9  # real images look real to it
    pipe = load_shapes_pipeline("shapes-sd")
    pipe.set_progress_bar_config(disable=True)
    result = pipe(
        ["a large blue square at the top on gray"] * 2,
        num_inference_steps=4,
        guidance=DynamicGuidance(evaluators=evaluators),
    )
    assert result.trace.nfe == 8.0
    assert set(result.trace.extras[0]["candidate_scores"]) == {"fidelity", "latent-clip", "latent-fidelity"}


@pytest.mark.parametrize("timestep", [0, 300, 600])
def test_shipped_latent_clip_head_prefers_the_true_caption_of_noisy_real_latents(heldout, timestep):
    from dataclasses import replace

    from guidance.evaluators import Candidates
    from guidance.evaluators.latent import LatentEvaluator
    from guidance.shapes.assets import ASSETS
    from guidance.vae import encode

    world, _, scenes, captions = heldout
    pipe = load_shapes_pipeline("shapes-sd")
    latents = encode(pipe.vae, world.render(scenes, seeded(1)))
    alpha = pipe.scheduler.alphas_cumprod[timestep]
    noisy = alpha.sqrt() * latents + (1 - alpha).sqrt() * torch.randn(latents.shape, generator=seeded(2))
    colors = world.values["color"]
    wrong = [world.caption(replace(s, color=colors[(colors.index(s.color) + 1) % len(colors)])) for s in scenes]
    head = LatentEvaluator.from_pretrained(ASSETS / "shapes-sd-latent-clip")
    at = torch.full((len(scenes),), float(timestep))
    true_score = head.score(Candidates(noisy, at, prompts=captions))
    wrong_score = head.score(Candidates(noisy, at, prompts=wrong))
    assert (true_score > wrong_score).float().mean() >= 0.9


def test_dynamic_guidance_with_the_shipped_latent_heads_follows_held_out_captions(heldout):
    from guidance import DynamicGuidance
    from guidance.evaluators.latent import LatentEvaluator
    from guidance.shapes.assets import ASSETS

    world, scorer, scenes, captions = heldout
    heads = [LatentEvaluator.from_pretrained(ASSETS / f"shapes-sd-latent-{kind}") for kind in ("clip", "fidelity")]
    policy = DynamicGuidance(candidates=[5.0, 7.5, 10.0, 15.0], evaluators=heads)
    pipe = load_shapes_pipeline("shapes-sd")
    pipe.set_progress_bar_config(disable=True)
    generators = [torch.Generator().manual_seed(0) for _ in captions]
    result = pipe(captions, num_inference_steps=20, generator=generators, output_type="pt", guidance=policy)
    accuracy = scorer.accuracy(result.images * 2 - 1, scenes, world)
    assert accuracy["color"] >= MIN_SD_COLOR and accuracy["shape"] >= MIN_SD_SHAPE
    assert result.trace.extras[0]["lookahead"] == "next_latent" and result.trace.nfe == 40
    chosen = result.trace.scales_tensor()
    assert chosen.min() >= 5.0 and chosen.max() <= 15.0 and chosen.std() > 0  # it does choose, per step and sample
