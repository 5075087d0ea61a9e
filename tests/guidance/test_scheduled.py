import pytest
import torch

from guidance import GuidanceStep, ScheduledGuidance, ScheduledScale


def scales(policy, n=5):
    return [policy.scale.value(GuidanceStep(i, n, torch.tensor(0), torch.zeros(1, 1), None)) for i in range(n)]


def test_linear_schedule_interpolates_first_to_last():
    assert scales(ScheduledGuidance(guidance_scale=1.0, final_guidance_scale=9.0, schedule="linear")) == pytest.approx(
        [1.0, 3.0, 5.0, 7.0, 9.0]
    )


def test_cosine_schedule_is_smooth_between_the_ends():
    values = scales(ScheduledGuidance(guidance_scale=8.0, final_guidance_scale=2.0, schedule="cosine"))
    assert values[0] == pytest.approx(8.0) and values[-1] == pytest.approx(2.0) and values[2] == pytest.approx(5.0)
    assert values[1] == pytest.approx(2.0 + 6.0 * (1 + 2**-0.5) / 2)


def test_constant_schedule_and_default_final_scale():
    assert scales(ScheduledGuidance(guidance_scale=4.0, schedule="constant")) == [4.0] * 5
    assert scales(ScheduledGuidance(guidance_scale=4.0, schedule="linear")) == [4.0] * 5


def test_steps_whose_scale_is_one_skip_the_unconditional_pass():
    policy = ScheduledGuidance(guidance_scale=1.0, final_guidance_scale=5.0, schedule="linear")
    step = GuidanceStep(0, 5, torch.tensor(0), torch.zeros(2, 1), None)
    assert not policy.branches(step).uncond.any()


def test_round_trip_keeps_the_schedule(tmp_path):
    ScheduledGuidance(guidance_scale=3.0, final_guidance_scale=6.0, schedule="cosine", stop=0.5).save_pretrained(
        tmp_path
    )
    loaded = ScheduledGuidance.from_pretrained(tmp_path)
    assert loaded.config.schedule == "cosine" and loaded.config.final_guidance_scale == 6.0
    assert loaded.config.stop == 0.5 and isinstance(loaded.scale, ScheduledScale)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"schedule": "exponential"},
            r"`schedule` must be one of \['constant', 'linear', 'cosine'\], got 'exponential'",
        ),
        ({"final_guidance_scale": -2.0}, r"`final_guidance_scale` must be a finite number >= 0, got -2.0"),
        ({"schedule": "constant", "final_guidance_scale": 3.0}, r"`final_guidance_scale` must be None"),
    ],
)
def test_bad_schedule_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ScheduledGuidance(**kwargs)
    with pytest.raises(ValueError, match=message):
        ScheduledScale(**kwargs)
