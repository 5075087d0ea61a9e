"""The forward process and its one-step inverse, for the diffusers schedulers of `pipelines.schedulers` (KDPM2's
interpolated sigmas are not handled): noised latents for training, and the denoised estimate x0 a policy can compare
or score; and a cheap copy of a scheduler to step aside.

Three parameterisations of a noisy latent `x` at noise level `sigma`:
- flow matching (SD3, Flux; FlowMatch schedulers, `use_flow_sigmas`): `x = (1 - sigma) x0 + sigma eps`, the model
  predicts the velocity `v = eps - x0`;
- sigma-scaled (Euler, Heun, LMS, ...: `init_noise_sigma > 1`): `x = x0 + sigma eps` (Karras et al. 2022), which is
  `sqrt(1 + sigma^2)` times a variance-preserving latent with `alpha_t = 1 / sqrt(1 + sigma^2)`;
- variance-preserving (DDIM, PNDM, DPM-Solver, UniPC, DEIS): `x = alpha_t x0 + sigma_t eps`, `alpha_t^2 =
  alpha_bar_t`; schedulers that keep `sigmas` store `sigma_t / alpha_t` there, used as is (Karras spacing rounds
  the timesteps, not the sigmas).
"""

from __future__ import annotations

import copy

import torch

from .scheduler import GuidanceStep


def copy_scheduler(scheduler):
    """A diffusers scheduler to step without touching `scheduler`: its state containers (multistep histories, counters)
    are copied; tensors and other objects are shared, since schedulers replace them rather than change them in place
    (a Brownian-tree noise sampler, DPM-Solver SDE's, cannot be copied and answers the same query with the same
    noise). Much cheaper than `copy.deepcopy`, which copies every schedule tensor and the config."""
    fresh = copy.copy(scheduler)
    for name, value in vars(scheduler).items():
        if isinstance(value, (list, dict)) and name != "_internal_dict":
            setattr(fresh, name, copy.copy(value))
    return fresh


def is_flow_matching(scheduler) -> bool:
    """Whether a diffusers scheduler samples a flow-matching model (SD3, Flux; `x = (1 - sigma) x0 + sigma eps`)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler

    config = scheduler.config
    return (
        isinstance(scheduler, (FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler))
        or config.get("prediction_type") == "flow_prediction"
        or bool(config.get("use_flow_sigmas", False))
    )


class ForwardProcess:
    """The forward process at the training timesteps `t` of a scheduler: `x_t = a_t x0 + s_t eps`, with
    `a = sqrt(alpha_bar_t)`, `s = sqrt(1 - alpha_bar_t)` (variance preserving, t in 0..T-1) or `a = 1 - sigma`,
    `s = sigma`, `sigma = t / T` (flow matching, t in [0, T]); and the x0 and eps a model's output stands for
    (epsilon, v or the flow velocity `v = eps - x0`)."""

    def __init__(self, scheduler):
        self.flow = is_flow_matching(scheduler)
        self.num_train_timesteps = scheduler.config.num_train_timesteps
        self.last = self.num_train_timesteps if self.flow else self.num_train_timesteps - 1
        self.prediction_type = "flow" if self.flow else scheduler.config.get("prediction_type", "epsilon")
        self.alphas_cumprod = None if self.flow else scheduler.alphas_cumprod.float()

    def coefficients(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(a_t, s_t) in float32, shaped to broadcast over rows of `like`."""
        shape = (-1, *[1] * (like.dim() - 1))
        if self.flow:
            sigma = (t.float() / self.num_train_timesteps).to(like.device).view(shape)
            return 1 - sigma, sigma
        alpha_bar = self.alphas_cumprod.to(like.device)[t.long().to(like.device)].view(shape)
        return alpha_bar.sqrt(), (1 - alpha_bar).sqrt()

    def x0_and_eps(self, output: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The clean estimate and the noise a model's `output` at `(x, t)` implies, in float32."""
        a, s = self.coefficients(t, x)
        output = output.float()
        if self.prediction_type == "epsilon":
            return (x - s * output) / a, output
        if self.prediction_type == "v_prediction":
            return a * x - s * output, s * x + a * output
        if self.prediction_type == "flow":
            return x - s * output, x + a * output
        raise ValueError(
            f"prediction type {self.prediction_type!r} has no x0 and eps here (epsilon, v_prediction, flow)"
        )


def variance_preserving_coefficients(step: GuidanceStep, like: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(input scale, alpha_t, sigma_t): `input scale * x` is the variance-preserving `alpha_t x0 + sigma_t eps`."""
    scheduler, sigma = step.scheduler, step.sigma
    if sigma is not None:
        sigma = sigma.to(like.device, like.dtype)
        alpha = (1 + sigma**2).rsqrt()
        scale = alpha if getattr(scheduler, "init_noise_sigma", 1.0) != 1.0 else torch.ones_like(alpha)
        return scale, alpha, sigma * alpha
    alpha_bar = scheduler.alphas_cumprod.to(like.device)[int(step.timestep)].to(like.dtype)
    return torch.ones_like(alpha_bar), alpha_bar.sqrt(), (1 - alpha_bar).sqrt()


def predict_x0(step: GuidanceStep, prediction: torch.Tensor) -> torch.Tensor:
    """The x0 estimate of `prediction` at this step, for the run's scheduler and its prediction type, computed and
    returned in float32 whatever the model's dtype (bfloat16 cancels too much in `x - sigma eps`)."""
    x, prediction = step.latents.float(), prediction.float()
    if is_flow_matching(step.scheduler):
        return x - step.sigma.to(x.device, x.dtype) * prediction
    prediction_type = step.scheduler.config.get("prediction_type", "epsilon")
    if prediction_type in ("sample", "original_sample"):
        return prediction
    scale, alpha, sigma = variance_preserving_coefficients(step, x)
    if prediction_type == "v_prediction":
        return alpha * scale * x - sigma * prediction
    return (scale * x - sigma * prediction) / alpha


def add_noise(scheduler, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """`x0` noised to training `timesteps` (one per row) as the model was trained (`ForwardProcess`), in x0's dtype."""
    a, s = ForwardProcess(scheduler).coefficients(timesteps, x0)
    return a.to(x0.dtype) * x0 + s.to(x0.dtype) * noise


def signal_power(scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """`a_t^2`: `alpha_bar_t` (variance-preserving) or `(1 - sigma)^2` (flow matching) at training `timesteps`, near
    zero at high noise, so a loss weighted by it ignores what cannot be seen."""
    process = ForwardProcess(scheduler)
    if process.flow:
        return (1 - timesteps.float() / process.num_train_timesteps) ** 2
    return process.alphas_cumprod[timesteps.long().cpu()]
