"""FlowOpt's `invert` and `edit` and the FlowEdit baseline on tiny SD3 and Flux components: the solves are the
pipeline's own sampling, NFEs add up, batches, iterates, callbacks, guidance policies inside the solves, Flux's
embedded guidance and true CFG, crops, and every bad-input message."""

import logging

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import build, seeded
from diffusers import FluxTransformer2DModel

from guidance import AdaptiveGuidance, ClassifierFreeGuidance, ScheduledGuidance

FLOW = ["sd3", "flux"]
TEXT = {"max_sequence_length": 16}
SMALL = {"num_inference_steps": 4, "n_max": 3, **TEXT}
SOURCE, TARGET = "a red circle", "a blue square"


def source_images(count: int = 1, size: tuple[int, int] = (16, 16), seed: int = 0) -> list[PIL.Image.Image]:
    rng = np.random.RandomState(seed)
    return [PIL.Image.fromarray((rng.rand(*size, 3) * 255).astype(np.uint8)) for _ in range(count)]


@pytest.fixture(scope="module")
def pipes():
    return {family: build(family) for family in FLOW}


@pytest.fixture(scope="module")
def distilled_flux():
    """Flux with a guidance embedding, like FLUX.1-dev."""
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=[4, 4, 8],
        guidance_embeds=True,
    ).eval()
    return build("flux", transformer=transformer)


@pytest.mark.parametrize("family", FLOW)
@pytest.mark.parametrize("guidance", [None, ClassifierFreeGuidance(2.0)])
def test_iterate_zero_is_the_pipelines_own_sampling_from_the_inverted_noise(pipes, family, guidance):
    pipe = pipes[family]
    kwargs = {"num_inference_steps": 4, "n_max": 4, "iterations": 0, "output_type": "np", **TEXT}
    edit = pipe.edit(source_images(), SOURCE, TARGET, guidance=guidance, **kwargs)
    policy = guidance or ClassifierFreeGuidance(1.0 if family == "flux" else 3.5)
    sampled = pipe(
        TARGET,
        latents=edit.latents,
        num_inference_steps=4,
        height=16,
        width=16,
        guidance=policy,
        output_type="np",
        **TEXT,
    ).images
    np.testing.assert_allclose(edit.images, sampled, atol=1e-5)
    assert edit.size == (16, 16) and edit.latents.dtype == torch.float32


@pytest.mark.parametrize("family", FLOW)
def test_model_evaluations_add_up(pipes, family):
    pipe = pipes[family]
    edit = pipe.edit(source_images(), SOURCE, TARGET, iterations=2, step_size=0.01, output_type="np", **SMALL)
    branches = 1 if family == "flux" else 2  # Flux's default carries the scale in its embedding; SD3 runs CFG
    assert edit.nfe == (3 + 1) + 3 * 3 * branches  # UniInv (n_max + 1), then 3 solves of n_max steps
    inverted = pipe.invert(source_images(), SOURCE, iterations=2, step_size=0.01, output_type="np", **SMALL)
    assert inverted.nfe == 4 + 3 * 3  # inversion solves at guidance 1: one branch
    assert len(edit.residuals) == 3 and len(edit.step_sizes) == 3 and edit.stopped == "iterations"


@pytest.mark.parametrize("family", FLOW)
def test_iterates_are_the_images_of_every_iteration_and_the_last_is_the_result(pipes, family):
    edit = pipes[family].edit(
        source_images(), SOURCE, TARGET, iterations=2, step_size=0.05, return_iterates=True, output_type="np", **SMALL
    )
    assert len(edit.iterates) == 3 and edit.iterates[0].shape == (1, 16, 16, 3)
    np.testing.assert_array_equal(edit.iterates[-1], edit.images)
    assert not np.array_equal(edit.iterates[0], edit.iterates[-1])
    pil = pipes[family].edit(source_images(), SOURCE, TARGET, iterations=0, **SMALL)
    assert isinstance(pil.images[0], PIL.Image.Image) and pil.iterates is None


@pytest.mark.parametrize("family", FLOW)
def test_inversion_with_auto_step_never_increases_the_residual(pipes, family):
    inverted = pipes[family].invert(
        source_images(), SOURCE, iterations=4, step_size="auto", generator=seeded(0), output_type="np", **SMALL
    )
    residuals = [step[0] for step in inverted.residuals]
    assert all(b <= a for a, b in zip(residuals, residuals[1:], strict=False))
    assert residuals[-1] < residuals[0]


def test_a_batch_of_images_edits_as_each_image_alone(pipes):
    pipe = pipes["sd3"]
    images, sources, targets = source_images(2), [SOURCE, "a green square"], [TARGET, "a yellow circle"]
    together = pipe.edit(images, sources, targets, iterations=2, step_size=0.05, output_type="np", **SMALL)
    assert together.images.shape == (2, 16, 16, 3) and together.latents.shape[0] == 2
    for k in range(2):
        alone = pipe.edit(images[k], sources[k], targets[k], iterations=2, step_size=0.05, output_type="np", **SMALL)
        np.testing.assert_allclose(together.images[k], alone.images[0], atol=1e-4)
        assert together.residuals[-1][k] == pytest.approx(alone.residuals[-1][0], rel=1e-4)
    one_prompt = pipe.edit(images, SOURCE, TARGET, iterations=0, output_type="np", **SMALL)
    assert one_prompt.images.shape[0] == 2  # one prompt pair for every image


def test_the_iteration_callback_streams_and_stops(pipes):
    seen = []

    def callback(pipe, iteration, tensors):
        seen.append((iteration, tensors["latents"].shape, len(tensors["residuals"])))
        return {"stop": True} if iteration == 1 else None

    edit = pipes["sd3"].edit(
        source_images(),
        SOURCE,
        TARGET,
        iterations=5,
        step_size=0.05,
        callback_on_iteration=callback,
        output_type="np",
        **SMALL,
    )
    assert [s[0] for s in seen] == [0, 1] and seen[0][2] == 1
    assert edit.stopped == "callback" and len(edit.residuals) == 2
    assert edit.nfe == 4 + 2 * 3 * 2


def test_step_callbacks_reach_every_solve(pipes):
    steps = []

    def on_step(pipe, index, timestep, tensors):
        steps.append(index)
        return {}

    pipes["sd3"].edit(
        source_images(),
        SOURCE,
        TARGET,
        iterations=1,
        step_size=0.05,
        callback_on_step_end=on_step,
        output_type="np",
        **SMALL,
    )
    assert steps == [1, 2, 3] * 2  # two solves from grid index T - n_max = 1


def test_adaptive_and_scheduled_guidance_run_inside_the_solves(pipes):
    pipe = pipes["sd3"]
    kwargs = {"iterations": 2, "step_size": 0.05, "output_type": "np", **SMALL}
    cfg = pipe.edit(source_images(), SOURCE, TARGET, guidance=ClassifierFreeGuidance(3.5), **kwargs)
    ag = pipe.edit(source_images(), SOURCE, TARGET, guidance=AdaptiveGuidance(3.5, threshold=1e-6), **kwargs)
    assert ag.nfe == 4 + 3 * (3 + 1)  # AG stops CFG after the first guided step of every solve
    assert cfg.nfe == 4 + 3 * 3 * 2 and not np.allclose(ag.images, cfg.images)
    scheduled = pipe.edit(
        source_images(), SOURCE, TARGET, guidance=ScheduledGuidance(7.0, final_guidance_scale=1.0), **kwargs
    )
    assert scheduled.nfe == 4 + 3 * (2 + 2 + 1)  # the schedule runs over the whole grid: scale 1 at its last step
    assert not np.allclose(scheduled.images, cfg.images)


def test_flux_embedded_guidance_and_true_cfg(distilled_flux):
    kwargs = {"iterations": 1, "step_size": 0.01, "output_type": "np", **SMALL}
    low = distilled_flux.edit(source_images(), SOURCE, TARGET, guidance_scale=1.0, **kwargs)
    high = distilled_flux.edit(source_images(), SOURCE, TARGET, guidance_scale=3.5, **kwargs)
    assert low.nfe == high.nfe == 4 + 2 * 3 and not np.allclose(low.images, high.images)
    parity = distilled_flux.edit(
        source_images(),
        SOURCE,
        TARGET,
        guidance_scale=3.5,
        num_inference_steps=4,
        n_max=4,
        iterations=0,
        output_type="np",
        **TEXT,
    )
    sampled = distilled_flux(
        TARGET,
        latents=parity.latents,
        num_inference_steps=4,
        height=16,
        width=16,
        guidance_scale=3.5,
        output_type="np",
        **TEXT,
    ).images
    np.testing.assert_allclose(parity.images, sampled, atol=1e-5)
    true_cfg = distilled_flux.edit(
        source_images(), SOURCE, TARGET, guidance=ClassifierFreeGuidance(2.0), negative_prompt="blurry", **kwargs
    )
    assert true_cfg.nfe == 4 + 2 * 3 * 2


@pytest.mark.parametrize("family", FLOW)
def test_flowedit_keeps_the_image_when_the_prompts_agree_and_edits_otherwise(pipes, family):
    pipe = pipes[family]
    same_guidance = {
        "source_guidance": ClassifierFreeGuidance(2.0),
        "target_guidance": ClassifierFreeGuidance(2.0),
        "source_guidance_scale": 2.0,
        "guidance_scale": 2.0,
    }
    kept = pipe.flowedit(
        source_images(), SOURCE, SOURCE, generator=seeded(0), output_type="latent", **SMALL, **same_guidance
    )
    source_latents = pipe.pixels_to_latents(pipe._source_images(source_images(), 1)[0])
    torch.testing.assert_close(kept.images.float(), source_latents, atol=1e-5, rtol=0)
    edited = pipe.flowedit(source_images(), SOURCE, TARGET, generator=seeded(0), output_type="np", **SMALL)
    branches = 1 if family == "flux" else 2
    assert edited.nfe == 2 * 3 * branches and edited.images.shape == (1, 16, 16, 3)
    assert edited.residuals[0][0] > 0


def test_images_are_cropped_to_the_models_multiple_and_said_so(pipes, caplog):
    pipe = pipes["sd3"]
    with caplog.at_level(logging.WARNING):
        edit = pipe.edit(source_images(size=(17, 19)), SOURCE, TARGET, iterations=0, output_type="np", **SMALL)
    assert edit.size == (16, 18) and edit.images.shape == (1, 16, 18, 3)
    assert "cropped the image from (17, 19) to (16, 18)" in caplog.text
    array = np.random.RandomState(0).rand(17, 19, 3).astype(np.float32)  # arrays are (H, W, C), as diffusers takes
    pixels, size = pipe._source_images(array, 1)
    assert size == (16, 18)
    np.testing.assert_allclose(pixels[0].permute(1, 2, 0).numpy(), array[:16, :18] * 2 - 1, atol=1e-6)


def test_half_precision_models_update_in_float32():
    pipe = build("sd3")
    pipe.to(dtype=torch.bfloat16)
    edit = pipe.edit(source_images(), SOURCE, TARGET, iterations=1, step_size=0.05, output_type="np", **SMALL)
    assert edit.latents.dtype == torch.float32 and np.isfinite(edit.images).all()


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda p: p.edit("image.png", SOURCE, TARGET), r"`image` must be a PIL image, an array \(H, W, C\) or a"),
        (lambda p: p.edit([], SOURCE, TARGET), r"`image` must be .* got \['an empty list'\]"),
        (lambda p: p.edit(np.zeros((16, 16)), SOURCE, TARGET), r"got \['ndarray\[16, 16\]'\]"),
        (lambda p: p.edit(source_images(3), [SOURCE] * 2, [TARGET] * 2), "`image` holds 3 images for 2 prompts"),
        (lambda p: p.edit(source_images(1) + source_images(1, (8, 8)), SOURCE, TARGET), "must share a size"),
        (lambda p: p.edit(source_images(size=(1, 1)), SOURCE, TARGET), "is smaller than 2 pixels"),
        (lambda p: p.edit(source_images(), SOURCE, TARGET, num_inference_steps=4, n_max=5), "`n_max` must be an int"),
        (lambda p: p.edit(source_images(), SOURCE, TARGET, n_max=0), r"`n_max` must be an int in \[1, "),
        (lambda p: p.edit(source_images(), SOURCE, TARGET, iterations=-1), "`iterations` must be an int >= 0, got -1"),
        (lambda p: p.edit(source_images(), SOURCE, TARGET, step_size=-1.0), "`step_size` must be a positive number"),
        (lambda p: p.invert(source_images(), SOURCE, step_size="fast"), "or 'auto', got 'fast'"),
        (lambda p: p.edit(source_images(), None, TARGET), "`source_prompt` must be a non-empty prompt"),
        (lambda p: p.edit(source_images(), SOURCE, ""), "`target_prompt` must be a non-empty prompt or a list"),
        (lambda p: p.invert(source_images(), []), "`source_prompt` must be a non-empty prompt"),
        (lambda p: p.edit(source_images(2), [SOURCE] * 2, [TARGET]), "`target_prompt` must have one prompt per"),
        (lambda p: p.flowedit(source_images(), SOURCE, TARGET, n_avg=0), "`n_avg` must be an int >= 1, got 0"),
        (
            lambda p: p.edit(source_images(size=(p.largest_side() + 2, 16)), SOURCE, TARGET),
            r"`image` of size \(\d+, 16\) is larger than this model takes: at most \d+ pixels a side",
        ),
    ],
)
def test_bad_input_is_rejected_with_the_argument_named(pipes, call, message):
    with pytest.raises(ValueError, match=message):
        call(pipes["sd3"])


@pytest.mark.parametrize("method", ["invert", "edit", "flowedit"])
def test_only_the_flow_families_edit(sd_pipe, method):
    from pipelines import GuidedFluxPipeline, GuidedStableDiffusion3Pipeline, GuidedStableDiffusionXLPipeline

    assert callable(getattr(GuidedStableDiffusion3Pipeline, method)) and callable(getattr(GuidedFluxPipeline, method))
    assert not hasattr(sd_pipe, method) and not hasattr(GuidedStableDiffusionXLPipeline, method)
