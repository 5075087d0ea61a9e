"""LinearAG calibration (Castillo et al., arXiv 2312.12487, sec. 5): full-CFG trajectories of a pipeline, the
per-step least-squares fit of the unconditional prediction on past predictions (`guidance.linear_ag.fit_coefficients`),
and the policy that uses it. The coefficients hold for the pipeline's scheduler class, the step count (and the
timesteps it makes: PNDM and Heun evaluate the model more often than `num_inference_steps`) and the latent size."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from guidance import ClassifierFreeGuidance, GuidanceRun, LinearAdaptiveGuidance
from guidance.linear_ag import LinearAGCalibration, default_exact_steps, fit_coefficients


class RecordPredictions(ClassifierFreeGuidance):
    """Constant CFG that keeps every step's conditional and unconditional predictions (the calibration data)."""

    def reset(self, run: GuidanceRun) -> None:
        super().reset(run)
        self.history: list[dict[str, torch.Tensor]] = []
        self.timesteps = [float(t) for t in run.scheduler.timesteps]

    def combine(self, step, request, predictions):
        self.history.append(predictions)
        return super().combine(step, request, predictions)


def calibrate(
    pipe,
    prompts: list[str],
    num_inference_steps: int,
    guidance_scale: float,
    exact_steps: list[int] | None = None,
    window: int = 2,
    batch_size: int = 16,
    seed: int = 0,
    **call_kwargs,
) -> tuple[LinearAdaptiveGuidance, list[float]]:
    """Fit LinearAG coefficients for `pipe` on full-CFG trajectories of `prompts` (one image each); `exact_steps`
    are indices of the run's timesteps (default: the first 20%)."""
    if not prompts:
        raise ValueError("calibration needs at least one prompt, got none")
    recorder = RecordPredictions(guidance_scale=guidance_scale)
    cond, uncond = [], []
    for start in tqdm(range(0, len(prompts), batch_size), desc="calibration trajectories"):
        batch = prompts[start : start + batch_size]
        generators = [torch.Generator().manual_seed(seed + start + k) for k in range(len(batch))]
        pipe(
            batch,
            num_inference_steps=num_inference_steps,
            generator=generators,
            output_type="latent",
            guidance=recorder,
            **call_kwargs,
        )
        cond.append(torch.stack([step["cond"] for step in recorder.history]))
        uncond.append(torch.stack([step["uncond"] for step in recorder.history]))
    cond, uncond = torch.cat(cond, dim=1), torch.cat(uncond, dim=1)
    num_timesteps = cond.shape[0]
    exact = default_exact_steps(num_timesteps) if exact_steps is None else list(exact_steps)
    if not exact or any(not 0 <= s < num_timesteps for s in exact):
        raise ValueError(
            f"`exact_steps` must be indices of the run's {num_timesteps} timesteps, in [0, {num_timesteps}), got "
            f"{exact}"
        )
    coefficients, residuals = fit_coefficients(cond, uncond, exact, window)
    calibration = LinearAGCalibration(
        coefficients,
        exact_steps=sorted(set(exact)),
        window=window,
        num_inference_steps=num_inference_steps,
        scheduler_class=type(pipe.scheduler).__name__,
        latent_shape=list(cond.shape[2:]),
        timesteps=recorder.timesteps,
    )
    return LinearAdaptiveGuidance(guidance_scale, calibration=calibration), residuals
