"""The sampler's public stages: prepare, denoise (any number of times, from any index), decode, image_to_latents;
and no per-call state on the pipeline (threads)."""

import threading

import numpy as np
import pytest
import torch
from conftest import REFERENCE, build, call_kwargs, seeded
from diffusers import (
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
)

from guidance import ClassifierFreeGuidance, GuidanceScheduler
from pipelines import DenoiseOutput, GuidedInputs

FAMILIES = list(REFERENCE)


def prepared(pipe, family, **overrides):
    kwargs = call_kwargs(family, prompt=["a red circle", "a blue square"], negative_prompt=["green", "black"])
    kwargs.pop("output_type")
    return pipe.prepare(**{**kwargs, **overrides}, generator=seeded())


@pytest.mark.parametrize("family", FAMILIES)
def test_the_stages_compose_to_the_call(family):
    pipe = build(family)
    inputs = prepared(pipe, family)
    assert isinstance(inputs, GuidedInputs) and inputs.batch_size == 2 and inputs.num_timesteps == 3
    assert inputs.prompts == ["a red circle", "a blue square"]
    result = pipe.denoise(inputs, ClassifierFreeGuidance(4.0))
    assert isinstance(result, DenoiseOutput) and result.trace.nfe == 6.0
    images = pipe.decode(result.latents, inputs, output_type="np").images
    kwargs = call_kwargs(family, prompt=["a red circle", "a blue square"], negative_prompt=["green", "black"])
    expected = pipe(**kwargs, generator=seeded(), guidance=ClassifierFreeGuidance(4.0)).images
    assert np.abs(images - expected).max() == 0


@pytest.mark.parametrize(
    ("family", "scheduler"), [("sd", None), ("sd", DPMSolverMultistepScheduler), ("sd3", None), ("flux", None)]
)
def test_denoise_runs_again_on_the_same_inputs(family, scheduler):
    """Each call steps a fresh copy of the prepared scheduler (multistep history included)."""
    pipe = build(family)
    if scheduler is not None:
        pipe.scheduler = scheduler.from_config(pipe.scheduler.config)
    inputs = prepared(pipe, family)
    before = inputs.latents.clone()
    first = pipe.denoise(inputs, ClassifierFreeGuidance(4.0)).latents
    for _ in range(3):
        assert torch.equal(pipe.denoise(inputs, ClassifierFreeGuidance(4.0)).latents, first)
    assert torch.equal(inputs.latents, before)  # the prepared inputs are never changed


@pytest.mark.parametrize(
    ("family", "scheduler"),
    [("sd", None), ("sd", EulerDiscreteScheduler), ("sd", HeunDiscreteScheduler), ("sd3", None), ("flux", None)],
)
def test_denoise_from_a_later_index_continues_a_run(family, scheduler):
    """f(z) of FlowOpt: the latents at step k, denoised from index k, end where the whole run ends (Heun: index 2 is
    its second step's first evaluation)."""
    pipe = build(family)
    if scheduler is not None:
        pipe.scheduler = scheduler.from_config(pipe.scheduler.config)
    inputs = prepared(pipe, family, num_inference_steps=5)
    seen = {}

    def keep(pipe, i, t, tensors):
        seen[i] = tensors["latents"].clone()
        return {}

    whole = pipe.denoise(inputs, ClassifierFreeGuidance(4.0), callback_on_step_end=keep)
    tail = pipe.denoise(inputs, ClassifierFreeGuidance(4.0), latents=seen[1], start_index=2)
    torch.testing.assert_close(tail.latents, whole.latents, rtol=0, atol=1e-5)
    assert tail.trace.num_steps == inputs.num_timesteps - 2 and tail.trace.nfe == 2 * tail.trace.num_steps


def test_a_start_inside_a_step_is_refused():
    """Heun evaluates twice per step; starting at a second evaluation would step with no first one (dt = 0)."""
    pipe = build("sd")
    pipe.scheduler = HeunDiscreteScheduler.from_config(pipe.scheduler.config)
    inputs = prepared(pipe, "sd", num_inference_steps=5)
    with pytest.raises(
        ValueError,
        match=r"`start_index` 3 falls inside a step of HeunDiscreteScheduler .* use one of "
        r"\[0, 2, 4, 6, 8\]",
    ):
        pipe.denoise(inputs, ClassifierFreeGuidance(4.0), latents=inputs.latents, start_index=3)


@pytest.mark.parametrize(("scheduler", "extra"), [(EulerAncestralDiscreteScheduler, {}), (None, {"eta": 0.7})])
def test_denoise_repeats_with_a_stochastic_sampler(scheduler, extra):
    """Each call draws from copies of the generators as `prepare` left them, so that it can run again."""
    pipe = build("sd")
    if scheduler is not None:
        pipe.scheduler = scheduler.from_config(pipe.scheduler.config)
    inputs = prepared(pipe, "sd", **extra)
    first = pipe.denoise(inputs, ClassifierFreeGuidance(4.0)).latents
    assert torch.equal(pipe.denoise(inputs, ClassifierFreeGuidance(4.0)).latents, first)
    kwargs = call_kwargs("sd", prompt=["a red circle", "a blue square"], negative_prompt=["green", "black"], **extra)
    called = pipe(**{**kwargs, "output_type": "latent"}, generator=seeded(), guidance=ClassifierFreeGuidance(4.0))
    assert torch.equal(called.images, first)


@pytest.mark.parametrize("family", FAMILIES)
def test_image_to_latents_gives_latents_in_the_denoisers_layout(family):
    pipe = build(family)
    inputs = prepared(pipe, family)
    image = np.random.default_rng(0).random((2, 16, 16, 3)).astype(np.float32)
    latents = pipe.image_to_latents(image)
    assert latents.shape == inputs.latents.shape and torch.isfinite(latents).all()
    pixels = torch.from_numpy(image).permute(0, 3, 1, 2) * 2 - 1
    mode = pipe.vae.encode(pixels).latent_dist.mode()
    shift = pipe.vae.config.shift_factor or 0.0
    torch.testing.assert_close(pipe.unpack_latents(latents, 16, 16), (mode - shift) * pipe.vae.config.scaling_factor)


def test_encode_then_decode_reconstructs_a_shapes_world_image():
    from guidance.shapes.assets import load_world
    from pipelines.application.models import load_shapes_pipeline

    world = load_world()
    scenes = world.heldout_scenes()[:4]
    images = world.render(scenes, seeded())  # in [-1, 1]
    pipe = load_shapes_pipeline("shapes-sd")
    inputs = pipe.prepare(prompt=[world.caption(s) for s in scenes], num_inference_steps=2)
    latents = pipe.image_to_latents((images + 1) / 2)
    decoded = pipe.decode(latents, inputs, output_type="pt").images * 2 - 1
    psnr = 10 * torch.log10(4 / (decoded - images).pow(2).mean())
    assert psnr > 25


class TupleCombine(GuidanceScheduler):
    def branches(self, step):
        return ClassifierFreeGuidance(2.0).branches(step)

    def combine(self, step, request, predictions):
        return predictions["cond"], torch.ones(step.batch_size)


def test_bad_stage_arguments_are_named(sd_pipe):
    inputs = prepared(sd_pipe, "sd")
    policy = ClassifierFreeGuidance(2.0)
    with pytest.raises(TypeError, match="`inputs` must be the GuidedInputs of `prepare`, got dict"):
        sd_pipe.denoise({}, policy)
    with pytest.raises(ValueError, match=r"`start_index` must be an int in \[0, 2\], got 3"):
        sd_pipe.denoise(inputs, policy, start_index=3)
    with pytest.raises(TypeError, match="`start_index` must be an int, got float"):
        sd_pipe.denoise(inputs, policy, start_index=1.0)
    with pytest.raises(ValueError, match=r"`latents` must have the prepared shape \(2, 4, 8, 8\), got \(1, 4, 8, 8\)"):
        sd_pipe.denoise(inputs, policy, latents=inputs.latents[:1])
    with pytest.raises(TypeError, match="`guidance` must be a GuidanceScheduler or None, got str"):
        sd_pipe.denoise(inputs, "cfg")
    with pytest.raises(ValueError, match=r"`latents` are required with `start_index` 1: the prepared latents are"):
        sd_pipe.denoise(inputs, policy, start_index=1)
    with pytest.raises(TypeError, match=r"`TupleCombine.combine` must return a GuidedPrediction, got tuple"):
        sd_pipe.denoise(inputs, TupleCombine())
    with pytest.raises(ValueError, match="`guidance_scale` and `guidance` cannot both be given"):
        sd_pipe.prepare(prompt="x", guidance_scale=3.0)


def test_a_call_leaves_the_pipelines_scheduler_as_found(sd_pipe):
    sd_pipe.scheduler.set_timesteps(7)
    timesteps = sd_pipe.scheduler.timesteps.clone()
    sd_pipe(**call_kwargs("sd", prompt="x", num_inference_steps=3), guidance=ClassifierFreeGuidance(3.0))
    assert torch.equal(sd_pipe.scheduler.timesteps, timesteps)


@pytest.fixture
def one_intra_op_thread():
    """With two intra-op threads, about 1 run in 300 of two Python threads on one CPU pipeline differs by up to 0.16
    (measured; never with one thread, and a thread count change alone moves the images by 7e-7): a torch CPU effect,
    not per-call state, which is what the test below is about."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_two_threads_on_one_pipeline_get_their_own_results(one_intra_op_thread):
    pipe = build("sd")
    jobs = {
        "a": dict(prompt=["a red circle", "a big square"], num_inference_steps=3, negative_prompt=["x", "y"]),
        "b": dict(prompt=["a blue triangle"], num_inference_steps=5, num_images_per_prompt=2),
    }

    def run(job):
        kwargs = call_kwargs("sd", **jobs[job])
        return pipe(**kwargs, generator=seeded(ord(job)), guidance=ClassifierFreeGuidance(5.0)).images

    expected = {job: run(job) for job in jobs}
    results, errors = {job: [] for job in jobs}, []

    def worker(job):
        try:
            for _ in range(6):
                results[job].append(run(job))
        except Exception as error:  # reported below, so that a failure names its thread
            errors.append((job, error))

    threads = [threading.Thread(target=worker, args=(job,)) for job in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    for job in jobs:
        assert all(np.array_equal(images, expected[job]) for images in results[job]), job


def test_an_interrupt_stops_only_its_own_thread():
    pipe = build("sd")
    started, finished = threading.Event(), {}

    def stop_at_once(pipe, i, t, tensors):
        pipe._interrupt = True
        started.set()
        return {}

    def slow(pipe, i, t, tensors):
        started.wait(timeout=10)
        return {}

    def run(name, callback, steps):
        out = pipe(
            **call_kwargs("sd", prompt="x", num_inference_steps=steps),
            guidance=ClassifierFreeGuidance(2.0),
            callback_on_step_end=callback,
        )
        finished[name] = out.trace.num_steps

    threads = [
        threading.Thread(target=run, args=("stopper", stop_at_once, 4)),
        threading.Thread(target=run, args=("other", slow, 4)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert finished == {"stopper": 1, "other": 4}
    assert pipe.interrupt is False  # this thread's flag was never set
