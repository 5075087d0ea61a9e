import numpy as np
import pytest
from conftest import REFERENCE, build, call_kwargs, seeded

from guidance import AdaptiveGuidance, ClassifierFreeGuidance


@pytest.mark.parametrize("compared", ["x0", "prediction", "xt_minus_prediction"])
def test_threshold_one_is_plain_cfg(sd_pipe, compared):
    kwargs = call_kwargs("sd", prompt=["a red circle", "a blue square"], num_inference_steps=4)
    cfg = sd_pipe(**kwargs, generator=seeded(), guidance=ClassifierFreeGuidance(5.0))
    ag = sd_pipe(**kwargs, generator=seeded(), guidance=AdaptiveGuidance(5.0, threshold=1.0, compared=compared))
    assert np.abs(ag.images - cfg.images).max() == 0
    assert ag.trace.nfe == 8.0
    similarity = ag.trace.extras[0]["similarity"]
    assert len(similarity) == 2 and all(-1.0 <= g < 1.0 for g in similarity)


def test_low_threshold_stops_the_unconditional_pass_after_the_first_step(sd_pipe):
    policy = AdaptiveGuidance(5.0, threshold=1e-6)
    result = sd_pipe(**call_kwargs("sd", prompt=["a", "b"], num_inference_steps=5), guidance=policy)
    assert [step["uncond"] for step in result.trace.branches] == [[True, True]] + [[False, False]] * 4
    assert result.trace.nfe == 6.0
    assert result.trace.scales == [[5.0, 5.0]] + [[1.0, 1.0]] * 4
    assert result.trace.extras[1]["similarity"] == [None, None]
    assert policy.skip.converged.tolist() == [True, True]


def test_state_resets_between_generations(sd_pipe):
    policy = AdaptiveGuidance(5.0, threshold=1e-6)
    first = sd_pipe(**call_kwargs("sd", prompt="a"), guidance=policy)
    second = sd_pipe(**call_kwargs("sd", prompt="a"), guidance=policy)
    assert first.trace.nfe == second.trace.nfe == 4.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"threshold": 0.0}, r"`threshold` must be a number in \(0, 1\], got 0.0"),
        ({"threshold": 1.5}, r"`threshold` must be a number in \(0, 1\], got 1.5"),
        ({"threshold": "high"}, r"`threshold` must be a number in \(0, 1\], got 'high'"),
        ({"compared": "latents"}, r"`compared` must be one of \['x0', 'prediction', 'xt_minus_prediction'\]"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AdaptiveGuidance(**kwargs)


@pytest.mark.parametrize("family", list(REFERENCE))
def test_works_in_every_pipeline_with_negative_prompts(family):
    pipe = build(family)
    kwargs = call_kwargs(family, prompt=["a red circle", "blue"], negative_prompt=["green", "yellow"])
    cfg = pipe(**kwargs, generator=seeded(), guidance=ClassifierFreeGuidance(4.0))
    ag = pipe(**kwargs, generator=seeded(), guidance=AdaptiveGuidance(4.0, threshold=1e-6))
    assert ag.trace.nfe == 4.0 and cfg.trace.nfe == 6.0
    assert np.abs(ag.images - cfg.images).max() > 0  # the skipped passes really changed the last steps
