"""bfloat16 on the CPU for every family and every policy: the runs finish, stay finite and stay near the float32 run,
and the arithmetic that needs it (x0 estimates, AG's similarity, LinearAG's regression, FlowOpt's update) is done in
float32 whatever the model's dtype."""

import numpy as np
import pytest
import torch
from conftest import REFERENCE, build, call_kwargs, seeded, size_kwargs

from guidance import (
    AdaptiveGuidance,
    ClassifierFreeGuidance,
    DynamicGuidance,
    GuidanceStep,
    NegativeAdapter,
    ScheduledGuidance,
)
from guidance.denoised import predict_x0
from guidance.evaluators import RewardEvaluator
from guidance.lora import add_lora, denoiser_of, lora_layers, set_active_adapters
from pipelines.training.linear_ag import calibrate

PROMPTS = ["a red circle", "a blue square"]


def darkness() -> RewardEvaluator:
    return RewardEvaluator(lambda images, prompts: -images.float().mean(dim=(1, 2, 3)), name="dark")


def policies(pipe, family):
    linear, _ = calibrate(pipe, PROMPTS, 3, 4.0, exact_steps=[0], **size_kwargs(family))
    torch.manual_seed(0)
    add_lora(denoiser_of(pipe), "npo", rank=2, alpha=2.0, target_modules=["to_q", "to_v"])
    with torch.no_grad():
        for name, parameter in denoiser_of(pipe).named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.2)
    set_active_adapters(lora_layers(denoiser_of(pipe)), [])  # off but for the unconditional rows of the NPO policy
    return {
        "cfg": ClassifierFreeGuidance(4.0),
        "scheduled": ScheduledGuidance(2.0, final_guidance_scale=6.0, schedule="cosine"),
        "ag": AdaptiveGuidance(4.0, threshold=0.9),
        "linear-ag": linear,
        "dynamic x0": DynamicGuidance([1.0, 4.0], lookahead="x0", evaluators=[darkness()]),
        "dynamic next latent": DynamicGuidance([1.0, 4.0], lookahead="next_latent", evaluators=[darkness()]),
        "self-npo": ClassifierFreeGuidance(4.0, unconditional=NegativeAdapter("npo")),
    }


@pytest.mark.parametrize("family", list(REFERENCE))
def test_every_policy_runs_in_bfloat16_near_its_float32_run(family):
    pipe = build(family)
    runs = {}
    for dtype in (torch.float32, torch.bfloat16):
        pipe.to(dtype)
        for name, policy in policies(pipe, family).items():
            out = pipe(**call_kwargs(family, prompt=PROMPTS), generator=seeded(), guidance=policy)
            runs.setdefault(name, []).append((out.images, out.trace.nfe))
        pipe.delete_adapters("npo")
    for name, ((full, nfe_full), (half, nfe_half)) in runs.items():
        assert np.isfinite(half).all(), name
        assert np.abs(half - full).mean() < 0.05, name  # bf16 keeps 8 bits of mantissa: the same picture
        if name not in ("ag",):  # AG's crossing point may move by a step
            assert nfe_half == nfe_full, name


def test_x0_estimates_are_float32_whatever_the_models_dtype():
    pipe = build("sd")
    inputs = pipe.prepare(**{**call_kwargs("sd", prompt="x"), "output_type": None})
    latents = inputs.latents.to(torch.bfloat16)
    step = GuidanceStep(1, inputs.num_timesteps, inputs.timesteps[1], latents, inputs.scheduler)
    prediction = torch.randn(latents.shape, generator=seeded()).to(torch.bfloat16)
    x0 = predict_x0(step, prediction)
    exact = predict_x0(
        GuidanceStep(1, inputs.num_timesteps, inputs.timesteps[1], latents.float(), inputs.scheduler),
        prediction.float(),
    )
    assert x0.dtype == torch.float32 and torch.equal(x0, exact)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_a_flowopt_edit_in_bfloat16_updates_in_float32(family):
    from PIL import Image

    pipe = build(family).to(torch.bfloat16)
    image = Image.new("RGB", (16, 16), (200, 30, 30))
    out = pipe.edit(
        image,
        "a red square",
        "a blue square",
        num_inference_steps=4,
        n_max=3,
        iterations=2,
        output_type="np",
        max_sequence_length=16,
    )
    assert out.latents.dtype == torch.float32 and np.isfinite(out.images).all() and len(out.residuals) == 3
