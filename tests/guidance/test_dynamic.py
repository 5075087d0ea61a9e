import math

import numpy as np
import pytest
import torch
from conftest import REFERENCE, build, call_kwargs, seeded

from guidance import ClassifierFreeGuidance, DynamicGuidance, DynamicScale, GuidanceRun
from guidance.evaluators import Candidates, Evaluator, RewardEvaluator


class Spread(Evaluator):
    """How far each candidate's look-ahead is from the first candidate's: grows with |scale - candidates[0]|,
    since the look-ahead is affine in the scale. `sign=1` prefers the largest scale, -1 the first."""

    space = "latent"

    def __init__(self, num_candidates, sign=1.0, name="spread"):
        super().__init__(name)
        self.k, self.sign = num_candidates, sign

    def forward(self, candidates):
        x = candidates.latents.flatten(1).view(self.k, -1, candidates.latents[0].numel())
        return (self.sign * (x - x[:1]).norm(dim=-1)).flatten()


class Constant(Evaluator):
    def __init__(self, output, name="constant"):
        super().__init__(name)
        self.output = output

    def forward(self, candidates):
        return self.output(len(candidates))


@pytest.mark.parametrize("family", list(REFERENCE))
@pytest.mark.parametrize("lookahead", ["x0", "next_latent"])
def test_greedy_choice_equals_cfg_at_the_chosen_scale_with_cfg_nfe(family, lookahead):
    pipe = build(family)
    kwargs = call_kwargs(family, prompt=["a red circle", "a blue square"], negative_prompt=["green", "black"])
    policy = DynamicGuidance(candidates=[1.0, 3.0, 7.5], evaluators=[Spread(3)], lookahead=lookahead)
    dynamic = pipe(**kwargs, generator=seeded(), guidance=policy)
    cfg = pipe(**kwargs, generator=seeded(), guidance=ClassifierFreeGuidance(7.5))
    assert np.abs(dynamic.images - cfg.images).max() == 0
    assert dynamic.trace.nfe == cfg.trace.nfe == 6.0  # no extra model pass
    assert dynamic.trace.scales == [[7.5, 7.5]] * 3
    extras = dynamic.trace.extras[0]
    assert extras["lookahead"] == lookahead and len(extras["candidate_scores"]["spread"]) == 2
    assert len(extras["candidate_scores"]["spread"][0]) == 3 and extras["weights"]["spread"] == [1.0, 1.0]


def test_auto_lookahead_is_next_latent_only_when_every_evaluator_reads_latents(sd_pipe):
    class PixelSpread(Spread):
        space = "pixel"

    kwargs = call_kwargs("sd", prompt=["a"], num_inference_steps=2)
    for evaluators, expected in [
        ([Spread(2)], "next_latent"),
        ([Spread(2), PixelSpread(2, name="pixel")], "x0"),
        ([PixelSpread(2)], "x0"),
    ]:
        policy = DynamicGuidance(candidates=[1.0, 5.0], evaluators=evaluators)
        assert policy.config.lookahead == "auto" and policy.lookahead_kind == expected
        assert sd_pipe(**kwargs, generator=seeded(), guidance=policy).trace.extras[0]["lookahead"] == expected


def test_prefers_scale_one_and_composes_with_a_guidance_interval(sd_pipe):
    policy = DynamicGuidance(candidates=[1.0, 5.0], evaluators=[Spread(2, sign=-1.0)], start=0.5)
    kwargs = call_kwargs("sd", prompt=["a", "b"], num_inference_steps=5)
    result = sd_pipe(**kwargs, generator=seeded(), guidance=policy)
    unguided = sd_pipe(**kwargs, generator=seeded(), guidance=ClassifierFreeGuidance(1.0))
    assert np.abs(result.images - unguided.images).max() <= 1e-6
    assert result.trace.nfe == 5 + 3  # unconditional pass at progress 0.5, 0.75, 1.0 only
    assert [step["uncond"] for step in result.trace.branches] == [[False, False]] * 2 + [[True, True]] * 3
    assert result.trace.extras[0] == {} and "candidate_scores" in result.trace.extras[2]


def test_pixel_evaluators_read_decoded_images_and_prompts(sd_pipe):
    seen = {}

    def reward(images, prompts):
        seen["images"], seen["prompts"] = images, prompts
        return -images.mean(dim=(1, 2, 3))  # prefers darker images

    policy = DynamicGuidance(candidates=[0.0, 2.0, 9.0], evaluators=[RewardEvaluator(reward)])
    sd_pipe(**call_kwargs("sd", prompt=["p", "q"], num_images_per_prompt=2), guidance=policy)
    assert seen["prompts"] == ["p", "p", "q", "q"] * 3  # candidates x rows, rows in diffusers' order
    assert seen["images"].shape == (12, 3, 16, 16) and seen["images"].abs().max() <= 1.0


def test_adaptive_weights_follow_each_evaluators_relative_change():
    scale = DynamicScale(candidates=[1.0, 2.0], evaluators=[Spread(2, name="a"), Spread(2, name="b")])
    scale.reset(GuidanceRun(batch_size=2, num_timesteps=3, num_inference_steps=3))
    rows = torch.tensor([0, 1])
    assert scale.evaluator_weights(torch.tensor([[2.0, 1.0], [-4.0, 1.0]]), rows).tolist() == [[1, 1], [1, 1]]
    weights = scale.evaluator_weights(torch.tensor([[3.0, 0.5], [-2.0, 0.5]]), rows)
    # a: (3 - 2) / 2 = 0.5 ; b: (-2 - -4) / |-4| = 0.5 ; sample 1: both fell -> all weights 1
    assert weights.tolist() == [[0.5, 1.0], [0.5, 1.0]]
    weights = scale.evaluator_weights(torch.tensor([[3.0, 1.0], [-3.0, 0.6]]), rows)
    # sample 0: a unchanged, b fell -> all weights 1; sample 1: a +100%, b +20%
    torch.testing.assert_close(weights, torch.tensor([[1.0, 1.0], [1.0, 0.2]]))
    # a row scored for the first time (its neighbour was skipped until now) weighs every evaluator 1
    fresh = DynamicScale(candidates=[1.0], evaluators=[Spread(1, name="a"), Spread(1, name="b")])
    fresh.reset(GuidanceRun(batch_size=2, num_timesteps=3, num_inference_steps=3))
    fresh.evaluator_weights(torch.tensor([[1.0], [1.0]]), torch.tensor([0]))
    both = fresh.evaluator_weights(torch.tensor([[2.0, 5.0], [1.5, 5.0]]), rows)
    assert both.tolist() == [[1.0, 1.0], [0.5, 1.0]]
    fixed = DynamicGuidance(
        candidates=[1.0], evaluators=[Spread(1, name="a"), Spread(1, name="b")], weighting="fixed", weights=[0.25, 2]
    )
    assert fixed.scale.evaluator_weights(torch.zeros(2, 3), torch.arange(3)).tolist() == [[0.25] * 3, [2.0] * 3]


def test_positional_arguments_land_in_their_own_config_keys(tmp_path):
    """Runtime objects (`evaluators`) are keyword-only, so positional arguments keep their config keys."""
    policy = DynamicGuidance([1.0, 4.0], "fixed", [2.0], evaluators=[Spread(2)])
    assert policy.config.weighting == "fixed" and policy.config.weights == [2.0] and policy.config.candidates == [1, 4]
    policy.save_pretrained(tmp_path)
    assert DynamicGuidance.from_pretrained(tmp_path, evaluators=[Spread(2)]).config.weighting == "fixed"


def test_config_round_trip_keeps_candidates_and_weights(tmp_path):
    policy = DynamicGuidance(candidates=[1, 4], evaluators=[Spread(2)], weighting="fixed", weights=[3])
    policy.save_pretrained(tmp_path)
    loaded = DynamicGuidance.from_pretrained(tmp_path, evaluators=[Spread(2)])
    assert loaded.config.candidates == [1.0, 4.0] and loaded.config.weights == [3.0]
    assert loaded.config.weighting == "fixed" and loaded.config.evaluators == ["spread"]  # names only
    changed = loaded.new(candidates=[2.0, 6.0])
    assert changed.config.candidates == [2.0, 6.0] and changed.evaluators == loaded.evaluators


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"candidates": []}, ValueError, r"`candidates` must be a non-empty list of guidance scales, got \[\]"),
        ({"candidates": [1.0, math.nan]}, ValueError, r"`candidates` must hold finite scales >= 0, got \[1.0, nan\]"),
        ({"candidates": [1.0, math.inf]}, ValueError, r"`candidates` must hold finite scales >= 0"),
        ({"candidates": [-1.0]}, ValueError, r"`candidates` must hold finite scales >= 0, got \[-1.0\]"),
        ({"evaluators": []}, ValueError, r"`evaluators` must be a non-empty list of Evaluator, got \[\]"),
        ({"evaluators": [len]}, TypeError, r"`evaluators` must hold guidance.evaluators.Evaluator, got builtin"),
        ({"weights": [1.0, 2.0]}, ValueError, r"`weights` must have one weight per evaluator \(1: \['spread'\]\)"),
        ({"weights": [math.nan]}, ValueError, r"`weights` must be finite, >= 0 and not all 0, got \[nan\]"),
        ({"weights": [0.0]}, ValueError, r"`weights` must be finite, >= 0 and not all 0"),
        ({"weighting": "linear"}, ValueError, r"`weighting` must be one of \['adaptive', 'fixed'\], got 'linear'"),
        ({"lookahead": "x1"}, ValueError, r"`lookahead` must be one of \['auto', 'x0', 'next_latent'\], got 'x1'"),
    ],
)
def test_bad_arguments(kwargs, error, message):
    arguments = {"candidates": [1.0, 3.0], "evaluators": [Spread(2)], **kwargs}
    with pytest.raises(error, match=message):
        DynamicGuidance(**arguments)


def test_duplicate_evaluator_names_are_refused():
    with pytest.raises(ValueError, match=r"`evaluators` must have distinct names .*\['spread', 'spread'\]"):
        DynamicGuidance(evaluators=[Spread(5), Spread(5)])


@pytest.mark.parametrize(
    ("output", "message"),
    [
        (
            lambda n: torch.zeros(n, 2),
            r"evaluator 'constant' must return one score per candidate, shape \(6,\); got "
            r"\(6, 2\)",
        ),
        (lambda n: [0.0] * n, r"evaluator 'constant' must return one score per candidate, shape \(6,\); got list"),
        (lambda n: torch.full((n,), math.nan), r"evaluator 'constant' returned non-finite scores: \[nan"),
    ],
)
def test_evaluator_output_is_checked_and_the_error_names_it(sd_pipe, output, message):
    policy = DynamicGuidance(candidates=[1.0, 2.0, 3.0], evaluators=[Constant(output)])
    with pytest.raises(ValueError, match=message):
        sd_pipe(**call_kwargs("sd", prompt=["a", "b"]), guidance=policy)


def test_alignment_evaluators_need_prompts():
    candidates = Candidates(latents=torch.zeros(2, 4, 2, 2), timestep=torch.zeros(2))
    with pytest.raises(ValueError, match=r"evaluator 'clip' scores image-text alignment and needs the prompts"):
        candidates.require_prompts("clip")
    with pytest.raises(ValueError, match=r"no decoder, so a pixel evaluator cannot score them"):
        _ = candidates.images


@pytest.mark.parametrize("family", list(REFERENCE))
def test_pixel_evaluators_decode_in_every_pipeline(family):
    pipe = build(family)
    seen = []

    def darkness(images, prompts):
        seen.append(images.shape)
        return -images.mean(dim=(1, 2, 3))

    policy = DynamicGuidance(candidates=[1.0, 4.0], evaluators=[RewardEvaluator(darkness, name="dark")])
    result = pipe(**call_kwargs(family, prompt=["a", "b"]), guidance=policy)
    assert seen[0][0] == 4 and seen[0][1] == 3  # 2 candidates x 2 images, decoded to RGB
    assert result.trace.nfe == 6.0 and len(result.trace.extras[0]["candidate_scores"]["dark"]) == 2


def test_new_refuses_unknown_config_keys():
    with pytest.raises(ValueError, match=r"`DynamicGuidance` got unknown arguments \['scale'\]; valid: "):
        DynamicGuidance(candidates=[1.0, 2.0], evaluators=[Spread(2)]).new(scale=3.0)
