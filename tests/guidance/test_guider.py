"""PolicyGuider, driven through diffusers' guider contract by hand (the calls a modular denoise block makes): batches
per condition, the policy's combination, the trace, configuration, and what it refuses at construction."""

import contextlib

import numpy as np
import pytest
import torch
from diffusers.guiders import ClassifierFreeGuidance as DiffusersCFG

from guidance import (
    AdaptiveGuidance,
    ClassifierFreeGuidance,
    DynamicGuidance,
    LinearAdaptiveGuidance,
    LinearAGCalibration,
    ScheduledGuidance,
    SeparateModel,
    SwitchedModel,
)
from guidance.evaluators import RewardEvaluator
from guidance.guider import PolicyGuider

BATCH = 2


class Scheduled:
    """An object with a scheduler, as a modular pipeline has (the guider reads `pipeline.scheduler`)."""

    def __init__(self, steps: int = 3):
        from diffusers import FlowMatchEulerDiscreteScheduler

        self.scheduler = FlowMatchEulerDiscreteScheduler()
        self.scheduler.set_timesteps(steps)


def inputs(seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    cond, uncond = torch.randn((2, BATCH, 5, 8), generator=generator)
    latents = torch.randn((BATCH, 4, 3, 3), generator=generator)
    return {"encoder_hidden_states": (cond, uncond), "hidden_states": (latents, latents)}


def predictions(batches, seed: int = 1) -> None:
    """Each batch's `noise_pred`: a prediction per row it holds (what the denoiser would return)."""
    generator = torch.Generator().manual_seed(seed)
    for batch in batches:
        rows = batch.hidden_states.shape[0]
        batch.noise_pred = torch.randn((rows, 4, 3, 3), generator=generator)


def step(guider, i, steps=3):
    """One step of a denoise block: state, batches, a model pass per batch, the guider's combination."""
    guider.set_state(step=i, num_inference_steps=steps, timestep=torch.tensor(1000.0 - 300 * i))
    batches = guider.prepare_inputs(inputs(i))
    denoiser = torch.nn.Identity()
    for _ in batches:
        guider.prepare_models(denoiser)
        guider.cleanup_models(denoiser)
    predictions(batches, seed=10 + i)
    return batches, guider(batches)


def test_constant_cfg_combines_as_diffusers_guider_bitwise():
    ours, theirs = PolicyGuider(ClassifierFreeGuidance(4.5)), DiffusersCFG(guidance_scale=4.5)
    for i in range(3):
        batches, output = step(ours, i)
        theirs.set_state(step=i, num_inference_steps=3, timestep=torch.tensor(1.0))
        expected = theirs.prepare_inputs(inputs(i))
        predictions(expected, seed=10 + i)
        reference = theirs(expected)
        assert [b.__guidance_identifier__ for b in batches] == ["pred_cond", "pred_uncond"]
        assert torch.equal(output.pred, reference.pred) and torch.equal(output.pred_cond, reference.pred_cond)
    assert ours.trace.nfe == 6.0 and ours.trace.scales == [[4.5, 4.5]] * 3


def test_before_a_step_is_prepared_two_conditions_are_announced():
    """Encoders read `num_conditions` before the loop to decide whether to encode the negative prompt."""
    guider = PolicyGuider(ClassifierFreeGuidance(1.0))
    assert guider.num_conditions == 2
    batches, output = step(guider, 0)
    assert len(batches) == 1  # scale 1: the unconditional pass is not run
    assert torch.equal(output.pred, batches[0].noise_pred) and output.pred_uncond is None
    assert guider.num_conditions == 2  # after the step: what the next run's encoders read
    guider.set_state(step=1, num_inference_steps=3, timestep=torch.tensor(1.0))
    guider.prepare_inputs(inputs(1))
    assert guider.num_conditions == 1
    guider.set_state(step=1, num_inference_steps=3, timestep=torch.tensor(1.0))
    assert guider.num_conditions == 2


def test_a_disabled_guider_runs_the_conditional_batch_only():
    guider = PolicyGuider(ClassifierFreeGuidance(5.0))
    guider.disable()
    batches, output = step(guider, 0)
    assert len(batches) == 1
    assert guider.trace.scales == [[1.0, 1.0]] and guider.trace.branches[0]["uncond"] == [False, False]


def test_batch_rules_turn_a_per_row_request_into_batches():
    """Row 0 converged at step 0 (similarity 1 > threshold), row 1 did not: "any" keeps the unconditional batch for
    both rows, "all" drops it for both, "per_row" runs row 1 only."""

    runs = {}
    for rule in ("any", "all", "per_row"):
        guider = PolicyGuider(AdaptiveGuidance(5.0, threshold=0.5, compared="prediction"), batch_rule=rule)
        guider.set_state(step=0, num_inference_steps=3, timestep=torch.tensor(1.0))
        batches = guider.prepare_inputs(inputs(0))
        cond = torch.randn((BATCH, 4, 3, 3), generator=torch.Generator().manual_seed(5))
        batches[0].noise_pred = cond
        batches[1].noise_pred = torch.stack([cond[0], -cond[1]])  # row 0 agrees, row 1 does not
        guider(batches)
        batches, _ = step(guider, 1)
        runs[rule] = ([len(b.hidden_states) for b in batches], guider.trace.branches[1]["uncond"], guider.trace.nfe)
    assert runs["any"] == ([2, 2], [True, True], 4.0)
    assert runs["all"] == ([2], [False, False], 3.0)
    assert runs["per_row"] == ([2, 1], [False, True], 3.5)


def test_per_row_batches_scatter_back_with_the_other_rows_unguided():
    guider = PolicyGuider(AdaptiveGuidance(5.0, threshold=0.5, compared="prediction"), batch_rule="per_row")
    guider.set_state(step=0, num_inference_steps=3, timestep=torch.tensor(1.0))
    batches = guider.prepare_inputs(inputs(0))
    cond = torch.ones((BATCH, 4, 3, 3))
    batches[0].noise_pred, batches[1].noise_pred = cond, torch.stack([cond[0], -cond[1]])
    guider(batches)
    guider.set_state(step=1, num_inference_steps=3, timestep=torch.tensor(1.0))
    batches = guider.prepare_inputs(inputs(1))
    assert batches[1].encoder_hidden_states.shape[0] == 1  # every per-row input of the batch holds row 1 only
    torch.testing.assert_close(batches[1].encoder_hidden_states, inputs(1)["encoder_hidden_states"][1][1:])
    batches[0].noise_pred, batches[1].noise_pred = 2 * cond, torch.zeros((1, 4, 3, 3))
    output = guider(batches)
    assert torch.isnan(output.pred_uncond[0]).all() and not torch.isnan(output.pred_uncond[1]).any()
    torch.testing.assert_close(output.pred[0], 2 * cond[0])  # converged: unguided
    torch.testing.assert_close(output.pred[1], 5.0 * 2 * cond[1])  # eps_u + 5 (eps_c - eps_u), eps_u = 0
    assert guider.trace.scales[1] == [1.0, 5.0]


def test_a_new_run_starts_at_step_zero_with_a_fresh_trace_and_policy():
    guider = PolicyGuider(ScheduledGuidance(2.0, final_guidance_scale=6.0))
    for i in range(3):
        step(guider, i)
    first = guider.trace
    for i in range(3):
        step(guider, i)
    assert guider.trace is not first and guider.trace.scales == first.scales == [[2.0] * 2, [4.0] * 2, [6.0] * 2]


def test_the_unconditional_model_context_is_entered_for_its_batch_only():
    entered = []

    @contextlib.contextmanager
    def switch(denoiser):
        entered.append("on")
        yield
        entered.append("off")

    guider = PolicyGuider(ClassifierFreeGuidance(3.0, unconditional=SwitchedModel(switch)))
    guider.set_state(step=0, num_inference_steps=3, timestep=torch.tensor(1.0))
    batches = guider.prepare_inputs(inputs(0))
    for batch in batches:
        guider.prepare_models(torch.nn.Identity())
        entered.append(batch.__guidance_identifier__)
        guider.cleanup_models(torch.nn.Identity())
    assert entered == ["pred_cond", "on", "pred_uncond", "off"]


def test_the_latents_are_read_from_the_denoisers_call_when_the_inputs_hide_them():
    """SDXL's and Wan's denoise steps give the guider the embeddings only: AG's x0 needs the latents, which a forward
    pre-hook reads from the conditional call (and removes). At sigma 1, `x0 = x - v`: predictions 0.5 x and 1.5 x give
    opposite x0 estimates (similarity -1) only with the real x."""
    pipeline = Scheduled()
    guider = PolicyGuider(AdaptiveGuidance(5.0, threshold=0.99), pipeline=pipeline)
    latents = torch.randn((BATCH, 4, 3, 3), generator=torch.Generator().manual_seed(3))
    denoiser = torch.nn.Identity()
    t = pipeline.scheduler.timesteps[0]
    guider.set_state(step=0, num_inference_steps=3, timestep=t)
    batches = guider.prepare_inputs({"encoder_hidden_states": inputs(0)["encoder_hidden_states"]})
    for batch, factor in zip(batches, (0.5, 1.5), strict=True):
        guider.prepare_models(denoiser)
        batch.noise_pred = factor * denoiser(latents)
        guider.cleanup_models(denoiser)
    assert not denoiser._forward_pre_hooks
    guider(batches)
    assert guider.trace.extras[0]["similarity"] == pytest.approx([-1.0, -1.0])


def test_save_and_load_with_the_policy_and_its_objects(tmp_path):
    calibration = LinearAGCalibration(torch.tensor([[0.0] * 4, [0.5, 0.2, 0.3, 0.0]]), [0], 1, 2)
    policy = LinearAdaptiveGuidance(4.0, calibration=calibration)
    guider = PolicyGuider(policy, batch_rule="all", pipeline=Scheduled(2))
    guider.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "guidance_config.json",
        "guider_config.json",
        "linear_ag_coefficients.safetensors",
    ]
    loaded = PolicyGuider.from_pretrained(tmp_path, pipeline=guider.pipeline)
    assert loaded.config.policy == guider.config.policy and loaded.batch_rule == "all"
    assert torch.equal(loaded.policy.skip.calibration.coefficients, calibration.coefficients)
    again = PolicyGuider.from_config(PolicyGuider(AdaptiveGuidance(3.0, 0.9, "prediction")).config)
    assert again.policy.config.threshold == 0.9 and again.policy.config.guidance_scale == 3.0
    fresh = guider.new(batch_rule="any")
    assert fresh.batch_rule == "any" and fresh.policy is not guider.policy
    assert fresh.policy.skip.calibration is calibration


def test_cfg_after_a_save_and_load_combines_the_same(tmp_path):
    PolicyGuider(ClassifierFreeGuidance(3.0, guidance_rescale=0.5)).save_pretrained(tmp_path)
    loaded, direct = PolicyGuider.from_pretrained(tmp_path), PolicyGuider(ClassifierFreeGuidance(3.0, 0.5))
    assert torch.equal(step(loaded, 0)[1].pred, step(direct, 0)[1].pred)


class Brightness(RewardEvaluator):
    def __init__(self):
        super().__init__(lambda images, prompts: images.mean(dim=(1, 2, 3)), name="brightness")


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (
            lambda: PolicyGuider(ClassifierFreeGuidance(4.0, unconditional=SeparateModel(torch.nn.Linear(2, 2)))),
            r"unconditional model SeparateModel\(Linear\) is another denoiser, and the modular pipeline's denoise "
            r"step calls its own",
        ),
        (
            lambda: PolicyGuider(AdaptiveGuidance(4.0)),
            r"AG compares x0 estimates, which need the scheduler's noise level, and a diffusers guider is not given "
            r"the scheduler: pass `pipeline=`",
        ),
        (
            lambda: PolicyGuider(LinearAdaptiveGuidance(4.0, calibration=None)),
            r"LinearAG checks the run's scheduler and timesteps against its fit.*pass `pipeline=`",
        ),
        (
            lambda: PolicyGuider(DynamicGuidance(evaluators=[Brightness()]), pipeline=Scheduled()),
            r"dynamic CFG's evaluators \['brightness'\] score decoded images, and Scheduled gives a guider no "
            r"decoder: pass `decode=`",
        ),
        (lambda: PolicyGuider("cfg"), r"`policy` must be a GuidanceScheduler .*got str"),
        (lambda: PolicyGuider(ClassifierFreeGuidance(2.0), batch_rule="rows"), r"`batch_rule` must be one of"),
        (lambda: PolicyGuider({"_class_name": "Nothing"}), r"saved guider policy 'Nothing' is not a policy"),
    ],
)
def test_what_a_guider_cannot_be_given_is_refused_at_construction(make, message):
    with pytest.raises((ValueError, TypeError), match=message):
        make()


def test_inputs_before_state_and_missing_unconditional_inputs_are_refused():
    guider = PolicyGuider(ClassifierFreeGuidance(4.0))
    with pytest.raises(ValueError, match=r"call `set_state\(step, num_inference_steps, timestep\)` before the inputs"):
        guider.prepare_inputs(inputs())
    guider.set_state(step=0, num_inference_steps=3, timestep=torch.tensor(1.0))
    cond = inputs()["encoder_hidden_states"][0]
    message = r"unconditional batch at step 0, but the modular pipeline gave no unconditional inputs for \['encoder_"
    with pytest.raises(ValueError, match=message):
        guider.prepare_inputs({"encoder_hidden_states": (cond, None)})


def test_a_folder_without_a_guider_config_is_refused(tmp_path):
    ClassifierFreeGuidance(2.0).save_pretrained(tmp_path)
    (tmp_path / "guider_config.json").write_text('{"_class_name": "PolicyGuider", "batch_rule": "any"}')
    with pytest.raises(ValueError, match=r"holds no PolicyGuider config \(no saved policy\)"):
        PolicyGuider.from_pretrained(tmp_path)


def test_trace_counts_what_ran():
    guider = PolicyGuider(ClassifierFreeGuidance(4.0, start=0.5))
    for i in range(3):
        step(guider, i)
    assert guider.trace.branches[0]["uncond"] == [False, False] and guider.trace.nfe == 5.0
    assert np.allclose(guider.trace.scales_tensor().numpy(), [[1.0, 1.0], [4.0, 4.0], [4.0, 4.0]])
