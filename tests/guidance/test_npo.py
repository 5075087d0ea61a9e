"""NegativeAdapter: the NPO adapter on the unconditional rows only, in the conditional rows' pass, equal to a separate
negative model; the model left as found."""

import copy
import re

import numpy as np
import pytest
import torch
from conftest import build, call_kwargs, seeded
from peft import LoraConfig

from guidance import AdaptiveGuidance, ClassifierFreeGuidance, ScheduledGuidance
from guidance.lora import active_adapters, lora_layers, set_active_adapters
from guidance.npo import NegativeAdapter
from guidance.unconditional import SeparateModel

TARGETS = {"sd": ["to_q", "to_k", "to_v", "to_out.0"], "sd3": ["to_q", "to_k", "to_v"], "flux": ["to_q", "to_k"]}


def with_adapters(family: str, *names: str):
    """A tiny pipeline whose denoiser holds random LoRA adapters `names`, none of them active."""
    pipe = build(family)
    denoiser = pipe.denoiser
    torch.manual_seed(1)
    for name in names:
        config = LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS[family], init_lora_weights=False)
        denoiser.add_adapter(config, adapter_name=name)
    set_active_adapters(lora_layers(denoiser), [])
    return pipe


def negative_copy(pipe, weights: dict):
    """A separate denoiser with `weights` (adapter -> scale) active: the two-model reference."""
    model = copy.deepcopy(pipe.denoiser)
    model.set_adapters(list(weights), list(weights.values()))
    return model


def images(pipe, family, policy, prompts=("a red circle", "a blue square"), **kwargs):
    return pipe(**call_kwargs(family, prompt=list(prompts), **kwargs), generator=seeded(0), guidance=policy).images


@pytest.mark.parametrize("family", ["sd", "sd3", "flux"])
def test_one_batched_pass_equals_a_separate_negative_model(family):
    pipe = with_adapters(family, "npo")
    reference = images(
        pipe, family, ClassifierFreeGuidance(4.0, unconditional=SeparateModel(negative_copy(pipe, {"npo": 1.0})))
    )
    out = pipe(
        **call_kwargs(family, prompt=["a red circle", "a blue square"]),
        generator=seeded(0),
        guidance=ClassifierFreeGuidance(4.0, unconditional=NegativeAdapter("npo")),
    )
    assert np.abs(out.images - reference).max() < 1e-5
    plain = pipe(
        **call_kwargs(family, prompt=["a red circle", "a blue square"]),
        generator=seeded(0),
        guidance=ClassifierFreeGuidance(4.0),
    )
    assert np.abs(out.images - plain.images).max() > 1e-3  # the adapter does something
    assert out.trace.nfe == plain.trace.nfe  # NPO costs what CFG costs
    assert all(active_adapters(layer) == [] and not layer._forward_hooks for layer in lora_layers(pipe.denoiser))


def test_weights_alpha_and_a_fine_tune_delta_follow_the_formula():
    pipe = with_adapters("sd", "npo", "style")
    set_active_adapters(lora_layers(pipe.unet), ["style"])  # the fine-tune, active for every conditional row
    reference = images(
        pipe,
        "sd",
        ClassifierFreeGuidance(4.0, unconditional=SeparateModel(negative_copy(pipe, {"npo": 2.0, "style": 0.25}))),
    )
    policy = ClassifierFreeGuidance(
        4.0, unconditional=NegativeAdapter("npo", alpha=2.0, delta_adapter="style", beta=0.25)
    )
    assert np.abs(images(pipe, "sd", policy) - reference).max() < 1e-5
    assert all(active_adapters(layer) == ["style"] for layer in lora_layers(pipe.unet))
    no_npo = ClassifierFreeGuidance(4.0, unconditional=NegativeAdapter("npo", alpha=0.0))
    assert np.abs(images(pipe, "sd", no_npo) - images(pipe, "sd", ClassifierFreeGuidance(4.0))).max() < 1e-6


def test_an_active_npo_adapter_is_kept_off_the_conditional_rows_and_restored():
    pipe = with_adapters("sd", "npo")
    reference = images(
        pipe, "sd", ClassifierFreeGuidance(4.0, unconditional=SeparateModel(negative_copy(pipe, {"npo": 1.0})))
    )
    set_active_adapters(lora_layers(pipe.unet), ["npo"])  # as load_lora_weights leaves it
    assert (
        np.abs(images(pipe, "sd", ClassifierFreeGuidance(4.0, unconditional=NegativeAdapter())) - reference).max()
        < 1e-5
    )
    assert all(active_adapters(layer) == ["npo"] for layer in lora_layers(pipe.unet))


@pytest.mark.parametrize(
    "policy",
    [
        lambda npo: ScheduledGuidance(2.0, final_guidance_scale=6.0, unconditional=npo),
        lambda npo: ClassifierFreeGuidance(4.0, start=0.5, unconditional=npo),
        lambda npo: AdaptiveGuidance(4.0, threshold=0.9, unconditional=npo),
    ],
)
def test_npo_composes_with_other_policies(policy):
    pipe = with_adapters("sd", "npo")
    with_npo = pipe(
        **call_kwargs("sd", prompt=["a red circle"], num_inference_steps=4),
        generator=seeded(0),
        guidance=policy(NegativeAdapter()),
    )
    without = pipe(
        **call_kwargs("sd", prompt=["a red circle"], num_inference_steps=4), generator=seeded(0), guidance=policy(None)
    )
    assert np.abs(with_npo.images - without.images).max() > 1e-4
    assert with_npo.trace.scales[0] == without.trace.scales[0]


def test_bad_adapters_are_refused():
    pipe = with_adapters("sd", "npo")
    with pytest.raises(ValueError, match=r"the denoiser has no LoRA adapter 'negative' \(it has \['npo'\]\): load it"):
        images(pipe, "sd", ClassifierFreeGuidance(4.0, unconditional=NegativeAdapter("negative")))
    with pytest.raises(TypeError, match="`alpha` must be a real number, got str '1'"):
        NegativeAdapter(alpha="1")
    with pytest.raises(ValueError, match="`delta_adapter` must be another adapter's name or None, got 'npo'"):
        NegativeAdapter(delta_adapter="npo")
    with pytest.raises(TypeError, match="`adapter_name` must be a non-empty string"):
        NegativeAdapter("")
    two = with_adapters("sd", "npo", "style")  # "style" not active: the conditional rows do not use it
    with pytest.raises(ValueError, match="`delta_adapter` 'style' must be active"):
        images(two, "sd", ClassifierFreeGuidance(4.0, unconditional=NegativeAdapter(delta_adapter="style", beta=0.5)))
    assert all(not layer._forward_hooks for layer in lora_layers(pipe.unet))


def test_an_adapter_for_another_model_is_refused_at_load():
    from guidance.npo import load_npo_adapter
    from guidance.shapes.assets import ASSETS
    from pipelines.application.models import load_shapes_pipeline

    pipe = load_shapes_pipeline("shapes-sd")
    with pytest.raises(ValueError, match="shapes-sd3-npo' holds no LoRA weights for this pipeline's UNet2DCondition"):
        load_npo_adapter(pipe, ASSETS / "shapes-sd3-npo")
    tiny = build("sd")  # the same layers, of other widths
    message = (
        "shapes-sd-npo' does not fit this pipeline's UNet2DConditionModel: 64 of its LoRA tensors have other "
        "shapes (e.g. down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.npo.weight: "
        "torch.Size([8, 64]) in the folder, torch.Size([8, 16]) in the model): was it trained for another "
        "model?"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        load_npo_adapter(tiny, ASSETS / "shapes-sd-npo")
    assert not any(layer.lora_A for layer in lora_layers(tiny.unet))  # none of its weights were left in the model
    # a model that holds an adapter already (off): the refused load leaves it off (peft switches on the adapters that
    # are left when it deletes a failed one), and the model's images unchanged
    held = with_adapters("sd", "npo")
    before = images(held, "sd", ClassifierFreeGuidance(4.0))
    with pytest.raises(ValueError, match="does not fit this pipeline's UNet2DConditionModel"):
        load_npo_adapter(held, ASSETS / "shapes-sd-npo", adapter_name="other")
    assert all(active_adapters(layer) == [] and list(layer.lora_A) == ["npo"] for layer in lora_layers(held.unet))
    after = images(held, "sd", ClassifierFreeGuidance(4.0))
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(before, after, strict=True))
