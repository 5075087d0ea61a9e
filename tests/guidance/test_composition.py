"""Policies composed of independent parts: which rows run the unconditional pass, which scale, which model."""

import contextlib
import copy

import numpy as np
import pytest
import torch
from conftest import build, call_kwargs, seeded, size_kwargs

from guidance import (
    AdaptiveGuidance,
    AdaptiveSkip,
    ClassifierFreeGuidance,
    DynamicGuidance,
    GuiderScale,
    LinearAdaptiveGuidance,
    ScheduledGuidance,
    ScheduledScale,
    SeparateModel,
    SwitchedModel,
    UnconditionalSkip,
)
from guidance.evaluators import RewardEvaluator
from pipelines.training.linear_ag import calibrate

PROMPTS = ["a red circle", "a blue square"]


def run(pipe, policy, steps=4, **kwargs):
    return pipe(
        **call_kwargs("sd", prompt=PROMPTS, num_inference_steps=steps, **kwargs), generator=seeded(), guidance=policy
    )


def darkness():
    return RewardEvaluator(lambda images, prompts: -images.mean(dim=(1, 2, 3)), name="dark")


def test_adaptive_skipping_with_a_scheduled_scale(sd_pipe):
    scheduled = ScheduledScale(guidance_scale=2.0, final_guidance_scale=8.0, schedule="linear")
    never = run(sd_pipe, AdaptiveGuidance(scheduled, threshold=1.0))
    assert np.abs(never.images - run(sd_pipe, ScheduledGuidance(2.0, 8.0, "linear")).images).max() == 0
    assert never.trace.scales == [[2.0, 2.0], [4.0, 4.0], [6.0, 6.0], [8.0, 8.0]]
    at_once = run(sd_pipe, ClassifierFreeGuidance(scheduled, skip=AdaptiveSkip(threshold=1e-6)))
    assert at_once.trace.scales == [[2.0, 2.0]] + [[1.0, 1.0]] * 3 and at_once.trace.nfe == 5.0
    assert at_once.trace.extras[0]["similarity"][0] is not None


def test_dynamic_guidance_inside_an_interval_and_with_adaptive_skipping(sd_pipe):
    inside = run(sd_pipe, DynamicGuidance(candidates=[1.0, 5.0], evaluators=[darkness()], start=0.5), steps=5)
    assert [s["uncond"] for s in inside.trace.branches] == [[False, False]] * 2 + [[True, True]] * 3
    assert inside.trace.extras[1] == {} and "candidate_scores" in inside.trace.extras[2]
    skipping = DynamicGuidance(candidates=[1.0, 5.0], evaluators=[darkness()], skip=AdaptiveSkip(threshold=1e-6))
    result = run(sd_pipe, skipping)
    assert result.trace.nfe == 5.0 and result.trace.scales[1:] == [[1.0, 1.0]] * 3
    assert "candidate_scores" in result.trace.extras[0] and "candidate_scores" not in result.trace.extras[1]


class SecondRowStops(UnconditionalSkip):
    """A skipping rule of the test's own: row 1 runs the unconditional pass at step 0 only."""

    def rows(self, step, needed):
        return torch.tensor([needed, needed and step.step_index == 0])

    def complete(self, step, request, cond, uncond, needed):
        return uncond, request.uncond, {}


def test_a_skipping_rule_of_ones_own_composes_with_dynamic_guidance(sd_pipe):
    policy = DynamicGuidance(candidates=[1.0, 5.0], evaluators=[darkness()], skip=SecondRowStops())
    result = run(sd_pipe, policy)
    assert result.trace.nfe == (8 + 4 + 1) / 2 and [row[1] for row in result.trace.scales[1:]] == [1.0] * 3
    scores = result.trace.extras[2]["candidate_scores"]["dark"]
    assert len(scores[0]) == 2 and scores[1] is None  # the unguided row is not scored
    assert result.trace.extras[2]["weights"]["dark"][1] is None
    from guidance.plot import plot_dynamic_trace

    figure = plot_dynamic_trace(result.trace, sample=1)
    assert list(figure.axes[1].lines[0].get_xdata()) == [0]  # row 1 was scored at step 0 only


def policies(pipe):
    linear, _ = calibrate(pipe, PROMPTS + ["a green triangle"], 4, 4.0, batch_size=3, **size_kwargs("sd"))
    return {
        "cfg": ClassifierFreeGuidance(4.0),
        "scheduled": ScheduledGuidance(2.0, 6.0, "cosine"),
        "interval": ClassifierFreeGuidance(4.0, start=0.3),
        "ag": AdaptiveGuidance(4.0, threshold=0.99),
        "linear-ag": linear,
        "dynamic": DynamicGuidance(candidates=[1.0, 4.0], evaluators=[darkness()]),
    }


def perturbed(unet, seed=0):
    other = copy.deepcopy(unet)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in other.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return other


def test_any_policy_with_another_model_in_the_unconditional_branch():
    pipe = build("sd")
    twin, other = copy.deepcopy(pipe.unet), perturbed(pipe.unet)
    built = policies(pipe)
    calls = {"base": [], "twin": [], "other": []}
    for name, module in (("base", pipe.unet), ("twin", twin), ("other", other)):
        module.register_forward_pre_hook(
            lambda m, args, kwargs, n=name: calls[n].append(len(args[0])), with_kwargs=True
        )
    for name, policy in built.items():
        base = run(pipe, policy.new())
        same = run(pipe, policy.new(unconditional=SeparateModel(twin)))
        assert np.abs(same.images - base.images).max() <= 1e-5, name  # same weights, separate passes
        assert same.trace.nfe == base.trace.nfe, name
        changed = run(pipe, policy.new(unconditional=SeparateModel(other)))
        assert np.abs(changed.images - base.images).max() > 1e-3, name
        assert sum(calls["twin"]) == uncond_rows(same.trace) and sum(calls["other"]) == uncond_rows(changed.trace)
        assert sum(calls["base"]) == 2 * 4 * 3 + uncond_rows(base.trace), name  # cond rows of 3 runs + base's uncond
        for key in calls:
            calls[key].clear()


def uncond_rows(trace) -> int:
    return sum(sum(step["uncond"]) for step in trace.branches)


def test_switched_weights_compute_the_unconditional_branch_and_are_restored(sd_pipe):
    other = perturbed(sd_pipe.unet)
    before = {k: v.clone() for k, v in sd_pipe.unet.state_dict().items()}

    @contextlib.contextmanager
    def swap(denoiser):
        original = {k: v.clone() for k, v in denoiser.state_dict().items()}
        denoiser.load_state_dict(other.state_dict())
        try:
            yield
        finally:
            denoiser.load_state_dict(original)

    switched = run(sd_pipe, AdaptiveGuidance(4.0, threshold=0.99, unconditional=SwitchedModel(swap)))
    separate = run(sd_pipe, AdaptiveGuidance(4.0, threshold=0.99, unconditional=SeparateModel(other)))
    assert np.abs(switched.images - separate.images).max() <= 1e-5
    after = sd_pipe.unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # left as found


def test_unconditional_models_are_checked():
    with pytest.raises(TypeError, match=r"`model` must be a torch.nn.Module \(a denoiser\), got str"):
        SeparateModel("unet")
    with pytest.raises(TypeError, match="`switch` must be a callable returning a context manager, got int"):
        SwitchedModel(3)
    pipe = build("sd")
    half = SeparateModel(copy.deepcopy(pipe.unet).to(torch.float16))
    with pytest.raises(ValueError, match=r"the unconditional model is on cpu in torch.float16, the pipeline's"):
        run(pipe, ClassifierFreeGuidance(3.0, unconditional=half))


def test_composed_configs_round_trip(tmp_path):
    policy = ClassifierFreeGuidance(
        ScheduledScale(guidance_scale=3.0, final_guidance_scale=9.0, schedule="cosine"),
        skip=AdaptiveSkip(threshold=0.98, compared="prediction"),
        stop=0.9,
    )
    assert policy.config.guidance_scale["_class_name"] == "ScheduledScale"
    policy.save_pretrained(tmp_path)
    loaded = ClassifierFreeGuidance.from_pretrained(tmp_path)
    assert isinstance(loaded.scale, ScheduledScale) and loaded.scale.config.final_guidance_scale == 9.0
    assert isinstance(loaded.skip, AdaptiveSkip) and loaded.skip.config.compared == "prediction"
    assert loaded.stop == 0.9 and repr(loaded) == repr(policy)
    pipe = build("sd")
    assert np.abs(run(pipe, loaded).images - run(pipe, policy).images).max() == 0
    (tmp_path / "guidance_config.json").write_text(
        (tmp_path / "guidance_config.json").read_text().replace('"AdaptiveSkip"', '"MagicSkip"')
    )
    with pytest.raises(ValueError, match=r"saved guidance part 'MagicSkip' is unknown; known parts: \["):
        ClassifierFreeGuidance.from_pretrained(tmp_path)


def test_a_composed_linear_ag_saves_its_coefficients(tmp_path):
    pipe = build("sd")
    fitted, _ = calibrate(pipe, PROMPTS, 4, 4.0, exact_steps=[0, 1], **size_kwargs("sd"))
    composed = ClassifierFreeGuidance(ScheduledScale(4.0, 2.0, "linear"), skip=fitted.skip)
    composed.save_pretrained(tmp_path)
    loaded = ClassifierFreeGuidance.from_pretrained(tmp_path)
    torch.testing.assert_close(loaded.skip.calibration.coefficients, fitted.coefficients)
    result = run(pipe, loaded)
    assert [e["uncond"] for e in result.trace.extras] == ["exact"] * 2 + ["synthesised"] * 2
    assert result.trace.scales[0][0] == 4.0 and result.trace.scales[-1][0] == 2.0


def test_new_gives_fresh_run_state_and_shares_objects(sd_pipe):
    evaluator = darkness()
    policy = DynamicGuidance(candidates=[1.0, 3.0], evaluators=[evaluator], skip=AdaptiveSkip(threshold=1e-6))
    run(sd_pipe, policy)
    fresh = policy.new(candidates=[2.0, 5.0])
    assert fresh.skip is not policy.skip and fresh.evaluators == [evaluator] and not hasattr(fresh.skip, "converged")
    assert fresh.config.candidates == [2.0, 5.0] and policy.config.candidates == [1.0, 3.0]


def test_a_diffusers_guider_as_the_scale_rule(sd_pipe, tmp_path):
    from diffusers import guiders

    ours = run(sd_pipe, ClassifierFreeGuidance(5.0))
    bridged = run(sd_pipe, ClassifierFreeGuidance(GuiderScale(guiders.ClassifierFreeGuidance(guidance_scale=5.0))))
    assert np.abs(bridged.images - ours.images).max() == 0 and bridged.trace.scales == ours.trace.scales
    apg = ClassifierFreeGuidance(
        GuiderScale(guiders.AdaptiveProjectedGuidance(guidance_scale=5.0, adaptive_projected_guidance_momentum=-0.5)),
        skip=AdaptiveSkip(threshold=0.99),
    )
    projected = run(sd_pipe, apg)
    assert np.isfinite(projected.images).all() and np.abs(projected.images - ours.images).max() > 1e-3
    assert projected.trace.nfe <= ours.trace.nfe
    apg.save_pretrained(tmp_path)
    again = run(sd_pipe, ClassifierFreeGuidance.from_pretrained(tmp_path))
    assert np.abs(again.images - projected.images).max() == 0  # the guider's momentum restarts with each run
    window = run(sd_pipe, ClassifierFreeGuidance(GuiderScale(guiders.ClassifierFreeGuidance(5.0, start=0.5))))
    assert window.trace.scales == [[1.0, 1.0]] * 2 + [[5.0, 5.0]] * 2 and window.trace.nfe == 6.0


def test_guiders_that_need_model_hooks_are_refused():
    from diffusers import guiders

    with pytest.raises(ValueError, match=r"`guider` PerturbedAttentionGuidance needs predictions \['pred_cond', "):
        GuiderScale(guiders.PerturbedAttentionGuidance(perturbed_guidance_layers=[0]))
    with pytest.raises(ValueError, match=r"`guider` AutoGuidance needs .* or model hooks"):
        GuiderScale(guiders.AutoGuidance(auto_guidance_layers=[0], dropout=0.1))
    with pytest.raises(TypeError, match="`guider` must be a diffusers.guiders guider, got float"):
        GuiderScale(5.0)
    with pytest.raises(ValueError, match="saved diffusers guider 'Nope' is not a class of diffusers.guiders"):
        GuiderScale({"class_name": "Nope"})


def test_linear_ag_composes_with_other_models_only_from_step_zero(sd_pipe):
    fitted, _ = calibrate(sd_pipe, PROMPTS, 4, 4.0, exact_steps=[0], **size_kwargs("sd"))
    inputs = sd_pipe.prepare(**{**call_kwargs("sd", prompt=PROMPTS, num_inference_steps=4), "output_type": None})
    with pytest.raises(ValueError, match="a run must start at step 0, got a run starting at step 2"):
        sd_pipe.denoise(inputs, LinearAdaptiveGuidance.new(fitted), latents=inputs.latents, start_index=2)


def test_a_nested_dynamic_scale_round_trips_with_its_evaluators(tmp_path, sd_pipe):
    from guidance import DynamicScale

    dark = darkness()
    policy = ClassifierFreeGuidance(DynamicScale(candidates=[1.0, 4.0], evaluators=[dark]), skip=AdaptiveSkip(0.99))
    policy.save_pretrained(tmp_path)
    saved = ClassifierFreeGuidance.load_config(tmp_path)
    assert saved["guidance_scale"]["evaluators"] == ["dark"]  # their names: what a config can hold
    scale = DynamicScale.from_config(saved["guidance_scale"], evaluators=[dark])  # the part, given its objects
    loaded = ClassifierFreeGuidance.from_pretrained(tmp_path, guidance_scale=scale)
    assert loaded.scale.evaluators == [dark] and loaded.skip.config.threshold == 0.99
    assert np.abs(run(sd_pipe, loaded).images - run(sd_pipe, policy).images).max() == 0
    with pytest.raises(ValueError, match=r"saved with the evaluators \['dark'\], which a config cannot hold: pass"):
        ClassifierFreeGuidance.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"`ClassifierFreeGuidance` got unknown arguments \['evaluators'\]; valid: "):
        ClassifierFreeGuidance.from_pretrained(tmp_path, evaluators=[dark])


def test_a_guider_scale_refuses_the_policys_rescaling():
    from diffusers import guiders

    with pytest.raises(ValueError, match=r"`guidance_rescale` must be 0 with GuiderScale, which combines .* got 0.7"):
        ClassifierFreeGuidance(GuiderScale(guiders.ClassifierFreeGuidance(5.0)), guidance_rescale=0.7)
