import math

import pytest
import torch

from guidance import BranchRequest, ClassifierFreeGuidance, GuidanceRun, GuidanceStep, GuidedPrediction


def make_step(i: int, n: int = 5, batch: int = 2) -> GuidanceStep:
    return GuidanceStep(i, n, torch.tensor(999 - i), torch.zeros(batch, 4, 2, 2), scheduler=None)


def started(policy, batch: int = 2, n: int = 5):
    policy.reset(GuidanceRun(batch_size=batch, num_timesteps=n, num_inference_steps=n))
    return policy


def test_combine_is_the_cfg_formula():
    cfg = started(ClassifierFreeGuidance(guidance_scale=3.0))
    cond, uncond = torch.randn(2, 4, 2, 2), torch.randn(2, 4, 2, 2)
    step = make_step(0)
    request = cfg.branches(step)
    assert request.cond.all() and request.uncond.all()
    guided = cfg.combine(step, request, {"cond": cond, "uncond": uncond})
    assert isinstance(guided, GuidedPrediction) and guided.extras == {}
    torch.testing.assert_close(guided.prediction, uncond + 3.0 * (cond - uncond))
    assert guided.scales.tolist() == [3.0, 3.0]


def test_scale_one_runs_the_conditional_branch_only():
    cfg = started(ClassifierFreeGuidance(guidance_scale=1.0))
    step = make_step(2)
    request = cfg.branches(step)
    assert not request.uncond.any()
    cond = torch.randn(2, 4, 2, 2)
    guided = cfg.combine(step, request, {"cond": cond})
    assert guided.prediction is cond and guided.scales.tolist() == [1.0, 1.0]


def test_guidance_interval_skips_the_unconditional_pass_outside():
    cfg = started(ClassifierFreeGuidance(guidance_scale=5.0, start=0.25, stop=0.75))
    guided_steps = [i for i in range(5) if cfg.branches(make_step(i, n=5)).uncond.all()]
    assert guided_steps == [1, 2, 3]  # progress 0.25, 0.5, 0.75


def test_partial_rows_take_the_conditional_prediction_where_unguided():
    cfg = started(ClassifierFreeGuidance(guidance_scale=2.0))
    cond = torch.randn(2, 3)
    uncond = torch.tensor([[0.5, 0.5, 0.5], [math.nan] * 3])
    request = BranchRequest.full(2, uncond=torch.tensor([True, False]))
    guided = cfg.combine(make_step(0), request, {"cond": cond, "uncond": uncond})
    torch.testing.assert_close(guided.prediction[0], uncond[0] + 2.0 * (cond[0] - uncond[0]))
    torch.testing.assert_close(guided.prediction[1], cond[1])
    assert guided.scales.tolist() == [2.0, 1.0]


def test_guidance_rescale_matches_std_rescaling():
    cfg = started(ClassifierFreeGuidance(guidance_scale=4.0, guidance_rescale=0.7))
    cond, uncond = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    guided = cfg.combine(make_step(0), cfg.branches(make_step(0)), {"cond": cond, "uncond": uncond})
    plain = uncond + 4.0 * (cond - uncond)
    ratio = cond.std(dim=(1, 2, 3), keepdim=True) / plain.std(dim=(1, 2, 3), keepdim=True)
    torch.testing.assert_close(guided.prediction, 0.7 * plain * ratio + 0.3 * plain)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"guidance_scale": -1.0}, ValueError, r"`guidance_scale` must be a finite number >= 0, got -1.0"),
        ({"guidance_scale": math.nan}, ValueError, r"`guidance_scale` must be a finite number >= 0, got nan"),
        ({"guidance_scale": math.inf}, ValueError, r"`guidance_scale` must be a finite number >= 0, got inf"),
        ({"guidance_scale": "7"}, TypeError, r"`guidance_scale` must be a number or a GuidanceScale, got str '7'"),
        ({"start": -0.1}, ValueError, r"`start` must be in \[0, 1\], got -0.1"),
        ({"stop": 1.5}, ValueError, r"`stop` must be in \[0, 1\], got 1.5"),
        ({"start": 0.8, "stop": 0.2}, ValueError, r"`start` must be <= `stop`.*got 0.8 > 0.2"),
        ({"guidance_rescale": 2.0}, ValueError, r"`guidance_rescale` must be in \[0, 1\], got 2.0"),
        ({"skip": 0.5}, TypeError, r"`skip` must be an UnconditionalSkip \(e.g. AdaptiveSkip\) or None, got float"),
        ({"unconditional": "npo"}, TypeError, r"`unconditional` must be an UnconditionalModel .* got str"),
    ],
)
def test_bad_arguments_are_named(kwargs, error, message):
    with pytest.raises(error, match=message):
        ClassifierFreeGuidance(**kwargs)


def test_config_round_trip_and_new(tmp_path):
    cfg = ClassifierFreeGuidance(guidance_scale=6.0, guidance_rescale=0.5, start=0.1, stop=0.9)
    cfg.save_pretrained(tmp_path)
    loaded = ClassifierFreeGuidance.from_pretrained(tmp_path)
    assert (loaded.config.guidance_scale, loaded.config.guidance_rescale) == (6.0, 0.5)
    assert (loaded.config.start, loaded.config.stop) == (0.1, 0.9)
    changed = cfg.new(guidance_scale=2.0)
    assert changed is not cfg and changed.config.guidance_scale == 2.0 and changed.config.stop == 0.9
    with pytest.raises(ValueError, match=r"`ClassifierFreeGuidance` got unknown arguments \['scale'\]; valid: \["):
        cfg.new(scale=2.0)
    with pytest.raises(ValueError, match="`guidance_scale` must be a finite number"):
        cfg.new(guidance_scale=-3)
