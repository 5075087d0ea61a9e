"""Latents <-> VAE conventions of every family, float16 VAEs with `force_upcast`, and no float64 at inference
(MPS has none)."""

import copy

import numpy as np
import pytest
import torch
from conftest import build, call_kwargs, seeded
from torch.utils._python_dispatch import TorchDispatchMode

from guidance import AdaptiveGuidance, ClassifierFreeGuidance, DynamicGuidance, LinearAdaptiveGuidance
from guidance import vae as vae_latents
from guidance.evaluators import RewardEvaluator
from pipelines.testing import tiny_components

MEAN, STD = [0.1, -0.2, 0.3, 0.0], [0.9, 1.1, 0.8, 1.2]


def sdxl_with_latent_statistics():
    components = tiny_components("sdxl")
    config = {k: v for k, v in components["vae"].config.items() if not k.startswith("_")}
    vae = type(components["vae"]).from_config({**config, "latents_mean": MEAN, "latents_std": STD}).eval()
    vae.load_state_dict(components["vae"].state_dict())
    return vae


@pytest.mark.parametrize("family", ["sd", "sd3", "sdxl-statistics"])
def test_to_vae_and_from_vae_are_inverse_and_follow_diffusers(family):
    vae = sdxl_with_latent_statistics() if family == "sdxl-statistics" else tiny_components(family)["vae"]
    latents = torch.randn(2, 4, 8, 8, generator=seeded())
    if family == "sd":
        expected = latents / vae.config.scaling_factor
    elif family == "sd3":
        expected = latents / vae.config.scaling_factor + vae.config.shift_factor
    else:
        mean, std = torch.tensor(MEAN).view(1, 4, 1, 1), torch.tensor(STD).view(1, 4, 1, 1)
        expected = latents * std / vae.config.scaling_factor + mean
    torch.testing.assert_close(vae_latents.to_vae(vae, latents), expected)
    torch.testing.assert_close(vae_latents.from_vae(vae, vae_latents.to_vae(vae, latents)), latents)


def test_sdxl_latent_statistics_decode_as_diffusers_and_for_guidance():
    """Failure 5: the guidance decode applies SDXL's latents_mean/latents_std as the pipeline's decode does."""
    vae = sdxl_with_latent_statistics()
    reference, guided = build("sdxl", guided=False, vae=vae), build("sdxl", vae=vae)
    kwargs = call_kwargs("sdxl", prompt="a red circle", output_type="pt")
    expected = reference(**kwargs, generator=seeded(), guidance_scale=4.0).images
    cfg = ClassifierFreeGuidance(4.0)
    latents = guided(**{**kwargs, "output_type": "latent"}, generator=seeded(), guidance=cfg).images
    inputs = guided.prepare(**{**kwargs, "output_type": None})
    torch.testing.assert_close(guided.decode(latents, inputs, "pt").images, expected, rtol=0, atol=1e-5)
    for_guidance = guided.decode_for_guidance(latents)
    torch.testing.assert_close((for_guidance / 2 + 0.5).clamp(0, 1), expected, rtol=0, atol=1e-5)


def test_a_float16_vae_with_force_upcast_decodes_in_float32_and_is_restored():
    vae = sdxl_with_latent_statistics().to(torch.float16)
    vae.register_to_config(force_upcast=True)
    seen = []
    vae.decoder.register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    latents = torch.randn(2, 4, 8, 8, generator=seeded()).half()
    images = vae_latents.decode(vae, latents)
    assert seen == [torch.float32] and images.dtype == torch.float32 and vae.dtype == torch.float16
    reference = copy.deepcopy(vae).float()
    expected = reference.decode(vae_latents.to_vae(reference, latents.float())).sample
    torch.testing.assert_close(images, expected, rtol=0, atol=1e-5)
    encoded = vae_latents.encode(vae, images.clamp(-1, 1))
    assert encoded.dtype == torch.float32 and vae.dtype == torch.float16 and torch.isfinite(encoded).all()


def test_encode_refuses_an_unknown_sample_mode():
    vae = tiny_components("sd")["vae"]
    with pytest.raises(ValueError, match="`sample_mode` must be 'argmax' or 'sample', got 'mean'"):
        vae_latents.encode(vae, torch.zeros(1, 3, 16, 16), sample_mode="mean")


class Float64Detector(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outputs = out if isinstance(out, (tuple, list)) else [out]
        if any(isinstance(o, torch.Tensor) and o.dtype == torch.float64 for o in outputs):
            self.ops.append(str(func))
        return out


def test_inference_of_every_adaptive_policy_uses_no_float64(sd_pipe):
    """Failure 5: AG compared in float64, which MPS does not have."""
    from pipelines.training.linear_ag import calibrate

    fitted, _ = calibrate(sd_pipe, ["a red circle", "a blue square"], 4, 4.0, exact_steps=[0], height=16, width=16)
    linear = LinearAdaptiveGuidance.new(fitted)
    dark = RewardEvaluator(lambda images, prompts: -images.mean(dim=(1, 2, 3)), name="dark")
    for policy in (AdaptiveGuidance(4.0, threshold=0.99), linear, DynamicGuidance([1.0, 4.0], evaluators=[dark])):
        detector = Float64Detector()
        with detector:
            out = sd_pipe(**call_kwargs("sd", prompt=["a", "b"], num_inference_steps=4), guidance=policy)
        assert detector.ops == [], type(policy).__name__
        assert np.isfinite(out.images).all()
