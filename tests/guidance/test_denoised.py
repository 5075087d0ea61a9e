import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    HeunDiscreteScheduler,
)

from guidance import GuidanceStep
from guidance.denoised import add_noise, predict_x0, signal_power


def step_for(scheduler, index, latents):
    return GuidanceStep(index, len(scheduler.timesteps), scheduler.timesteps[index], latents, scheduler)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_variance_preserving_scheduler(prediction_type):
    scheduler = DDIMScheduler(prediction_type=prediction_type)
    scheduler.set_timesteps(10)
    x0, eps = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    alpha = scheduler.alphas_cumprod[int(scheduler.timesteps[3])]
    x_t = alpha.sqrt() * x0 + (1 - alpha).sqrt() * eps
    prediction = {"epsilon": eps, "v_prediction": alpha.sqrt() * eps - (1 - alpha).sqrt() * x0, "sample": x0}
    torch.testing.assert_close(predict_x0(step_for(scheduler, 3, x_t), prediction[prediction_type]), x0)


def test_sigma_scaled_scheduler():
    scheduler = EulerDiscreteScheduler()
    scheduler.set_timesteps(10)
    x0, eps = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    x_t = x0 + scheduler.sigmas[4] * eps
    torch.testing.assert_close(predict_x0(step_for(scheduler, 4, x_t), eps), x0)


def test_flow_matching_scheduler():
    scheduler = FlowMatchEulerDiscreteScheduler()
    scheduler.set_timesteps(10)
    x0, eps = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    sigma = scheduler.sigmas[2]
    x_t = (1 - sigma) * x0 + sigma * eps
    torch.testing.assert_close(predict_x0(step_for(scheduler, 2, x_t), eps - x0), x0)


@pytest.mark.parametrize("karras", [False, True])
def test_variance_preserving_scheduler_with_sigmas_uses_them(karras):
    """DPM-Solver keeps `sigma_t / alpha_t` per step (Karras spacing rounds the timesteps, not the sigmas)."""
    scheduler = DPMSolverMultistepScheduler(use_karras_sigmas=karras)
    scheduler.set_timesteps(10)
    x0, eps = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    sigma = scheduler.sigmas[3]
    alpha_t, sigma_t = (1 + sigma**2).rsqrt(), sigma * (1 + sigma**2).rsqrt()
    x_t = alpha_t * x0 + sigma_t * eps
    torch.testing.assert_close(predict_x0(step_for(scheduler, 3, x_t), eps), x0)


def test_heun_steps_are_aligned_with_their_sigmas():
    scheduler = HeunDiscreteScheduler()
    scheduler.set_timesteps(5)
    x0, eps = torch.randn(1, 4, 3, 3), torch.randn(1, 4, 3, 3)
    for index in (1, 2, 5):  # the duplicated middle evaluations
        x_t = x0 + scheduler.sigmas[index] * eps
        torch.testing.assert_close(predict_x0(step_for(scheduler, index, x_t), eps), x0)


@pytest.mark.parametrize("scheduler", [DDIMScheduler(), FlowMatchEulerDiscreteScheduler()])
def test_add_noise_is_the_forward_process_and_signal_power_its_weight(scheduler):
    x0, eps = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    t = torch.tensor([0, 500, 999])
    noised = add_noise(scheduler, x0, eps, t)
    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        sigma = (t / 1000).view(-1, 1, 1, 1)
        torch.testing.assert_close(noised, (1 - sigma) * x0 + sigma * eps)
        torch.testing.assert_close(signal_power(scheduler, t), (1 - t / 1000) ** 2)
    else:
        torch.testing.assert_close(noised, scheduler.add_noise(x0, eps, t))
        torch.testing.assert_close(signal_power(scheduler, t), scheduler.alphas_cumprod[t])
