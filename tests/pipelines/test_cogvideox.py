"""GuidedCogVideoXPipeline: diffusers' CogVideoXPipeline on the shared sampler. With constant CFG its videos are
diffusers' (the same batched pass, unconditional rows first), with both CogVideoX schedulers (the DPM one steps with
the previous x0, kept by the run's copy) and the image schedulers people swap in, with rotary embeddings and
CogVideoX 1.5's padded temporal patches; every policy; Self-NPO's adapter (the paper's CogVideoX case)."""

import copy

import numpy as np
import pytest
import torch
from diffusers import CogVideoXDPMScheduler, CogVideoXPipeline, CogVideoXTransformer3DModel
from peft import LoraConfig

from guidance import (
    AdaptiveGuidance,
    ClassifierFreeGuidance,
    DynamicGuidance,
    NegativeAdapter,
    ScheduledGuidance,
    SeparateModel,
)
from guidance.evaluators import Evaluator
from guidance.lora import active_adapters, lora_layers, set_active_adapters
from pipelines import GuidedCogVideoXPipeline
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
    components = {**tiny_components("cogvideox"), **component_overrides}
    reference, guided = CogVideoXPipeline(**components), GuidedCogVideoXPipeline(**components)
    for pipe in (reference, guided):
        pipe.set_progress_bar_config(disable=True)
    return reference, guided


@pytest.fixture(scope="module")
def pair():
    return pipelines()


def counted(pipe, policy, **overrides):
    rows = []
    handle = pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: rows.append(len(kwargs["hidden_states"])), with_kwargs=True
    )
    try:
        out = pipe(**call_kwargs(**overrides), generator=seeded(), guidance=policy)
    finally:
        handle.remove()
    return out, rows


@pytest.mark.parametrize("scale", [1.0, 6.0])
def test_constant_cfg_matches_diffusers(pair, scale):
    reference, guided = pair
    expected = reference(**call_kwargs(), generator=seeded(), guidance_scale=scale).frames
    out, rows = counted(guided, ClassifierFreeGuidance(scale))
    assert out.frames.shape == expected.shape == (2, 9, 16, 16, 3)
    assert np.abs(out.frames - expected).max() <= 1e-5
    assert out.trace.nfe == (3.0 if scale == 1.0 else 6.0) and rows == ([2] * 3 if scale == 1.0 else [4] * 3)


@pytest.mark.parametrize("scheduler", ["cogvideox-dpm", "ddim", "dpm++2m", "euler", "heun", "pndm"])
def test_schedulers_match_diffusers(scheduler):
    reference, guided = pipelines()
    if scheduler == "cogvideox-dpm":  # CogVideoX-5b's: stochastic, from the call's generator
        reference.scheduler = CogVideoXDPMScheduler.from_config(reference.scheduler.config)
    else:
        set_scheduler(reference, scheduler)
    guided.scheduler = reference.scheduler
    expected = reference(**call_kwargs(), generator=seeded(), guidance_scale=6.0).frames
    out, rows = counted(guided, ClassifierFreeGuidance(6.0))
    assert np.abs(out.frames - expected).max() <= 1e-5 and rows == [4] * out.trace.num_steps
    ag = guided(**call_kwargs(), generator=seeded(), guidance=AdaptiveGuidance(6.0, threshold=0.5))
    assert ag.trace.nfe < out.trace.nfe and np.isfinite(ag.frames).all()


def test_the_dpm_scheduler_keeps_its_previous_estimate_on_the_runs_copy_only():
    reference, guided = pipelines()
    guided.scheduler = CogVideoXDPMScheduler.from_config(reference.scheduler.config)
    inputs = guided.prepare(**call_kwargs(), generator=seeded())
    assert type(inputs.scheduler).__name__ == "CogVideoXDPMScheduler"  # what LinearAG fits record
    first = guided.denoise(inputs, ClassifierFreeGuidance(6.0)).latents
    again = guided.denoise(inputs, ClassifierFreeGuidance(6.0)).latents
    assert torch.equal(first, again) and "previous_x0" not in vars(inputs.scheduler)


@pytest.mark.parametrize(
    "config",
    [{"use_rotary_positional_embeddings": True}, {"use_rotary_positional_embeddings": True, "patch_size_t": 2}],
    ids=["rotary", "cogvideox-1.5"],
)
def test_rotary_embeddings_and_padded_temporal_patches_match_diffusers(config):
    base = dict(tiny_components("cogvideox")["transformer"].config)
    transformer = CogVideoXTransformer3DModel.from_config({**base, **config}).eval()
    reference, guided = pipelines(transformer=transformer)
    expected = reference(**call_kwargs(), generator=seeded(), guidance_scale=6.0).frames
    out = guided(**call_kwargs(), generator=seeded(), guidance=ClassifierFreeGuidance(6.0))
    assert out.frames.shape == (2, 9, 16, 16, 3) and np.abs(out.frames - expected).max() <= 1e-5


class Farthest(Evaluator):
    space = "latent"

    def __init__(self, num_candidates):
        super().__init__("farthest")
        self.k = num_candidates
        self.shapes = []

    def forward(self, candidates):
        self.shapes.append(tuple(candidates.latents.shape))
        x = candidates.latents.flatten(1).view(self.k, -1, candidates.latents[0].numel())
        return (x - x[:1]).norm(dim=-1).flatten()


@pytest.mark.parametrize("lookahead", ["x0", "next_latent"])
def test_dynamic_cfg_reads_latents_in_the_vae_layout_and_equals_cfg_at_the_chosen_scale(pair, lookahead):
    _, guided = pair
    evaluator = Farthest(3)
    policy = DynamicGuidance(candidates=[1.0, 3.0, 6.0], evaluators=[evaluator], lookahead=lookahead)
    dynamic, rows = counted(guided, policy)
    cfg = guided(**call_kwargs(), generator=seeded(), guidance=ClassifierFreeGuidance(6.0))
    assert np.array_equal(dynamic.frames, cfg.frames) and rows == [4] * 3
    assert evaluator.shapes == [(6, 4, 3, 2, 2)] * 3  # candidates x rows, (channels, frames, height, width)


def test_adaptive_linear_ag_and_scheduled_policies(pair):
    _, guided = pair
    ag, rows = counted(guided, AdaptiveGuidance(6.0, threshold=0.5))
    assert rows == [4, 2, 2] and ag.trace.nfe == 4.0
    policy, _ = calibrate(guided, ["a red circle", "a blue square", "a cat"], 4, 6.0, exact_steps=[0], **SIZE)
    assert policy.skip.calibration.latent_shape == [3, 4, 2, 2]  # CogVideoX's (frames, channels, height, width)
    linear, rows = counted(guided, policy, num_inference_steps=4)
    assert rows == [4, 2, 2, 2] and linear.trace.nfe == 5.0 and np.isfinite(linear.frames).all()
    scheduled, _ = counted(guided, ScheduledGuidance(2.0, final_guidance_scale=6.0, schedule="cosine"))
    assert scheduled.trace.scales == [[2.0, 2.0], [4.0, 4.0], [6.0, 6.0]]


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
    separate = ClassifierFreeGuidance(6.0, unconditional=SeparateModel(negative))
    reference = guided(**call_kwargs(), generator=seeded(), guidance=separate)
    out, rows = counted(guided, ClassifierFreeGuidance(6.0, unconditional=NegativeAdapter("npo")))
    plain = guided(**call_kwargs(), generator=seeded(), guidance=ClassifierFreeGuidance(6.0))
    assert np.abs(out.frames - reference.frames).max() <= 1e-5 and np.abs(out.frames - plain.frames).max() > 1e-4
    assert rows == [4] * 3
    assert all(active_adapters(layer) == [] for layer in layers) and not any(layer._forward_hooks for layer in layers)


def test_arguments_guidance_decides_are_refused(pair):
    _, guided = pair
    for name, value in (("guidance_scale", 3.0), ("use_dynamic_cfg", True)):
        with pytest.raises(ValueError, match=rf"`{name}` and `guidance` cannot both be given"):
            guided(**call_kwargs(), guidance=ClassifierFreeGuidance(6.0), **{name: value})
    with pytest.raises(NotImplementedError, match=r"GuidedCogVideoXPipeline denoises videos and does not edit"):
        guided.image_to_latents(np.zeros((16, 16, 3)))


def test_stages_and_the_vae_layout(pair):
    reference, guided = pair
    expected = reference(**call_kwargs(), generator=seeded(), guidance_scale=6.0).frames
    inputs = guided.prepare(**call_kwargs(), generator=seeded())
    result = guided.denoise(inputs, ClassifierFreeGuidance(6.0))
    assert result.latents.shape == (2, 3, 4, 2, 2)  # (batch, frames, channels, height, width)
    assert np.abs(guided.decode(result.latents, inputs, "np").frames - expected).max() <= 1e-5
    vae_layout = guided.unpack_latents(result.latents, 16, 16)
    assert vae_layout.shape == (2, 4, 3, 2, 2) and torch.equal(guided.pack_latents(vae_layout), result.latents)
    video = guided.decode_for_guidance(vae_layout)
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
    reference(**call_kwargs(), guidance_scale=6.0, callback_on_step_end=recorder(theirs), **callbacks)
    guided(**call_kwargs(), guidance=ClassifierFreeGuidance(6.0), callback_on_step_end=recorder(ours), **callbacks)
    assert ours == theirs and len(ours) == 3
