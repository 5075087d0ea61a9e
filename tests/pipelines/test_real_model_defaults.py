"""No toy part in a real model's defaults (failure 1 of the real-models issue): without named evaluators, dynamic
guidance scored an SDXL user's candidates with the 32-px shapes-world CLIP. On a tiny pipeline that is not a shapes
model, nothing the library or the commands default to may reach the shapes-world assets."""

import pytest
import torch
from conftest import build, call_kwargs, seeded

import guidance.shapes.assets as shapes_assets
from guidance import DynamicGuidance, DynamicScale
from guidance.evaluators import ClipEvaluator
from pipelines.application.options import METHODS, evaluator_from_spec, policy_from_options


@pytest.fixture()
def no_assets(monkeypatch):
    """The shapes-world assets, out of reach: any default that looks for them fails the test."""

    def unreachable():
        raise AssertionError("a real model's default reached the shapes-world assets")

    monkeypatch.setattr(shapes_assets, "assets_root", unreachable)


def test_dynamic_guidance_needs_evaluators_named_by_the_caller(no_assets):
    message = r"`evaluators` is required: a list of guidance.evaluators.Evaluator \(ClipEvaluator, "
    with pytest.raises(ValueError, match=message):
        DynamicGuidance()
    with pytest.raises(ValueError, match=message):
        DynamicScale()
    with pytest.raises(TypeError, match="missing 1 required positional argument: 'model'"):
        ClipEvaluator()


@pytest.mark.parametrize("model", ["tiny:sd", "tiny:sdxl"])
def test_the_application_defaults_of_a_real_model_never_reach_the_shapes_world(model, no_assets):
    with pytest.raises(ValueError, match=rf"dynamic guidance on '{model}' needs evaluators \(`evaluator`\): 'clip:"):
        policy_from_options({"guidance": "dynamic"}, model=model)
    with pytest.raises(
        ValueError,
        match=rf"evaluator 'clip' is the shapes-world CLIP, for the shapes models; for "
        rf"'{model}' use 'clip:",
    ):
        evaluator_from_spec("clip", model)
    with pytest.raises(ValueError, match="guidance 'linear-ag' needs `coefficients`"):
        policy_from_options({"guidance": "linear-ag"}, model=model, num_inference_steps=20)
    family = model.removeprefix("tiny:")
    pipe = build(family)
    for method in METHODS:
        if method in ("dynamic", "linear-ag"):
            continue  # refused above: they need what only the caller can name
        policy = policy_from_options({"guidance": method}, model=model, num_inference_steps=3)
        out = pipe(**call_kwargs(family, prompt="a red circle"), generator=seeded(), guidance=policy)
        assert torch.isfinite(torch.as_tensor(out.images)).all()
