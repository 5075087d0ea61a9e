"""Behaviour of the shared guided loop: branch skipping, trace, callbacks, outputs, loading, errors."""

import numpy as np
import pytest
import torch
from conftest import REFERENCE, build, call_kwargs, seeded

from guidance import BranchRequest, ClassifierFreeGuidance
from pipelines import GuidedStableDiffusionPipeline, GuidedStableDiffusionPipelineOutput


class FirstSampleOnly(ClassifierFreeGuidance):
    """CFG for sample 0 only; the other samples get the conditional pass alone. Keeps what `combine` received."""

    def reset(self, run):
        super().reset(run)
        self.history = []

    def combine(self, step, request, predictions):
        self.history.append(predictions)
        return super().combine(step, request, predictions)

    def branches(self, step):
        mask = torch.zeros(step.latents.shape[0], dtype=torch.bool)
        mask[0] = True
        return BranchRequest.full(step.latents.shape[0], uncond=mask)


def count_rows(model):
    rows = []
    handle = model.register_forward_pre_hook(
        lambda module, args, kwargs: rows.append(len(args[0] if args else kwargs["hidden_states"])), with_kwargs=True
    )
    return rows, handle


@pytest.mark.parametrize("family", list(REFERENCE))
def test_skipped_branch_really_removes_the_rows(family):
    pipe = build(family)
    denoiser = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
    latents_shape = (2, 4, 8, 8) if family != "flux" else (2, 16, 16)
    latents = torch.randn(latents_shape, generator=seeded(3))
    prompts = ["a red circle", "a blue square"]
    rows, handle = count_rows(denoiser)
    try:
        result = pipe(**call_kwargs(family, prompt=prompts, latents=latents), guidance=FirstSampleOnly(5.0))
    finally:
        handle.remove()
    assert rows == [3, 3, 3]  # uncond for sample 0, cond for both
    assert result.trace.nfe == 4.5
    assert result.trace.branches[0]["uncond"] == [True, False]
    assert result.trace.scales == [[5.0, 1.0]] * 3
    # each row equals the same sample generated alone with its own policy
    alone_guided = pipe(
        **call_kwargs(family, prompt=prompts[0], latents=latents[:1]), guidance=ClassifierFreeGuidance(5.0)
    )
    alone_plain = pipe(
        **call_kwargs(family, prompt=prompts[1], latents=latents[1:]), guidance=ClassifierFreeGuidance(1.0)
    )
    assert np.abs(result.images[0] - alone_guided.images[0]).max() <= 1e-4
    assert np.abs(result.images[1] - alone_plain.images[0]).max() <= 1e-4


def test_history_marks_rows_that_did_not_run(sd_pipe):
    policy = FirstSampleOnly(3.0)
    sd_pipe(**call_kwargs("sd", prompt=["a", "b"]), guidance=policy)
    assert len(policy.history) == 3
    uncond = policy.history[0]["uncond"]
    assert torch.isfinite(uncond[0]).all() and torch.isnan(uncond[1]).all()
    assert torch.isfinite(policy.history[0]["cond"]).all()


@pytest.mark.parametrize(
    ("policy", "nfe"),
    [
        (ClassifierFreeGuidance(7.5), 10.0),
        (ClassifierFreeGuidance(1.0), 5.0),
        (ClassifierFreeGuidance(7.5, start=0.5, stop=1.0), 8.0),  # progress 0, .25 unguided
    ],
)
def test_trace_counts_nfe(sd_pipe, policy, nfe):
    result = sd_pipe(**call_kwargs("sd", prompt="a red circle", num_inference_steps=5), guidance=policy)
    assert result.trace.nfe == nfe
    assert result.trace.num_steps == 5


def test_interval_scales_are_one_outside(sd_pipe):
    result = sd_pipe(
        **call_kwargs("sd", prompt="x", num_inference_steps=5), guidance=ClassifierFreeGuidance(7.5, start=0.5)
    )
    assert result.trace.scales == [[1.0], [1.0], [7.5], [7.5], [7.5]]


def test_callback_on_step_end_sees_and_replaces_latents(sd_pipe):
    seen = []

    def callback(pipe, i, t, tensors):
        seen.append((i, tuple(tensors["latents"].shape), tuple(tensors["prompt_embeds"].shape)))
        if i == 1:
            pipe._interrupt = True
        return {"latents": tensors["latents"]}

    result = sd_pipe(
        **call_kwargs("sd", prompt="x"),
        guidance=ClassifierFreeGuidance(3.0),
        callback_on_step_end=callback,
        callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"],
    )
    assert [i for i, _, _ in seen] == [0, 1]  # interrupted after step 1, as in diffusers
    assert seen[0][1] == (1, 4, 8, 8)
    assert result.trace.num_steps == 2


def test_return_dict_false_appends_the_trace(sd_pipe):
    images, nsfw, trace = sd_pipe(
        **call_kwargs("sd", prompt="x"), guidance=ClassifierFreeGuidance(2.0), return_dict=False
    )
    assert images.shape == (1, 16, 16, 3) and nsfw is None and trace.nfe == 6.0


def test_without_guidance_it_is_the_diffusers_pipeline(sd_pipe):
    result = sd_pipe(**call_kwargs("sd", prompt="x"), generator=seeded(), guidance_scale=3.0)
    assert not hasattr(result, "trace") or result.trace is None
    guided = sd_pipe(**call_kwargs("sd", prompt="x"), generator=seeded(), guidance=ClassifierFreeGuidance(3.0))
    assert isinstance(guided, GuidedStableDiffusionPipelineOutput)
    assert np.abs(result.images - guided.images).max() <= 1e-4


def test_from_pretrained_and_from_pipe(tmp_path):
    reference = build("sd", guided=False)
    reference.save_pretrained(tmp_path / "sd")
    loaded = GuidedStableDiffusionPipeline.from_pretrained(tmp_path / "sd")
    loaded.set_progress_bar_config(disable=True)
    from_pipe = GuidedStableDiffusionPipeline.from_pipe(reference)
    assert isinstance(loaded, GuidedStableDiffusionPipeline) and isinstance(from_pipe, GuidedStableDiffusionPipeline)
    assert from_pipe.unet is reference.unet
    expected = reference(**call_kwargs("sd", prompt="x"), generator=seeded(), guidance_scale=5.0).images
    for pipe in (loaded, from_pipe):
        pipe.set_progress_bar_config(disable=True)
        images = pipe(**call_kwargs("sd", prompt="x"), generator=seeded(), guidance=ClassifierFreeGuidance(5.0)).images
        assert np.abs(images - expected).max() <= 1e-4


def test_missing_model_folder_names_the_path(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ValueError, match=f"not an existing folder nor a hub id: '{missing}'"):
        GuidedStableDiffusionPipeline.from_pretrained(missing)
    with pytest.raises(ValueError, match="not an existing folder nor a hub id: './models/sd'"):
        GuidedStableDiffusionPipeline.from_pretrained("./models/sd")


def test_guidance_must_be_a_guidance_scheduler(sd_pipe):
    with pytest.raises(TypeError, match="`guidance` must be a GuidanceScheduler or None, got float"):
        sd_pipe(**call_kwargs("sd", prompt="x"), guidance=7.5)


def test_guidance_scale_and_guidance_are_exclusive(sd_pipe):
    with pytest.raises(ValueError, match="`guidance_scale` and `guidance` cannot both be given"):
        sd_pipe(**call_kwargs("sd", prompt="x"), guidance_scale=5.0, guidance=ClassifierFreeGuidance(5.0))
    flux = build("flux")
    with pytest.raises(ValueError, match="`true_cfg_scale` and `guidance` cannot both be given"):
        flux(**call_kwargs("flux", prompt="x"), true_cfg_scale=5.0, guidance=ClassifierFreeGuidance(5.0))


@pytest.mark.parametrize("family", list(REFERENCE))
def test_prompt_and_negative_prompt_batches_must_match(family):
    pipe = build(family)
    with pytest.raises(ValueError, match=r"`negative_prompt` must have the batch size of `prompt` \(2\), got 3"):
        pipe(
            **call_kwargs(family, prompt=["a", "b"], negative_prompt=["c", "d", "e"]),
            guidance=ClassifierFreeGuidance(),
        )


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"num_inference_steps": 0}, ValueError, r"`num_inference_steps` must be an int >= 1, got 0"),
        ({"num_inference_steps": 2.5}, TypeError, r"`num_inference_steps` must be an int, got float 2.5"),
        ({"num_images_per_prompt": 0}, ValueError, r"`num_images_per_prompt` must be an int >= 1, got 0"),
    ],
)
def test_step_and_image_counts_are_checked(sd_pipe, kwargs, error, message):
    with pytest.raises(error, match=message):
        sd_pipe("a red circle", **kwargs, guidance=ClassifierFreeGuidance())


def test_unsupported_arguments_are_refused(sd_pipe):
    with pytest.raises(
        ValueError,
        match=r"`skip_guidance_layers` is not supported together with `guidance` \(got "
        r"\[0\]\): call without `guidance` for diffusers' skip-layer guidance",
    ):
        build("sd3")(**call_kwargs("sd3", prompt="x"), skip_guidance_layers=[0], guidance=ClassifierFreeGuidance())
    with pytest.raises(
        ValueError, match=r"`callback_on_step_end_tensor_inputs` \['add_text_embeds'\] are not available"
    ):
        sd_pipe(
            **call_kwargs("sd", prompt="x"),
            guidance=ClassifierFreeGuidance(),
            callback_on_step_end=lambda *a: {},
            callback_on_step_end_tensor_inputs=["add_text_embeds"],
        )


def test_the_diffusers_classes_are_left_as_they_were():
    """Subclassing, never patching: diffusers' own `__call__` stays its own, without `guidance`."""
    import inspect

    for family in REFERENCE:
        diffusers_class, guided_class, _ = REFERENCE[family]
        assert diffusers_class.__call__.__module__.startswith("diffusers.pipelines")
        assert "guidance" not in inspect.signature(diffusers_class.__call__).parameters
        assert guided_class.__call__ is not diffusers_class.__call__ and issubclass(guided_class, diffusers_class)


def test_model_path_must_be_a_path_or_hub_id():
    with pytest.raises(
        TypeError, match="`pretrained_model_name_or_path` must be a local folder or a hub id .* got int"
    ):
        GuidedStableDiffusionPipeline.from_pretrained(42)


def test_deprecated_extra_arguments_are_refused_with_guidance(sd_pipe):
    with pytest.raises(ValueError, match=r"arguments \['callback_steps'\] are not supported together with `guidance`"):
        sd_pipe(**call_kwargs("sd", prompt="x"), callback_steps=1, guidance=ClassifierFreeGuidance())


def test_guidance_distilled_unet_is_refused():
    from diffusers import UNet2DConditionModel

    from pipelines.testing import tiny_components

    config = dict(tiny_components("sd")["unet"].config)
    unet = UNet2DConditionModel.from_config(config, time_cond_proj_dim=8).eval()
    with pytest.raises(
        ValueError, match="needs a UNet without a guidance embedding; this one has time_cond_proj_dim=8"
    ):
        build("sd", unet=unet)(**call_kwargs("sd", prompt="x"), guidance=ClassifierFreeGuidance())


def test_a_callback_that_replaces_the_prompt_embeddings_changes_the_following_steps(sd_pipe):
    """The run's conditioning is concatenated once and kept; a callback's replacement must reach the next steps."""
    kwargs = call_kwargs("sd", prompt="a red circle", negative_prompt="blue", num_inference_steps=4)

    def swap_at(step):
        def callback(pipe, i, t, tensors):
            return {"prompt_embeds": tensors["negative_prompt_embeds"]} if i == step else {}

        return callback

    names = ["prompt_embeds", "negative_prompt_embeds"]

    def run(callback):
        policy = ClassifierFreeGuidance(5.0)
        out = sd_pipe(
            **kwargs,
            generator=seeded(),
            guidance=policy,
            callback_on_step_end=callback,
            callback_on_step_end_tensor_inputs=names,
        )
        return out.images

    plain = run(None)
    assert np.abs(run(swap_at(3)) - plain).max() == 0  # after the last step: nothing left to change
    assert np.abs(run(swap_at(1)) - plain).max() > 1e-3
