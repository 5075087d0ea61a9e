"""One-step estimates from a model prediction: the denoised latent x0 a policy can look at or score."""

from __future__ import annotations

import torch

from .scheduler import GuidanceStep


def predict_x0(step: GuidanceStep, prediction: torch.Tensor) -> torch.Tensor:
    """x0 estimate at this step for the pipeline's scheduler and prediction type.

    Flow matching (SD3, Flux): `x_t = (1 - sigma) x0 + sigma eps`, the model predicts `v = eps - x0`.
    Sigma-scaled schedulers (Euler, `init_noise_sigma > 1`): `x_t = x0 + sigma eps` (Karras et al. 2022).
    Variance-preserving schedulers (DDIM, DDPM, PNDM, DPM-Solver): `x_t = sqrt(a) x0 + sqrt(1 - a) eps`.
    """
    scheduler, x = step.scheduler, step.latents
    prediction_type = scheduler.config.get("prediction_type", "epsilon")
    if "FlowMatch" in type(scheduler).__name__:
        return x - step.sigma.to(x) * prediction
    if prediction_type in ("sample", "original_sample"):
        return prediction
    if getattr(scheduler, "init_noise_sigma", 1.0) != 1.0 and step.sigma is not None:
        sigma = step.sigma.to(x)
        if prediction_type == "v_prediction":
            return prediction * (-sigma / (sigma**2 + 1) ** 0.5) + x / (sigma**2 + 1)
        return x - sigma * prediction
    alpha = scheduler.alphas_cumprod.to(x.device)[int(step.timestep)].to(x.dtype)
    if prediction_type == "v_prediction":
        return alpha.sqrt() * x - (1 - alpha).sqrt() * prediction
    return (x - (1 - alpha).sqrt() * prediction) / alpha.sqrt()
