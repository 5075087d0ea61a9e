"""With constant CFG each guided pipeline returns diffusers' images exactly (same components, seed, steps)."""

import numpy as np
import pytest
from conftest import REFERENCE, build, call_kwargs, seeded

from guidance import ClassifierFreeGuidance

FAMILIES = list(REFERENCE)


def run_pair(family, scale, reference_extra=None, **kwargs):
    _, _, scale_argument = REFERENCE[family]
    reference = build(family, guided=False)
    guided = build(family)
    expected = reference(**call_kwargs(family, generator=seeded(), **kwargs), **{scale_argument: scale})
    expected = expected.images
    result = guided(**call_kwargs(family, generator=seeded(), **kwargs), guidance=ClassifierFreeGuidance(scale))
    return expected, result


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("scale", [1.0, 4.0])
def test_constant_cfg_matches_diffusers(family, scale):
    prompts = ["a red circle", "a small blue square"]
    expected, result = run_pair(family, scale, prompt=prompts, negative_prompt=["green", "yellow triangle"])
    assert result.images.shape == expected.shape == (2, 16, 16, 3)
    assert np.abs(result.images - expected).max() <= 1e-4
    assert result.trace.nfe == (3.0 if scale == 1.0 else 6.0)
    assert result.trace.scales == [[scale, scale]] * 3


@pytest.mark.parametrize("family", FAMILIES)
def test_guidance_changes_the_images(family):
    """So that parity above is not trivially true: the scale matters on these tiny models."""
    _, low = run_pair(family, 1.0, prompt="a red circle", negative_prompt="blue")
    _, high = run_pair(family, 6.0, prompt="a red circle", negative_prompt="blue")
    assert np.abs(low.images - high.images).max() > 1e-3


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_images_per_prompt_and_default_negative_prompt_match(family):
    expected, result = run_pair(family, 5.0, prompt=["a red circle", "a blue square"], num_images_per_prompt=2)
    assert result.images.shape[0] == 4
    assert np.abs(result.images - expected).max() <= 1e-4
    assert result.trace.nfe == 6.0


def test_guidance_rescale_matches_diffusers():
    reference, guided = build("sd", guided=False), build("sd")
    kwargs = call_kwargs("sd", prompt="a red circle")
    expected = reference(**kwargs, generator=seeded(), guidance_scale=6.0, guidance_rescale=0.7).images
    result = guided(**kwargs, generator=seeded(), guidance=ClassifierFreeGuidance(6.0, guidance_rescale=0.7))
    assert np.abs(result.images - expected).max() <= 1e-4


def test_flux_guidance_distilled_embedding_passes_through():
    from diffusers import FluxTransformer2DModel

    from pipelines.testing import tiny_components

    config = dict(tiny_components("flux")["transformer"].config)
    transformer = FluxTransformer2DModel.from_config({**config, "guidance_embeds": True}).eval()
    reference, guided = build("flux", guided=False, transformer=transformer), build("flux", transformer=transformer)
    kwargs = call_kwargs("flux", prompt="a red circle", negative_prompt="blue", guidance_scale=3.5)
    expected = reference(**kwargs, generator=seeded(), true_cfg_scale=4.0).images
    result = guided(**kwargs, generator=seeded(), guidance=ClassifierFreeGuidance(4.0))
    assert np.abs(result.images - expected).max() <= 1e-4
    other = guided(**{**kwargs, "guidance_scale": 1.0}, generator=seeded(), guidance=ClassifierFreeGuidance(4.0))
    assert np.abs(other.images - result.images).max() > 1e-4  # the embedding really reaches the model
