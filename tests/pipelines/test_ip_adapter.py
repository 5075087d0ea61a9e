"""IP-Adapter with and without `guidance=` on SD and SDXL, equal to diffusers at constant CFG: the conditional rows get
the image embeddings and the unconditional rows the negative ones, as diffusers' CFG gives them (failure 2 and item 3
of the drop-in issue), with a tiny CLIP vision encoder and a tiny IP-Adapter built here."""

import numpy as np
import pytest
import torch
from conftest import build, call_kwargs, seeded
from diffusers.callbacks import IPAdapterScaleCutoffCallback
from PIL import Image

from guidance import AdaptiveGuidance, ClassifierFreeGuidance
from pipelines.testing import save_tiny_ip_adapter, tiny_image_encoder

FAMILIES = ["sd", "sdxl"]
IMAGE = Image.new("RGB", (32, 32), (200, 30, 30))


def with_ip_adapter(family, folder, guided=True):
    pipe = build(family, guided=guided, **tiny_image_encoder())
    name = save_tiny_ip_adapter(pipe.unet, folder)
    pipe.load_ip_adapter(str(folder), subfolder="", weight_name=name, image_encoder_folder=None)
    return pipe


@pytest.fixture(params=FAMILIES)
def pair(request, tmp_path):
    family = request.param
    return family, with_ip_adapter(family, tmp_path, guided=False), with_ip_adapter(family, tmp_path)


def test_a_plain_call_with_an_ip_adapter_image_is_diffusers(pair):
    """Failure 2: the sampler's stage shadowed diffusers' `encode_image`, which the IP-Adapter path calls."""
    family, reference, pipe = pair
    kwargs = call_kwargs(family, prompt="a red circle", ip_adapter_image=IMAGE, guidance_scale=5.0)
    expected = reference(**kwargs, generator=seeded()).images
    assert np.array_equal(pipe(**kwargs, generator=seeded()).images, expected)


@pytest.mark.parametrize("embeddings", [False, True], ids=["image", "precomputed embeddings"])
def test_under_guidance_the_ip_adapter_gives_diffusers_images(pair, embeddings):
    family, reference, pipe = pair
    source = {"ip_adapter_image": IMAGE}
    if embeddings:  # diffusers' layout under CFG: the negative image embeddings, then the image's
        source = {"ip_adapter_image_embeds": reference.prepare_ip_adapter_image_embeds(IMAGE, None, "cpu", 2, True)}
    kwargs = call_kwargs(family, prompt=["a red circle", "a blue square"], negative_prompt=["x", "y"], **source)
    expected = reference(**kwargs, generator=seeded(), guidance_scale=5.0).images
    result = pipe(**kwargs, generator=seeded(), guidance=ClassifierFreeGuidance(5.0))
    assert np.abs(result.images - expected).max() <= 1e-5
    pipe.set_ip_adapter_scale(0.0)
    without = pipe(**kwargs, generator=seeded(), guidance=ClassifierFreeGuidance(5.0)).images
    pipe.set_ip_adapter_scale(1.0)
    assert np.abs(result.images - without).max() > 1e-3  # the adapter does something
    skipping = pipe(**kwargs, generator=seeded(), guidance=AdaptiveGuidance(5.0, threshold=1e-6))
    assert skipping.trace.nfe == 4.0 and np.isfinite(skipping.images).all()  # rows leave the batch with their embeds


def test_diffusers_ip_adapter_scale_cutoff_callback_works_under_guidance(pair):
    family, reference, pipe = pair
    kwargs = call_kwargs(family, prompt="a red circle", ip_adapter_image=IMAGE, num_inference_steps=4)
    callback = IPAdapterScaleCutoffCallback(cutoff_step_ratio=0.5)
    expected = reference(**kwargs, generator=seeded(), guidance_scale=5.0, callback_on_step_end=callback).images
    reference.set_ip_adapter_scale(1.0)
    result = pipe(**kwargs, generator=seeded(), guidance=ClassifierFreeGuidance(5.0), callback_on_step_end=callback)
    assert np.abs(result.images - expected).max() <= 1e-5
    assert torch.is_tensor(reference.unet.encoder_hid_proj.image_projection_layers[0].image_embeds.weight)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_sd3_and_flux_ip_adapters_are_refused_under_guidance_by_name(family):
    pipe = build(family)
    with pytest.raises(
        ValueError,
        match=r"`ip_adapter_image` is not supported together with `guidance` \(got .*\): "
        r"call without `guidance` \(diffusers' own IP-Adapter path\); under `guidance` SD and SDXL",
    ):
        pipe(**call_kwargs(family, prompt="x"), ip_adapter_image=IMAGE, guidance=ClassifierFreeGuidance(5.0))
