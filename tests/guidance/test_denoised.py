import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler

from guidance import GuidanceStep
from guidance.denoised import predict_x0


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
