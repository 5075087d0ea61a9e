"""Every shipped policy with every diffusers scheduler people use, on tiny real components of each family
(the matrix of benchmarks/scheduler_matrix.py, asserted cell by cell).

A batch of 2 prompts with negative prompts and `num_images_per_prompt=2` (4 rows), 4 steps: no error, no NaN, the
trace's NFE equal to the rows the denoiser really saw (a forward hook counts them), one trace entry per model
evaluation, and at constant CFG the images of diffusers' own pipeline with the same scheduler.
"""

import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import build, call_kwargs

from guidance import ClassifierFreeGuidance, DynamicGuidance
from guidance.evaluators import Evaluator
from pipelines.schedulers import set_scheduler

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from scheduler_matrix import CASES, NO_REFERENCE, POLICIES, counted_call, run_case  # noqa: E402


@pytest.mark.parametrize(("family", "scheduler"), CASES)
def test_every_policy_runs_with_every_scheduler_and_cfg_matches_diffusers(family, scheduler):
    case = run_case(family, scheduler)
    assert list(case["cells"]) == POLICIES
    for name, cell in case["cells"].items():
        assert cell["error"] is None, (name, cell["error"])
        assert cell["finite"], name
        assert cell["nfe"] == cell["counted_nfe"], name
        assert cell["evaluations"] == case["timesteps"], name
        if name.startswith("dynamic"):
            assert set(cell["scales"]) <= {1.0, 4.0, 7.0}, name
    assert case["cells"]["cfg"]["nfe"] == 2 * case["timesteps"]
    assert case["cells"]["linear-ag"]["nfe"] < case["cells"]["cfg"]["nfe"]
    if (family, scheduler) in NO_REFERENCE:
        assert case["parity"] is None
    else:
        assert case["parity"] <= 1e-4


def test_flux_with_flow_match_heun_uses_its_own_schedule_and_refuses_custom_sigmas():
    pipe = set_scheduler(build("flux"), "flow-heun")
    inputs = pipe.prepare(**call_kwargs("flux", prompt="a", num_inference_steps=3))
    assert inputs.num_timesteps == 5  # Heun: 2 evaluations per step but the last
    with pytest.raises(ValueError, match=r"`sigmas`: FlowMatchHeunDiscreteScheduler.set_timesteps takes no custom"):
        pipe.prepare(**call_kwargs("flux", prompt="a", num_inference_steps=3), sigmas=[1.0, 0.6, 0.3])


class Farthest(Evaluator):
    """Prefers the candidate whose look-ahead lies farthest from the first candidate's: the largest scale, since the
    look-ahead is affine in the scale."""

    space = "latent"

    def __init__(self, num_candidates):
        super().__init__("farthest")
        self.k = num_candidates

    def forward(self, candidates):
        x = candidates.latents.flatten(1).view(self.k, -1, candidates.latents[0].numel())
        return (x - x[:1]).norm(dim=-1).flatten()


@pytest.mark.parametrize("scheduler", ["pndm", "dpm++2m", "unipc", "heun", "lms", "dpm-sde"])
def test_next_latent_look_ahead_keeps_the_run_equal_to_cfg_at_the_chosen_scale(scheduler):
    """Failure 1 of the core v2 issue: multistep schedulers keep a history of `batch` rows, and the look-ahead
    stepped `candidates x batch` rows through it; now each candidate steps its own copy of the run's scheduler, which
    the run never sees."""
    pipe = set_scheduler(build("sd"), scheduler)
    policy = DynamicGuidance(candidates=[1.0, 4.0, 7.0], evaluators=[Farthest(3)], lookahead="next_latent")
    dynamic, nfe, _ = counted_call(pipe, policy, "sd")
    cfg, _, _ = counted_call(pipe, ClassifierFreeGuidance(7.0), "sd")
    assert dynamic.trace.scales == [[7.0] * 4] * dynamic.trace.num_steps
    assert np.abs(dynamic.images - cfg.images).max() == 0 and nfe == cfg.trace.nfe


def test_scheduler_names_are_checked():
    with pytest.raises(ValueError, match=r"`scheduler` must be one of \['ddim', 'deis', .*got 'karras'"):
        set_scheduler(build("sd"), "karras")
    with pytest.raises(
        ValueError,
        match=r"`scheduler` 'flow-euler' is for flow-matching \(SD3, Flux\) models; this "
        r"pipeline uses DDIMScheduler: choose one of \['ddim', ",
    ):
        set_scheduler(build("sd"), "flow-euler")
    with pytest.raises(ValueError, match=r"'euler' is for diffusion \(SD 1.x/2.x, SDXL\) models; .* \['flow-euler'"):
        set_scheduler(build("sd3"), "euler")
