"""GuidedWanPipeline: diffusers' WanPipeline on the shared sampler. Without `guidance` it is diffusers' call; with
constant CFG its videos equal diffusers' (diffusers runs the two branches as two passes, here one batched pass: equal
to 1e-5); every policy, its schedulers, Wan 2.2's two experts and per-token timesteps, Self-NPO's adapter."""

import copy

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
from peft import LoraConfig

from guidance import (
    AdaptiveGuidance,
    ClassifierFreeGuidance,
    DynamicGuidance,
    NegativeAdapter,
    ScheduledGuidance,
    SeparateModel,
)
from guidance.evaluators import Evaluator, RewardEvaluator
from guidance.lora import active_adapters, lora_layers, set_active_adapters
from pipelines import GuidedWanPipeline
from pipelines.schedulers import set_scheduler
from pipelines.testing import tiny_components
from pipelines.training.linear_ag import calibrate

PROMPTS = {"prompt": ["a red circle", "a small blue square"], "negative_prompt": ["green", "a yellow triangle"]}
SIZE = {"height": 16, "width": 16, "num_frames": 9, "max_sequence_length": 16}


def call_kwargs(**overrides) -> dict:
    return {**PROMPTS, **SIZE, "num_inference_steps": 3, "output_type": "np", **overrides}


def seeded() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def pipelines(**component_overrides):
    components = {**tiny_components("wan"), **component_overrides}
    reference, guided = WanPipeline(**components), GuidedWanPipeline(**components)
    for pipe in (reference, guided):
        pipe.set_progress_bar_config(disable=True)
    return reference, guided


@pytest.fixture(scope="module")
def pair():
    return pipelines()


def counted(pipe, policy, **overrides):
    """(output, rows of every denoiser call) of a guided call."""
    rows = []
    handle = pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: rows.append(len(kwargs["hidden_states"])), with_kwargs=True
    )
    try:
        out = pipe(**call_kwargs(**overrides), generator=seeded(), guidance=policy)
    finally:
        handle.remove()
    return out, rows


@pytest.mark.parametrize("scale", [1.0, 5.0])
def test_constant_cfg_matches_diffusers(pair, scale):
    reference, guided = pair
    expected = reference(**call_kwargs(), generator=seeded(), guidance_scale=scale).frames
    out, rows = counted(guided, ClassifierFreeGuidance(scale))
    assert out.frames.shape == expected.shape == (2, 9, 16, 16, 3)
    assert np.abs(out.frames - expected).max() <= 1e-5
    assert out.trace.nfe == (3.0 if scale == 1.0 else 6.0) and out.trace.scales == [[scale, scale]] * 3
    assert rows == ([2] * 3 if scale == 1.0 else [4] * 3)  # both branches in one batched pass


def test_without_guidance_it_is_diffusers_call(pair):
    reference, guided = pair
    expected = reference(**call_kwargs(), generator=seeded(), guidance_scale=4.0).frames
    assert np.array_equal(guided(**call_kwargs(), generator=seeded(), guidance_scale=4.0).frames, expected)


def test_videos_per_prompt_and_the_default_negative_prompt_match(pair):
    reference, guided = pair
    kwargs = call_kwargs(prompt=["a red circle", "a blue square"], negative_prompt=None, num_videos_per_prompt=2)
    expected = reference(**kwargs, generator=seeded(), guidance_scale=4.0).frames
    out = guided(**kwargs, generator=seeded(), guidance=ClassifierFreeGuidance(4.0))
    assert out.frames.shape[0] == 4 and np.abs(out.frames - expected).max() <= 1e-5


def test_guidance_changes_the_video(pair):
    _, guided = pair
    low = guided(**call_kwargs(), generator=seeded(), guidance=ClassifierFreeGuidance(1.0)).frames
    high = guided(**call_kwargs(), generator=seeded(), guidance=ClassifierFreeGuidance(6.0)).frames
    assert np.abs(low - high).max() > 1e-3


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
def test_dynamic_cfg_equals_cfg_at_the_chosen_scale_with_cfg_nfe(pair, lookahead):
    _, guided = pair
    policy = DynamicGuidance(candidates=[1.0, 3.0, 6.0], evaluators=[Farthest(3)], lookahead=lookahead)
    dynamic, rows = counted(guided, policy)
    cfg = guided(**call_kwargs(), generator=seeded(), guidance=ClassifierFreeGuidance(6.0))
    assert np.array_equal(dynamic.frames, cfg.frames) and rows == [4] * 3
    assert dynamic.trace.scales == [[6.0, 6.0]] * 3


def test_a_pixel_evaluator_reads_decoded_videos(pair):
    _, guided = pair
    seen = []

    def brightness(images, prompts):
        seen.append(tuple(images.shape))
        return images.mean(dim=tuple(range(1, images.ndim)))

    policy = DynamicGuidance(candidates=[1.0, 6.0], evaluators=[RewardEvaluator(brightness, name="bright")])
    out = guided(**call_kwargs(), generator=seeded(), guidance=policy)
    assert seen == [(4, 3, 9, 16, 16)] * 3  # candidates x rows, (3, frames, height, width) in [-1, 1]
    assert np.isfinite(out.frames).all() and out.trace.nfe == 6.0


def test_adaptive_and_linear_ag_take_the_unconditional_rows_out(pair):
    _, guided = pair
    ag, rows = counted(guided, AdaptiveGuidance(5.0, threshold=0.5))
    assert rows == [4, 2, 2] and ag.trace.nfe == 4.0  # every row converged at step 0
    policy, _ = calibrate(guided, ["a red circle", "a blue square", "a cat"], 4, 5.0, exact_steps=[0], **SIZE)
    assert policy.skip.calibration.latent_shape == [16, 3, 2, 2]  # (channels, latent frames, height, width)
    linear, rows = counted(guided, policy, num_inference_steps=4)
    assert rows == [4, 2, 2, 2] and linear.trace.nfe == 5.0
    assert [e["uncond"] for e in linear.trace.extras] == ["exact", "synthesised", "synthesised", "synthesised"]
    assert np.isfinite(linear.frames).all()
    with pytest.raises(ValueError, match=r"fitted for latents of shape \[16, 3, 2, 2\], this run has \[16, 1, 2, 2\]"):
        guided(**call_kwargs(num_frames=1, num_inference_steps=4), guidance=policy)


@pytest.mark.parametrize(
    "policy",
    [ScheduledGuidance(2.0, final_guidance_scale=6.0, schedule="cosine"), ClassifierFreeGuidance(5.0, 0.3, 0.4, 0.9)],
    ids=["scheduled", "interval-rescaled"],
)
def test_scheduled_and_interval_policies(pair, policy):
    _, guided = pair
    out, rows = counted(guided, policy, num_inference_steps=4)
    assert np.isfinite(out.frames).all() and sum(rows) / 2 == out.trace.nfe
    assert out.trace.num_steps == 4


@pytest.mark.parametrize("scheduler", ["flow-euler", "flow-heun", None])
def test_schedulers_match_diffusers(scheduler):
    reference, guided = pipelines()
    if scheduler is not None:
        set_scheduler(reference, scheduler)
        guided.scheduler = reference.scheduler
    expected = reference(**call_kwargs(), generator=seeded(), guidance_scale=5.0).frames
    out, rows = counted(guided, ClassifierFreeGuidance(5.0))
    assert np.abs(out.frames - expected).max() <= 1e-5
    timesteps = 5 if scheduler == "flow-heun" else 3  # Heun: 2 evaluations per step but the last
    assert out.trace.num_steps == timesteps and rows == [4] * timesteps
    ag = guided(**call_kwargs(), generator=seeded(), guidance=AdaptiveGuidance(5.0, threshold=0.5))
    assert ag.trace.nfe < out.trace.nfe and np.isfinite(ag.frames).all()


def test_wan22_two_experts_match_diffusers():
    torch.manual_seed(1)
    config = dict(tiny_components("wan")["transformer"].config)
    second = WanTransformer3DModel.from_config(config).eval()
    components = {"transformer_2": second, "boundary_ratio": 0.8}  # timesteps 999, 900 | 750, 500
    reference, guided = pipelines(**components)
    kwargs = call_kwargs(num_inference_steps=4)
    expected = reference(**kwargs, generator=seeded(), guidance_scale=5.0, guidance_scale_2=5.0).frames
    calls = {"transformer": 0, "transformer_2": 0}
    handles = [
        getattr(guided, name).register_forward_pre_hook(lambda *a, name=name: calls.__setitem__(name, calls[name] + 1))
        for name in calls
    ]
    try:
        out = guided(**kwargs, generator=seeded(), guidance=ClassifierFreeGuidance(5.0))
    finally:
        for handle in handles:
            handle.remove()
    assert np.abs(out.frames - expected).max() <= 1e-5
    assert calls == {"transformer": 2, "transformer_2": 2}
    assert guided.denoiser is guided.transformer  # outside a run: the first expert
    with pytest.raises(ValueError, match=r"`guidance_scale_2` and `guidance` cannot both be given"):
        guided(**kwargs, guidance_scale_2=3.0, guidance=ClassifierFreeGuidance(5.0))


def test_wan22_per_token_timesteps_match_diffusers():
    reference, guided = pipelines(expand_timesteps=True, scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0))
    expected = reference(**call_kwargs(), generator=seeded(), guidance_scale=5.0).frames
    out = guided(**call_kwargs(), generator=seeded(), guidance=ClassifierFreeGuidance(5.0))
    assert np.abs(out.frames - expected).max() <= 1e-5


def test_self_npo_adapter_in_the_unconditional_rows_equals_a_separate_negative_model():
    _, guided = pipelines()
    transformer = guided.transformer
    torch.manual_seed(1)
    config = LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v"], init_lora_weights=False)
    transformer.add_adapter(config, adapter_name="npo")
    layers = lora_layers(transformer)
    set_active_adapters(layers, [])
    negative = copy.deepcopy(transformer)
    negative.set_adapters(["npo"], [1.0])
    reference = guided(
        **call_kwargs(),
        generator=seeded(),
        guidance=ClassifierFreeGuidance(4.0, unconditional=SeparateModel(negative)),
    )
    out, rows = counted(guided, ClassifierFreeGuidance(4.0, unconditional=NegativeAdapter("npo")))
    plain = guided(**call_kwargs(), generator=seeded(), guidance=ClassifierFreeGuidance(4.0))
    assert np.abs(out.frames - reference.frames).max() <= 1e-5 and np.abs(out.frames - plain.frames).max() > 1e-4
    assert rows == [4] * 3  # one batched pass: the adapter on the unconditional rows only
    assert all(active_adapters(layer) == [] for layer in layers) and not any(layer._forward_hooks for layer in layers)


def test_arguments_guidance_decides_are_refused_and_video_is_not_edited(pair):
    _, guided = pair
    with pytest.raises(ValueError, match=r"`guidance_scale` and `guidance` cannot both be given"):
        guided(**call_kwargs(), guidance_scale=3.0, guidance=ClassifierFreeGuidance(5.0))
    with pytest.raises(NotImplementedError, match=r"GuidedWanPipeline denoises videos and does not edit images"):
        guided.image_to_latents(np.zeros((16, 16, 3)))
    assert not hasattr(guided, "edit")


def test_stages_decode_latents_to_diffusers_frames(pair):
    reference, guided = pair
    expected = reference(**call_kwargs(), generator=seeded(), guidance_scale=5.0).frames
    inputs = guided.prepare(**call_kwargs(), generator=seeded())
    result = guided.denoise(inputs, ClassifierFreeGuidance(5.0))
    assert result.latents.shape == (2, 16, 3, 2, 2) and result.latents.dtype == torch.float32
    frames = guided.decode(result.latents, inputs, "np").frames
    assert np.abs(frames - expected).max() <= 1e-5
    video = guided.decode_for_guidance(result.latents)
    assert video.shape == (2, 3, 9, 16, 16) and video.min() >= -1 and video.max() <= 1


def test_callbacks_see_diffusers_tensors(pair):
    reference, guided = pair
    names = ["latents", "prompt_embeds", "negative_prompt_embeds"]

    def recorder(seen):
        def callback(pipe, i, t, tensors):
            seen.append({name: tuple(tensor.shape) for name, tensor in tensors.items()})
            return tensors

        return callback

    theirs, ours = [], []
    callbacks = {"callback_on_step_end_tensor_inputs": names}
    reference(**call_kwargs(), guidance_scale=5.0, callback_on_step_end=recorder(theirs), **callbacks)
    guided(**call_kwargs(), guidance=ClassifierFreeGuidance(5.0), callback_on_step_end=recorder(ours), **callbacks)
    assert ours == theirs and len(ours) == 3
