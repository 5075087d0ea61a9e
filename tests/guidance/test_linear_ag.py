import json

import numpy as np
import pytest
import torch
from conftest import REFERENCE, build, call_kwargs, seeded, size_kwargs
from diffusers import EulerDiscreteScheduler, HeunDiscreteScheduler, PNDMScheduler

from guidance import ClassifierFreeGuidance, LinearAdaptiveGuidance, LinearAGCalibration
from guidance.linear_ag import fit_coefficients
from guidance.shapes.assets import ASSETS
from pipelines.application.commands.calibrate_linear_ag import main
from pipelines.training.linear_ag import calibrate

PROMPTS = ["a red circle", "a blue square", "a green triangle", "a small yellow circle", "a large square", "red"]


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    pipe = build("sd")
    policy, residuals = calibrate(pipe, PROMPTS, 5, 5.0, exact_steps=[0, 1], batch_size=4, **size_kwargs("sd"))
    folder = tmp_path_factory.mktemp("linear-ag")
    policy.save_pretrained(folder)
    return folder, residuals


def test_fit_recovers_a_known_affine_combination():
    torch.manual_seed(0)
    cond = torch.randn(4, 8, 3, 5)
    uncond = torch.empty_like(cond)
    uncond[0] = torch.randn(8, 3, 5)
    for i in range(1, 4):  # an exact affine law, which the fit must find
        uncond[i] = 0.5 * cond[i] - 0.25 * cond[i - 1] + 0.75 * uncond[i - 1] + 0.1
    coefficients, residuals = fit_coefficients(cond, uncond, exact_steps=[0], window=1)
    torch.testing.assert_close(coefficients[2], torch.tensor([0.5, -0.25, 0.75, 0.1]), atol=1e-5, rtol=0)
    assert residuals[0] == 0.0 and max(residuals) < 1e-5


def test_calibrated_policy_round_trips_and_saves_unconditional_passes(fitted):
    folder, residuals = fitted
    assert len(residuals) == 5 and residuals[:2] == [0.0, 0.0] and all(0 < r < 1 for r in residuals[2:])
    calibration = LinearAGCalibration.from_pretrained(folder)
    assert calibration.scheduler_class == "DDIMScheduler" and calibration.latent_shape == [4, 8, 8]
    assert json.loads((folder / "guidance_config.json").read_text())["exact_steps"] is None  # the calibration's
    policy = LinearAdaptiveGuidance.from_pretrained(folder)
    pipe = build("sd")
    kwargs = call_kwargs("sd", prompt=PROMPTS[:2], num_inference_steps=5)
    result = pipe(**kwargs, generator=seeded(), guidance=policy)
    assert result.trace.nfe == 7.0  # 5 conditional + 2 exact unconditional passes
    assert [e["uncond"] for e in result.trace.extras] == ["exact"] * 2 + ["synthesised"] * 3
    assert result.trace.scales == [[5.0, 5.0]] * 5
    cfg = pipe(**kwargs, generator=seeded(), guidance=ClassifierFreeGuidance(5.0))
    plain = pipe(**kwargs, generator=seeded(), guidance=ClassifierFreeGuidance(1.0))
    assert np.abs(result.images - cfg.images).mean() < np.abs(plain.images - cfg.images).mean()


def test_every_step_exact_is_cfg(fitted):
    folder, _ = fitted
    policy = LinearAdaptiveGuidance.from_pretrained(folder, exact_steps=[0, 1, 2, 3, 4])
    pipe = build("sd")
    kwargs = call_kwargs("sd", prompt="a red circle", num_inference_steps=5)
    expected = pipe(**kwargs, generator=seeded(), guidance=ClassifierFreeGuidance(5.0)).images
    assert np.abs(pipe(**kwargs, generator=seeded(), guidance=policy).images - expected).max() == 0


def test_coefficients_for_another_setup_are_refused(fitted):
    folder, _ = fitted
    pipe = build("sd")
    policy = LinearAdaptiveGuidance.from_pretrained(folder)
    with pytest.raises(
        ValueError,
        match=r"fitted for DDIMScheduler with 5 inference steps \(5 timesteps\), this run uses DDIMScheduler with 6 "
        r"inference steps \(6 timesteps\): calibrate for it with `guided-calibrate-linear-ag`",
    ):
        pipe(**call_kwargs("sd", prompt="x", num_inference_steps=6), guidance=policy)
    with pytest.raises(ValueError, match=r"fitted for latents of shape \[4, 8, 8\], this run has \[4, 16, 16\]"):
        pipe(**call_kwargs("sd", prompt="x", num_inference_steps=5, height=32, width=32), guidance=policy)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    with pytest.raises(
        ValueError, match=r"fitted for DDIMScheduler with 5 .*, this run uses EulerDiscreteScheduler with 5 inference"
    ):
        pipe(**call_kwargs("sd", prompt="x", num_inference_steps=5), guidance=policy)
    pipe.scheduler = HeunDiscreteScheduler.from_config(pipe.scheduler.config)
    with pytest.raises(
        ValueError, match=r"this run uses HeunDiscreteScheduler with 5 inference steps \(9 timesteps\)"
    ):
        pipe(**call_kwargs("sd", prompt="x", num_inference_steps=5), guidance=policy)


@pytest.mark.parametrize("scheduler_class", [PNDMScheduler, HeunDiscreteScheduler])
def test_calibrated_for_a_multistage_scheduler_it_runs_there(scheduler_class):
    """Failure 2 of the core v2 issue: PNDM and Heun evaluate the model more often than the step count."""
    pipe = build("sd")
    pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config)
    policy, residuals = calibrate(pipe, PROMPTS, 4, 5.0, batch_size=3, **size_kwargs("sd"))
    timesteps = len(residuals)
    calibration = policy.calibration
    assert timesteps > 4 and calibration.num_timesteps == timesteps and calibration.num_inference_steps == 4
    result = pipe(**call_kwargs("sd", prompt=PROMPTS[:2], num_inference_steps=4), guidance=policy)
    exact = len(policy.skip.exact_steps)
    assert result.trace.num_steps == timesteps and result.trace.nfe == timesteps + exact
    assert np.isfinite(result.images).all()


def test_an_interval_that_leaves_out_the_exact_steps_is_refused():
    """Failure 3: synthesising from predictions that never ran must raise, not guide with zeros."""
    shipped = LinearAdaptiveGuidance.from_pretrained(ASSETS / "linear-ag" / "shapes-sd-20")
    message = (
        r"LinearAG's guidance interval \[0.3, 1.0\] guides steps 6-19 of 20, but step 6 would be synthesised from "
        r"the unconditional predictions of steps 4-5, and those before step 6 never run "
        r"\(exact steps: \[0, 1, 2, 3\]\)"
        r": start the interval at 0, or calibrate with exact steps \[6, 7\]"
    )
    with pytest.raises(ValueError, match=message):
        shipped.new(start=0.3)
    with pytest.raises(ValueError, match=r"guides steps 6-19 of 20"):
        LinearAdaptiveGuidance.from_pretrained(ASSETS / "linear-ag" / "shapes-sd-20", start=0.3)
    assert shipped.new(stop=0.5).config.stop == 0.5  # guiding the first half only needs nothing that never ran
    later = shipped.new(exact_steps=[6, 7], start=0.3)  # exact where the interval starts: allowed
    assert later.config.exact_steps == [6, 7]


def test_an_interval_runs_exact_steps_inside_it_and_synthesises_after(fitted):
    folder, _ = fitted
    policy = LinearAdaptiveGuidance.from_pretrained(folder, stop=0.5)  # steps 0-2 guided, exact 0-1
    pipe = build("sd")
    result = pipe(**call_kwargs("sd", prompt=PROMPTS[:2], num_inference_steps=5), guidance=policy)
    assert [e["uncond"] for e in result.trace.extras] == ["exact", "exact", "synthesised", "none", "none"]
    assert result.trace.nfe == 7.0 and result.trace.scales == [[5.0, 5.0]] * 3 + [[1.0, 1.0]] * 2


def test_missing_or_corrupt_coefficients_folder(tmp_path, fitted):
    with pytest.raises(ValueError, match="lacks guidance_config.json: run `guided-calibrate-linear-ag`"):
        LinearAdaptiveGuidance.from_pretrained(tmp_path / "nothing")
    folder, _ = fitted
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "guidance_config.json").write_text("{oops")
    (broken / "linear_ag_coefficients.safetensors").write_bytes(
        (folder / "linear_ag_coefficients.safetensors").read_bytes()
    )
    with pytest.raises(ValueError, match="is corrupt"):
        LinearAdaptiveGuidance.from_pretrained(broken)
    (broken / "guidance_config.json").write_text((folder / "guidance_config.json").read_text())
    calibration = LinearAGCalibration.from_pretrained(folder)
    calibration.window = 3  # the saved description no longer fits the coefficients
    from safetensors.torch import save_file

    save_file(
        {"coefficients": calibration.coefficients},
        broken / "linear_ag_coefficients.safetensors",
        metadata={"linear_ag": json.dumps({"exact_steps": [0, 1], "window": 3, "num_inference_steps": 5})},
    )
    with pytest.raises(
        ValueError,
        match=r"is corrupt \(LinearAG coefficients must have shape \(timesteps, 8\) for "
        r"window 3, got \(5, 6\)\)",
    ):
        LinearAdaptiveGuidance.from_pretrained(broken)
    save_file({"coefficients": calibration.coefficients}, broken / "linear_ag_coefficients.safetensors")
    with pytest.raises(ValueError, match=r"is corrupt \('linear_ag'\)"):  # no description of the fit
        LinearAdaptiveGuidance.from_pretrained(broken)
    (broken / "linear_ag_coefficients.safetensors").unlink()
    with pytest.raises(ValueError, match="lacks linear_ag_coefficients.safetensors: run `guided-calibrate-linear-ag`"):
        LinearAdaptiveGuidance.from_pretrained(broken)
    with pytest.raises(ValueError, match="LinearAG has no coefficients: load a calibration folder"):
        build("sd")(**call_kwargs("sd", prompt="x"), guidance=LinearAdaptiveGuidance())


def test_the_fit_runs_in_float64_on_the_cpu_and_returns_float32():
    """Failure 5: MPS has no float64, so the fit never asks the device for it."""
    torch.manual_seed(0)
    cond, uncond = torch.randn(3, 4, 2, 5).half(), torch.randn(3, 4, 2, 5).half()
    coefficients, residuals = fit_coefficients(cond, uncond, exact_steps=[0], window=1)
    assert coefficients.dtype == torch.float32 and coefficients.shape == (3, 4) and residuals[0] == 0.0


def test_calibration_needs_prompts(tmp_path, capsys):
    with pytest.raises(ValueError, match="calibration needs at least one prompt, got none"):
        calibrate(build("sd"), [], 5, 5.0)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", "tiny:sd", "--prompts-file", str(empty), "--output", str(tmp_path / "out")])
    assert exit_info.value.code == 2 and "no prompts" in capsys.readouterr().err


def test_calibration_command_writes_a_loadable_folder(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS))
    out = tmp_path / "coefficients"
    args = ["--model", "tiny:sd", "--prompts-file", str(prompts), "--num-inference-steps", "4", "--output", str(out)]
    assert main(args + ["--exact-steps", "0", "--guidance-scale", "3"]) == 0
    printed = capsys.readouterr().out
    assert "trajectories of DDIMScheduler with 4 inference steps (4 timesteps)" in printed
    assert "relative residual per step: 0:0.000 1:" in printed
    assert LinearAdaptiveGuidance.from_pretrained(out).skip.exact_steps == [0]


@pytest.mark.parametrize("family", list(REFERENCE))
def test_works_in_every_pipeline_with_negative_prompts(family):
    pipe = build(family)
    kwargs = call_kwargs(family, prompt=["a red circle", "blue"], negative_prompt=["green", "yellow"])
    policy, _ = calibrate(pipe, ["a red circle", "blue", "a square"], 3, 4.0, exact_steps=[0], **size_kwargs(family))
    result = pipe(**kwargs, guidance=policy)
    assert result.trace.nfe == 4.0 and np.isfinite(result.images).all()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_inference_steps": 0}, r"`num_inference_steps` must be an int >= 1, got 0"),
        ({"window": -1}, r"`window` must be an int >= 0, got -1"),
        ({"exact_steps": [5]}, r"`exact_steps` must be step indices in \[0, 4\), got \[5\]"),
        ({"exact_steps": []}, r"`exact_steps` must be step indices in \[0, 4\), got \[\]"),
        ({"timesteps": [1.0]}, r"`timesteps` must list the 4 timesteps of the fit, got 1"),
        (
            {"coefficients": torch.zeros(4, 5)},
            r"coefficients must have shape \(timesteps, 6\) for window 2, got \(4, 5\)",
        ),
    ],
)
def test_bad_linear_ag_arguments(kwargs, message):
    fit = {"coefficients": torch.zeros(4, 6), "exact_steps": [0], "window": 2, "num_inference_steps": 4}
    with pytest.raises(ValueError, match=message):
        LinearAGCalibration(**{**fit, **kwargs})
    calibration = LinearAGCalibration(**fit)
    with pytest.raises(ValueError, match=r"`exact_steps` must be step indices in \[0, 4\), got \[4\]"):
        LinearAdaptiveGuidance(exact_steps=[4], calibration=calibration)
    with pytest.raises(TypeError, match=r"`calibration` must be a LinearAGCalibration or None, got Tensor"):
        LinearAdaptiveGuidance(calibration=torch.zeros(4, 6))


def test_new_and_composition_keep_loaded_coefficients():
    shipped = LinearAdaptiveGuidance.from_pretrained(ASSETS / "linear-ag" / "shapes-sd-20")
    torch.testing.assert_close(shipped.new(guidance_scale=5.0).coefficients, shipped.coefficients)
    composed = ClassifierFreeGuidance(5.0, skip=shipped.skip)
    torch.testing.assert_close(composed.new().skip.calibration.coefficients, shipped.coefficients)


def test_exact_steps_of_the_calibration_cannot_be_dropped(fitted):
    folder, _ = fitted  # fitted with exact steps [0, 1]
    with pytest.raises(
        ValueError,
        match=r"no fit for steps \[1\], which were exact at calibration \(exact steps of "
        r"the fit: \[0, 1\]\): keep them in `exact_steps`, got \[0\]",
    ):
        LinearAdaptiveGuidance.from_pretrained(folder, exact_steps=[0])
    assert LinearAdaptiveGuidance.from_pretrained(folder, exact_steps=[0, 1, 3]).config.exact_steps == [0, 1, 3]


def test_a_scale_rule_that_skips_the_exact_steps_cannot_synthesise_from_nothing(fitted):
    from diffusers import guiders

    from guidance import GuiderScale

    folder, _ = fitted
    policy = LinearAdaptiveGuidance.from_pretrained(folder)
    window = GuiderScale(guiders.ClassifierFreeGuidance(5.0, start=0.5))
    late = ClassifierFreeGuidance(window, skip=policy.skip)
    message = (
        r"cannot synthesise the unconditional prediction of step 2: the unconditional predictions of steps \[0, 1\]"
    )
    with pytest.raises(ValueError, match=message + ", which it is built from, never ran"):
        build("sd")(**call_kwargs("sd", prompt="x", num_inference_steps=5), guidance=late)


def test_coefficients_for_another_sigma_schedule_of_the_same_class_are_refused():
    from diffusers import DPMSolverMultistepScheduler

    pipe = build("sd")
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    policy, _ = calibrate(pipe, PROMPTS[:3], 4, 4.0, **size_kwargs("sd"))
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, use_karras_sigmas=True)
    with pytest.raises(ValueError, match=r"fitted for the timesteps \[.*\], this run's are \[.*\] \(another spacing"):
        pipe(**call_kwargs("sd", prompt="x", num_inference_steps=4), guidance=policy)


def test_argument_errors_are_not_blamed_on_the_folder(fitted):
    folder, _ = fitted
    with pytest.raises(ValueError, match=r"^`guidance_scale` must be a finite number >= 0, got -1"):
        LinearAdaptiveGuidance.from_pretrained(folder, guidance_scale=-1.0)
