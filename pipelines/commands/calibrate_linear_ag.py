"""Calibrate LinearAG: run full-CFG trajectories, fit per-step coefficients, save them for `from_pretrained`.

    guided-calibrate-linear-ag --model shapes:sd --num-inference-steps 20 --guidance-scale 7.5 \\
        --prompts-file assets/shapes-calibration-prompts.txt --output assets/linear-ag/shapes-sd-20

The coefficients hold for the pipeline's scheduler class, this step count (and the timesteps it makes: PNDM and
Heun evaluate the model more often than `--num-inference-steps`) and the latent size of the trajectories.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from guidance import ClassifierFreeGuidance, GuidanceRun, LinearAdaptiveGuidance
from guidance.linear_ag import default_exact_steps, fit_coefficients

from ..loading import call_defaults, load_pipeline
from ..schedulers import SCHEDULERS
from .common import check_at_least_one, read_prompt_file


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
        pipe(batch, num_inference_steps=num_inference_steps, generator=generators, output_type="latent",
             guidance=recorder, **call_kwargs)  # fmt: skip
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
    policy = LinearAdaptiveGuidance(
        guidance_scale=guidance_scale,
        num_inference_steps=num_inference_steps,
        num_timesteps=num_timesteps,
        exact_steps=exact,
        window=window,
        scheduler_class=type(pipe.scheduler).__name__,
        latent_shape=list(cond.shape[2:]),
        timesteps=recorder.timesteps,
        coefficients=coefficients,
    )
    return policy, residuals


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="guided-calibrate-linear-ag", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="shapes:sd", help="as guided-generate's --model (folder, shapes:sd, ...)")
    parser.add_argument("--prompts-file", required=True, help="calibration prompts, one per line (~200)")
    parser.add_argument("--prompt", action="append", help="extra prompts (repeatable)")
    parser.add_argument(
        "--scheduler",
        choices=sorted(SCHEDULERS),
        default=None,
        help="scheduler to calibrate for (default: the model's)",
    )
    parser.add_argument("--num-inference-steps", type=int, default=20, help="steps the coefficients are for")
    parser.add_argument("--guidance-scale", type=float, default=7.5, help="CFG scale of the trajectories")
    parser.add_argument(
        "--exact-steps", default=None, help="comma-separated timestep indices keeping the exact pass (default: 20%%)"
    )
    parser.add_argument("--window", type=int, default=2, help="past steps in the affine combination")
    parser.add_argument("--batch-size", type=int, default=16, help="trajectories per pipeline call")
    parser.add_argument("--seed", type=int, default=0, help="trajectory k uses seed + k")
    parser.add_argument("--output", required=True, help="folder for the config and coefficients")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        prompts = list(args.prompt or []) + read_prompt_file(args.prompts_file)
        check_at_least_one(args, "num_inference_steps", "batch_size")
        exact = None if args.exact_steps is None else [int(s) for s in args.exact_steps.split(",") if s.strip()]
        pipe, family = load_pipeline(args.model, scheduler=args.scheduler)
    except (ValueError, TypeError, FileNotFoundError) as error:
        parser.error(str(error))
    pipe.set_progress_bar_config(disable=True)
    policy, residuals = calibrate(
        pipe, prompts, args.num_inference_steps, args.guidance_scale, exact, args.window, args.batch_size,
        args.seed, **call_defaults(args.model, family),
    )  # fmt: skip
    policy.save_pretrained(args.output)
    print(
        f"fitted on {len(prompts)} trajectories of {policy.skip.describe()}; exact steps {policy.config.exact_steps}"
    )
    print("relative residual per step: " + " ".join(f"{i}:{r:.3f}" for i, r in enumerate(residuals)))
    print(f"saved to {Path(args.output).resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
