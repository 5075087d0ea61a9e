"""Our policies in diffusers' modular pipelines (`PolicyGuider` as the `guider` component), on tiny components built
offline: SDXL, SD3, Wan and Qwen-Image. Constant CFG gives diffusers' own guider's images bitwise; AG and LinearAG
take the unconditional batch out on the steps they skip (a forward hook counts the denoiser's calls and rows);
dynamic CFG adds no model pass; Self-NPO's adapter runs in the unconditional batch only; the trace is readable after.

Flux's modular pipeline (FluxAutoBlocks) has no guider component: FLUX.1 is guidance-distilled and its denoise step
calls the transformer once, with the guidance embedding; no guider can change it.
"""

import contextlib

import numpy as np
import pytest
import torch
from diffusers.guiders import ClassifierFreeGuidance as DiffusersCFG
from peft import LoraConfig

from guidance import (
    AdaptiveGuidance,
    ClassifierFreeGuidance,
    DynamicGuidance,
    GuiderScale,
    LinearAdaptiveGuidance,
    LinearAGCalibration,
    NegativeAdapter,
    ScheduledGuidance,
)
from guidance import vae as vae_latents
from guidance.evaluators import Evaluator, RewardEvaluator
from guidance.guider import PolicyGuider
from guidance.lora import active_adapters, lora_layers, set_active_adapters
from pipelines import GuidedStableDiffusion3Pipeline, GuidedStableDiffusionXLPipeline
from pipelines.testing import tiny_modular, tiny_qwenimage_embeddings

STEPS = 3
PROMPTS = {"prompt": ["a red circle", "a small blue square"], "negative_prompt": ["green", "a yellow triangle"]}


def call_kwargs(family: str) -> dict:
    if family == "qwenimage":
        return {**tiny_qwenimage_embeddings(2), "height": 32, "width": 32, "output": "images"}
    size = {"height": 16, "width": 16, "max_sequence_length": 16}
    if family == "wan":
        return {**PROMPTS, **size, "num_frames": 9, "output": "videos"}
    if family == "sd3":
        return {**PROMPTS, **size, "output": "images"}
    return {**PROMPTS, "height": 16, "width": 16, "output": "images"}


@pytest.fixture(scope="module")
def modular():
    pipes = {}

    def get(family):
        if family not in pipes:
            pipes[family] = tiny_modular(family)
        return pipes[family]

    return get


@contextlib.contextmanager
def counting(denoiser):
    """The rows of every call of `denoiser` (one entry per batch it ran)."""
    rows = []

    def count(module, args, kwargs):
        rows.append(len(args[0] if args else kwargs["hidden_states"]))

    handle = denoiser.register_forward_pre_hook(count, with_kwargs=True)
    try:
        yield rows
    finally:
        handle.remove()


def run(pipe, family, guider, **overrides):
    """(output as an array, rows of each denoiser call) of one call with `guider` as the pipeline's guider."""
    pipe.update_components(guider=guider)
    denoiser = pipe.unet if family == "sdxl" else pipe.transformer
    kwargs = {**call_kwargs(family), "num_inference_steps": STEPS, "output_type": "np", **overrides}
    with counting(denoiser) as rows:
        out = pipe(**kwargs, generator=torch.Generator().manual_seed(0))
    return np.asarray(out), rows


@pytest.mark.parametrize("family", ["sdxl", "sd3", "wan", "qwenimage"])
def test_constant_cfg_gives_diffusers_guider_images_bitwise(modular, family):
    pipe = modular(family)
    expected, expected_rows = run(pipe, family, DiffusersCFG(guidance_scale=4.0))
    guider = PolicyGuider(ClassifierFreeGuidance(4.0), pipeline=pipe)
    result, rows = run(pipe, family, guider)
    assert result.shape == expected.shape and np.array_equal(result, expected)
    assert rows == expected_rows == [2] * (2 * STEPS)  # one batch per condition, as diffusers
    assert guider.trace.nfe == 2 * STEPS and guider.trace.scales == [[4.0, 4.0]] * STEPS


def test_a_guidance_interval_and_cfg_at_scale_one_match_diffusers(modular):
    pipe = modular("sdxl")
    diffusers_interval = DiffusersCFG(guidance_scale=4.0, start=0.25, stop=0.75)
    expected, _ = run(pipe, "sdxl", diffusers_interval, num_inference_steps=4)
    wrapped = PolicyGuider(ClassifierFreeGuidance(GuiderScale(diffusers_interval.new())), pipeline=pipe)
    result, rows = run(pipe, "sdxl", wrapped, num_inference_steps=4)
    # diffusers' interval: int(start N) <= i < int(stop N), steps 1 and 2 of 4
    assert np.array_equal(result, expected) and rows == [2, 2, 2, 2, 2, 2]
    # ours is over the run's progress i / (N - 1): [0.3, 0.7] of 4 steps is steps 1 and 2 too
    native = PolicyGuider(ClassifierFreeGuidance(4.0, start=0.3, stop=0.7), pipeline=pipe)
    assert np.array_equal(run(pipe, "sdxl", native, num_inference_steps=4)[0], expected)
    unguided, unguided_rows = run(pipe, "sdxl", PolicyGuider(ClassifierFreeGuidance(1.0)))
    assert np.array_equal(unguided, run(pipe, "sdxl", DiffusersCFG(guidance_scale=1.0))[0])
    assert unguided_rows == [2] * STEPS


def classic(family, pipe):
    """The classic guided pipeline on the modular pipeline's own components."""
    text = ["text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"]
    names = ["unet", *text] if family == "sdxl" else ["transformer", *text, "text_encoder_3", "tokenizer_3"]
    cls = GuidedStableDiffusionXLPipeline if family == "sdxl" else GuidedStableDiffusion3Pipeline
    extra = {"image_encoder": None, "feature_extractor": None}
    guided = cls(**{name: getattr(pipe, name) for name in [*names, "vae", "scheduler"]}, **extra)
    guided.set_progress_bar_config(disable=True)
    return guided


def classic_run(pipe, family, policy, **overrides):
    kwargs = {**call_kwargs(family), "num_inference_steps": STEPS, "output_type": "np", **overrides}
    kwargs.pop("output")
    return pipe(**kwargs, generator=torch.Generator().manual_seed(0), guidance=policy)


def similarities(pipe, family):
    """Each row's AG similarity at step 0 (a threshold of 1 never ends CFG)."""
    probe = PolicyGuider(AdaptiveGuidance(4.0, threshold=1.0), pipeline=pipe)
    run(pipe, family, probe)
    return probe.trace.extras[0]["similarity"]


def test_adaptive_guidance_takes_the_unconditional_batch_out_and_the_trace_matches_the_classic_pipeline(modular):
    pipe = modular("sdxl")
    threshold = min(similarities(pipe, "sdxl")) - 1e-6
    guider = PolicyGuider(AdaptiveGuidance(4.0, threshold=threshold), pipeline=pipe)
    result, rows = run(pipe, "sdxl", guider)
    reference = classic_run(classic("sdxl", pipe), "sdxl", AdaptiveGuidance(4.0, threshold=threshold))
    uncond = [step["uncond"] for step in guider.trace.branches]
    assert uncond == [[True, True], [False, False], [False, False]]  # both rows converged at step 0
    assert rows == [2, 2, 2, 2] and guider.trace.nfe == 4.0  # steps 1 and 2: the conditional batch only
    assert guider.trace.branches == reference.trace.branches and guider.trace.scales == reference.trace.scales
    assert np.abs(result - reference.images).max() <= 1e-5
    again, _ = run(pipe, "sdxl", guider)  # the last step ran one batch: the next run still encodes the negatives
    assert np.array_equal(again, result) and guider.trace.nfe == 4.0


def test_the_batch_rules_on_rows_that_converge_at_different_steps(modular):
    """SDXL's denoise step feeds every row's latents itself: "any" keeps the unconditional batch while a row asks for
    it, "all" drops it once a row converged, and "per_row" is refused by name."""
    pipe = modular("sdxl")
    threshold = sum(similarities(pipe, "sdxl")) / 2  # between the two rows' similarities at step 0
    any_rows = run(pipe, "sdxl", PolicyGuider(AdaptiveGuidance(4.0, threshold=threshold), pipeline=pipe))[1]
    all_guider = PolicyGuider(AdaptiveGuidance(4.0, threshold=threshold), batch_rule="all", pipeline=pipe)
    all_rows = run(pipe, "sdxl", all_guider)[1]
    assert any_rows[:4] == [2, 2, 2, 2] and all_rows == [2, 2, 2, 2]
    assert all_guider.trace.scales[1:] == [[1.0, 1.0]] * 2
    per_row = PolicyGuider(AdaptiveGuidance(4.0, threshold=threshold), batch_rule="per_row", pipeline=pipe)
    message = (
        r"batch_rule='per_row'\): a batch of some rows needs the latents among the guider's inputs, and "
        r"StableDiffusionXLModularPipeline's denoise step passes \['image_embeds', 'prompt_embeds', 'text_embeds', "
        r"'time_ids'\]"
    )
    with pytest.raises(ValueError, match=message):
        run(pipe, "sdxl", per_row)


def test_per_row_adaptive_guidance_where_the_latents_pass_through_the_guider(modular):
    """SD3's denoise step gives the guider the latents, so the unconditional batch holds the rows that ask only, as in
    the classic pipelines."""
    pipe = modular("sd3")
    threshold = sum(similarities(pipe, "sd3")) / 2
    guider = PolicyGuider(AdaptiveGuidance(4.0, threshold=threshold), batch_rule="per_row", pipeline=pipe)
    result, rows = run(pipe, "sd3", guider)
    reference = classic_run(classic("sd3", pipe), "sd3", AdaptiveGuidance(4.0, threshold=threshold))
    assert rows[2:4] == [2, 1]  # step 1: one row's unconditional pass only
    assert guider.trace.branches == reference.trace.branches and guider.trace.nfe == reference.trace.nfe
    assert np.abs(result - reference.images).max() <= 1e-5


def test_linear_ag_synthesises_without_a_model_pass_and_checks_the_latent_shape(modular):
    pipe = modular("sdxl")
    coefficients = torch.tensor([[0.0] * 4, [0.5, 0.2, 0.3, 0.01], [0.6, 0.1, 0.3, 0.0]])
    fit = dict(exact_steps=[0], window=1, num_inference_steps=STEPS, scheduler_class="EulerDiscreteScheduler")
    calibration = LinearAGCalibration(coefficients, **fit, latent_shape=[4, 8, 8])
    guider = PolicyGuider(LinearAdaptiveGuidance(4.0, calibration=calibration), pipeline=pipe)
    result, rows = run(pipe, "sdxl", guider)
    reference = classic_run(classic("sdxl", pipe), "sdxl", LinearAdaptiveGuidance(4.0, calibration=calibration))
    assert rows == [2, 2, 2, 2] and guider.trace.nfe == 4.0
    assert [extras["uncond"] for extras in guider.trace.extras] == ["exact", "synthesised", "synthesised"]
    assert guider.trace.scales == [[4.0, 4.0]] * STEPS and np.abs(result - reference.images).max() <= 1e-5
    elsewhere = LinearAGCalibration(coefficients, **fit, latent_shape=[4, 4, 4])
    wrong = PolicyGuider(LinearAdaptiveGuidance(4.0, calibration=elsewhere), pipeline=pipe)
    with pytest.raises(ValueError, match=r"fitted for latents of shape \[4, 4, 4\], this run has \[4, 8, 8\]"):
        run(pipe, "sdxl", wrong)


class Farthest(Evaluator):
    """Prefers the candidate whose look-ahead lies farthest from the first one's: the largest scale."""

    space = "latent"

    def __init__(self, num_candidates):
        super().__init__("farthest")
        self.k = num_candidates

    def forward(self, candidates):
        x = candidates.latents.flatten(1).view(self.k, -1, candidates.latents[0].numel())
        return (x - x[:1]).norm(dim=-1).flatten()


@pytest.mark.parametrize("lookahead", ["x0", "next_latent"])
def test_dynamic_cfg_sees_latents_and_scheduler_and_adds_no_model_pass(modular, lookahead):
    pipe = modular("sdxl")
    expected, expected_rows = run(pipe, "sdxl", DiffusersCFG(guidance_scale=5.0))
    policy = DynamicGuidance(candidates=[1.0, 3.0, 5.0], evaluators=[Farthest(3)], lookahead=lookahead)
    guider = PolicyGuider(policy, pipeline=pipe)
    result, rows = run(pipe, "sdxl", guider)
    assert np.array_equal(result, expected) and rows == expected_rows
    assert guider.trace.scales == [[5.0, 5.0]] * STEPS and guider.trace.extras[0]["lookahead"] == lookahead


def test_dynamic_cfg_with_a_pixel_evaluator_decodes_with_the_given_decoder(modular):
    pipe = modular("sdxl")
    decoded = []

    def decode(latents, decoder=None):
        decoded.append(latents.shape)
        return vae_latents.decode(decoder or pipe.vae, latents).float().clamp(-1, 1)

    darkest = RewardEvaluator(lambda images, prompts: -images.mean(dim=(1, 2, 3)), name="dark")
    guider = PolicyGuider(DynamicGuidance(candidates=[1.0, 5.0], evaluators=[darkest]), pipeline=pipe, decode=decode)
    _, rows = run(pipe, "sdxl", guider)
    assert decoded == [torch.Size([4, 4, 8, 8])] * STEPS  # 2 candidates x 2 rows, in the VAE's layout
    assert rows == [2] * (2 * STEPS) and {s for step in guider.trace.scales for s in step} <= {1.0, 5.0}


def with_npo_adapter(pipe):
    """The modular SDXL's UNet with a random LoRA adapter "npo", inactive."""
    unet = pipe.unet
    if "npo" not in getattr(unet, "peft_config", {}):
        torch.manual_seed(1)
        targets = ["to_q", "to_k", "to_v", "to_out.0"]
        config = LoraConfig(r=4, lora_alpha=4, target_modules=targets, init_lora_weights=False)
        unet.add_adapter(config, adapter_name="npo")
    set_active_adapters(lora_layers(unet), [])
    return unet


def test_self_npo_runs_the_adapter_in_the_unconditional_batch_only_and_leaves_the_model_as_found(modular):
    pipe = modular("sdxl")
    bare, _ = run(pipe, "sdxl", PolicyGuider(ClassifierFreeGuidance(4.0), pipeline=pipe))
    unet = with_npo_adapter(pipe)
    try:
        policy = ClassifierFreeGuidance(4.0, unconditional=NegativeAdapter("npo"))
        guider = PolicyGuider(policy, pipeline=pipe)
        result, rows = run(pipe, "sdxl", guider)
        reference = classic_run(classic("sdxl", pipe), "sdxl", policy)
        assert np.abs(result - reference.images).max() <= 1e-5 and np.abs(result - bare).max() > 1e-3
        assert rows == [2] * (2 * STEPS) and guider.trace.nfe == 2 * STEPS
        layers = lora_layers(unet)
        assert all(active_adapters(layer) == [] for layer in layers)
        assert not any(layer._forward_hooks for layer in layers) and not unet._forward_pre_hooks
        cfg, _ = run(pipe, "sdxl", PolicyGuider(ClassifierFreeGuidance(4.0), pipeline=pipe))
        assert np.array_equal(cfg, bare)  # the adapter never reaches a pass it is not asked for
    finally:
        unet.delete_adapters("npo")


def test_self_npo_on_a_denoiser_without_lora_layers_is_refused_at_the_first_step(modular):
    pipe = modular("sdxl")
    guider = PolicyGuider(ClassifierFreeGuidance(4.0, unconditional=NegativeAdapter("npo")), pipeline=pipe)
    message = (
        r"Self-NPO's NegativeAdapter\('npo'\) switches a LoRA adapter on for the unconditional batch, but "
        r"StableDiffusionXLModularPipeline's UNet2DConditionModel has no LoRA adapter 'npo' \(it has \[\]\)"
    )
    with pytest.raises(ValueError, match=message):
        run(pipe, "sdxl", guider)


def test_adaptive_guidance_on_a_modular_video_pipeline(modular):
    """Wan's frames are one more latent axis: AG's x0 similarity over the whole video, the batch leaves alike."""
    pipe = modular("wan")
    guider = PolicyGuider(AdaptiveGuidance(4.0, threshold=min(similarities(pipe, "wan")) - 1e-6), pipeline=pipe)
    result, rows = run(pipe, "wan", guider)
    assert result.shape == (2, 9, 16, 16, 3)
    assert rows == [2, 2, 2, 2] and guider.trace.nfe == 4.0


def test_scheduled_cfg_and_the_modular_pipelines_own_guider_specs(modular):
    """The pipeline's component spec rebuilds the guider from its config (what diffusers does on `load_components`)."""
    pipe = modular("sdxl")
    guider = PolicyGuider(ScheduledGuidance(2.0, final_guidance_scale=6.0, schedule="linear"), pipeline=pipe)
    result, _ = run(pipe, "sdxl", guider)
    assert guider.trace.scales == [[2.0, 2.0], [4.0, 4.0], [6.0, 6.0]]
    rebuilt = pipe.get_component_spec("guider").create()
    assert isinstance(rebuilt, PolicyGuider) and rebuilt.config.policy == guider.config.policy
    reference = classic_run(classic("sdxl", pipe), "sdxl", ScheduledGuidance(2.0, final_guidance_scale=6.0))
    assert np.abs(result - reference.images).max() <= 1e-5
