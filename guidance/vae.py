"""Latents as the pipelines denoise them <-> what a diffusers VAE encodes and decodes, for every family.

Mirrors the scaling of diffusers' pipelines: SD 1.x/2.x `z / scaling_factor`; SD3 and Flux
`z / scaling_factor + shift_factor`; SDXL-style VAEs with per-channel `latents_mean`/`latents_std`
`z * std / scaling_factor + mean`. A float16 VAE with `force_upcast` (SDXL's) decodes and encodes in float32, as
diffusers' SDXL pipeline does, since it overflows in float16.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch

_UPCAST_LOCK = threading.RLock()  # upcasting changes the VAE's weights in place: one caller at a time


def latent_statistics(vae, like: torch.Tensor) -> tuple[torch.Tensor | float, torch.Tensor | float]:
    """(mean, std) the VAE's latents are normalised with: per channel (`latents_mean`/`latents_std`), else
    (`shift_factor`, 1)."""
    config = vae.config
    mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
    if mean is not None and std is not None:
        view = (1, len(mean), *[1] * (like.ndim - 2))
        return (
            torch.tensor(mean).view(view).to(like.device, like.dtype),
            torch.tensor(std).view(view).to(like.device, like.dtype),
        )
    return getattr(config, "shift_factor", None) or 0.0, 1.0


def to_vae(vae, latents: torch.Tensor) -> torch.Tensor:
    """The pipelines' latents -> the latents `vae.decode` takes."""
    mean, std = latent_statistics(vae, latents)
    if isinstance(std, torch.Tensor):
        return latents * std / vae.config.scaling_factor + mean
    scaled = latents / vae.config.scaling_factor
    return scaled + mean if mean else scaled


def from_vae(vae, latents: torch.Tensor) -> torch.Tensor:
    """What `vae.encode` gives -> the latents the pipelines denoise (inverse of `to_vae`)."""
    mean, std = latent_statistics(vae, latents)
    return (latents - mean) * vae.config.scaling_factor / std


def weights(vae) -> torch.Tensor:
    """The VAE's first parameter: its dtype and device, read in O(1) (diffusers' `.dtype` walks every module)."""
    return next(vae.parameters())


@contextlib.contextmanager
def upcast(vae) -> Iterator[torch.dtype]:
    """Within: the VAE in float32 if it is a float16 VAE with `force_upcast`; yields the dtype it computes in."""
    dtype = weights(vae).dtype
    if not (getattr(vae.config, "force_upcast", False) and dtype == torch.float16):
        yield dtype
        return
    with _UPCAST_LOCK:
        vae.to(dtype=torch.float32)
        try:
            yield torch.float32
        finally:
            vae.to(dtype=torch.float16)


def execution_device(vae, like: torch.Tensor) -> torch.device:
    """Where the VAE's inputs must be: with offloading (weights elsewhere than `like`), where its hooks run it."""
    if weights(vae).device == like.device:
        return like.device
    from diffusers.utils.torch_utils import get_module_execution_device

    return get_module_execution_device(vae)


def decode(vae, latents: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Decoded images (about [-1, 1], not clamped) from the pipelines' latents, in the VAE's layout."""
    with upcast(vae) as dtype:
        inputs = to_vae(vae, latents.to(dtype)).to(execution_device(vae, latents))
        kwargs = {} if generator is None else {"generator": generator}
        return vae.decode(inputs, return_dict=False, **kwargs)[0]


def encode(
    vae, images: torch.Tensor, generator: torch.Generator | None = None, sample_mode: str = "argmax"
) -> torch.Tensor:
    """The pipelines' latents of images in [-1, 1] (batch, 3, H, W): the posterior's mode ("argmax", what editing
    reconstructs) or a sample ("sample", as diffusers' img2img draws)."""
    if sample_mode not in ("argmax", "sample"):
        raise ValueError(f"`sample_mode` must be 'argmax' or 'sample', got {sample_mode!r}")
    with upcast(vae) as dtype:
        output = vae.encode(images.to(execution_device(vae, images), dtype))
        if hasattr(output, "latent_dist"):
            dist = output.latent_dist
            latents = dist.mode() if sample_mode == "argmax" else dist.sample(generator)
        else:  # deterministic autoencoders (AutoencoderTiny) return latents directly
            latents = output.latents
        return from_vae(vae, latents)
