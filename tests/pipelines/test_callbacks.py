"""diffusers' step-end callbacks under `guidance=` (pipelines/callbacks.py): diffusers' own CFG cut-off callbacks give
diffusers' images, `pipe.guidance_scale` and `pipe.do_classifier_free_guidance` read what the policy applies, and what
a policy cannot honour is an error naming the callback (failures 3 of the drop-in issue)."""

import numpy as np
import pytest
from conftest import REFERENCE, build, call_kwargs, seeded
from diffusers.callbacks import SD3CFGCutoffCallback, SDCFGCutoffCallback, SDXLCFGCutoffCallback

from guidance import ClassifierFreeGuidance, ScheduledGuidance

CUTOFFS = {"sd": SDCFGCutoffCallback, "sdxl": SDXLCFGCutoffCallback, "sd3": SD3CFGCutoffCallback}


@pytest.mark.parametrize("family", list(CUTOFFS))
def test_diffusers_cfg_cutoff_callbacks_give_diffusers_images(family):
    kwargs = call_kwargs(family, prompt="a red circle", negative_prompt="blue", num_inference_steps=5)
    _, _, scale_argument = REFERENCE[family]
    reference = build(family, guided=False)
    expected = reference(
        **kwargs, generator=seeded(), **{scale_argument: 5.0}, callback_on_step_end=CUTOFFS[family](0.4)
    ).images
    pipe = build(family)
    guided = pipe(
        **kwargs, generator=seeded(), guidance=ClassifierFreeGuidance(5.0), callback_on_step_end=CUTOFFS[family](0.4)
    )
    assert np.abs(guided.images - expected).max() <= 1e-5
    # the callback stops guidance at the end of step int(5 * 0.4) = 2: steps 3 and 4 run the conditional pass alone
    assert [step[0] for step in guided.trace.scales] == [5.0, 5.0, 5.0, 1.0, 1.0]
    assert [step["uncond"][0] for step in guided.trace.branches] == [True, True, True, False, False]
    assert guided.trace.extras[3]["guidance_stopped_by"] == CUTOFFS[family].__name__
    plain = pipe(**kwargs, generator=seeded(), guidance=ClassifierFreeGuidance(5.0)).images
    assert np.abs(guided.images - plain).max() > 1e-4  # the cut-off did change the run


def test_a_cutoff_before_the_first_step_for_a_batch_is_refused_with_the_tensor_named():
    """diffusers' SD cut-off keeps `prompt_embeds[-1:]`, one row: with two images neither diffusers nor a policy can
    go on, and the error says what was given and what was expected."""
    pipe = build("sd")
    with pytest.raises(
        ValueError, match=r"callback SDCFGCutoffCallback returned `prompt_embeds` with 1 rows; this run has 2 images"
    ):
        pipe(
            **call_kwargs("sd", prompt=["a", "b"]),
            guidance=ClassifierFreeGuidance(5.0),
            callback_on_step_end=SDCFGCutoffCallback(0.0),
        )


def test_the_guidance_scale_callbacks_read_is_what_the_policy_applies():
    pipe = build("sd")
    seen = []

    def record(pipeline, step, timestep, tensors):
        seen.append((pipeline.guidance_scale, pipeline.do_classifier_free_guidance, pipeline._guidance_scale))
        return tensors

    policy = ScheduledGuidance(2.0, final_guidance_scale=8.0, schedule="linear", stop=0.6)
    out = pipe(**call_kwargs("sd", prompt="x", num_inference_steps=4), guidance=policy, callback_on_step_end=record)
    assert [s for s, _, _ in seen] == [step[0] for step in out.trace.scales] == [2.0, 4.0, 1.0, 1.0]
    assert [cfg for _, cfg, _ in seen] == [True, True, False, False] and all(a == b for a, _, b in seen)


def test_a_scale_a_policy_decides_cannot_be_set_by_a_callback():
    pipe = build("sd")

    def louder(pipeline, step, timestep, tensors):
        pipeline._guidance_scale = 9.0
        return tensors

    with pytest.raises(
        ValueError, match=r"callback louder set `_guidance_scale` to 9.0: under `guidance=` the policy"
    ):
        pipe(**call_kwargs("sd", prompt="x"), guidance=ClassifierFreeGuidance(5.0), callback_on_step_end=louder)


def test_the_joined_prompt_embeddings_are_diffusers_layout_and_both_halves_can_change():
    pipe = build("sd")
    kwargs = call_kwargs("sd", prompt="a red circle", negative_prompt="blue", num_inference_steps=4)
    shapes = []

    def swap(pipeline, step, timestep, tensors):  # unconditional and conditional rows exchanged from step 1 on
        shapes.append(tuple(tensors["prompt_embeds"].shape))
        return {"prompt_embeds": tensors["prompt_embeds"].flip(0)} if step == 0 else {}

    swapped = pipe(
        **kwargs,
        generator=seeded(),
        guidance=ClassifierFreeGuidance(5.0),
        callback_on_step_end=swap,
        callback_on_step_end_tensor_inputs=["prompt_embeds"],
    )
    assert shapes[0][0] == 2  # the unconditional row, then the conditional one
    other = build("sd")
    exchanged = other(
        **{**kwargs, "prompt": "blue", "negative_prompt": "a red circle"},
        generator=seeded(),
        guidance=ClassifierFreeGuidance(5.0),
        callback_on_step_end=lambda *a: {},
    )
    first = pipe(**kwargs, generator=seeded(), guidance=ClassifierFreeGuidance(5.0)).images
    assert np.abs(swapped.images - first).max() > 1e-4 and np.abs(exchanged.images - first).max() > 1e-4


def test_a_callback_tensor_that_is_not_a_tensor_is_named():
    pipe = build("sd")
    with pytest.raises(TypeError, match=r"callback <lambda> returned `prompt_embeds` as list, not a tensor"):
        pipe(
            **call_kwargs("sd", prompt="x"),
            guidance=ClassifierFreeGuidance(5.0),
            callback_on_step_end=lambda p, i, t, k: {"prompt_embeds": [1]},
            callback_on_step_end_tensor_inputs=["prompt_embeds"],
        )


def flux_embeddings(pipe, prompt: str, length: int):
    embeds, pooled, _ = pipe.encode_prompt(prompt=prompt, prompt_2=prompt, max_sequence_length=length)
    return embeds, pooled


def test_flux_from_embeddings_alone_matches_diffusers_true_cfg():
    """Failure 4: a Flux pipeline without text encoders, given the prompt and negative embeddings."""
    encoder = build("flux")
    embeds, pooled = flux_embeddings(encoder, "a red circle", 16)
    negative, negative_pooled = flux_embeddings(encoder, "blue", 16)
    bare = {"text_encoder": None, "text_encoder_2": None, "tokenizer": None, "tokenizer_2": None}
    given = dict(
        prompt_embeds=embeds,
        pooled_prompt_embeds=pooled,
        negative_prompt_embeds=negative,
        negative_pooled_prompt_embeds=negative_pooled,
        num_inference_steps=3,
        height=16,
        width=16,
        output_type="np",
    )
    expected = build("flux", guided=False, **bare)(**given, true_cfg_scale=4.0, generator=seeded()).images
    result = build("flux", **bare)(**given, guidance=ClassifierFreeGuidance(4.0), generator=seeded())
    assert np.abs(result.images - expected).max() <= 1e-5 and result.trace.nfe == 6.0
    without = {k: v for k, v in given.items() if not k.startswith("negative")}
    with pytest.raises(
        ValueError,
        match=r"`guidance` needs the unconditional branch's embeddings: give "
        r"`negative_prompt_embeds` and `negative_pooled_prompt_embeds` \(this pipeline has no text",
    ):
        build("flux", **bare)(**without, guidance=ClassifierFreeGuidance(4.0))


def test_flux_prompt_and_negative_embeddings_of_different_lengths_match_diffusers_true_cfg():
    """Failure 4 too: the prompt's embeddings (4 tokens) and the negative prompt's (16) cannot share a batch; the two
    branches run as separate passes, as diffusers runs true CFG."""
    embeds, pooled = flux_embeddings(build("flux"), "a red circle", 4)
    given = dict(
        prompt_embeds=embeds,
        pooled_prompt_embeds=pooled,
        negative_prompt="blue",
        max_sequence_length=16,
        num_inference_steps=3,
        height=16,
        width=16,
        output_type="np",
    )
    expected = build("flux", guided=False)(**given, true_cfg_scale=4.0, generator=seeded()).images
    result = build("flux")(**given, guidance=ClassifierFreeGuidance(4.0), generator=seeded())
    assert np.abs(result.images - expected).max() <= 1e-5 and result.trace.nfe == 6.0
    assert embeds.shape[1] == 4
