"""Calibrate LinearAG: run full-CFG trajectories, fit per-step coefficients, save them for `from_pretrained`.

    python -m guidance.calibrate_linear_ag --model shapes:sd --num-inference-steps 20 --guidance-scale 7.5 \\
        --prompts-file assets/shapes-calibration-prompts.txt --output assets/linear-ag/shapes-sd-20
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .cfg import ClassifierFreeGuidance
from .linear_ag import LinearAdaptiveGuidance, default_exact_steps, fit_coefficients


class RecordingGuidance(ClassifierFreeGuidance):
    """Constant CFG that keeps every step's conditional and unconditional predictions."""

    keeps_history = True


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
    """Fit LinearAG coefficients for `pipe` on full-CFG trajectories of `prompts` (one image each)."""
    if not prompts:
        raise ValueError("calibration needs at least one prompt, got none")
    recorder = RecordingGuidance(guidance_scale=guidance_scale)
    cond, uncond = [], []
    for start in tqdm(range(0, len(prompts), batch_size), desc="calibration trajectories"):
        batch = prompts[start : start + batch_size]
        generators = [torch.Generator().manual_seed(seed + start + k) for k in range(len(batch))]
        pipe(batch, num_inference_steps=num_inference_steps, generator=generators, output_type="latent",
             guidance=recorder, **call_kwargs)  # fmt: skip
        cond.append(torch.stack([step["cond"] for step in recorder.history]))
        uncond.append(torch.stack([step["uncond"] for step in recorder.history]))
    cond, uncond = torch.cat(cond, dim=1), torch.cat(uncond, dim=1)
    exact = default_exact_steps(num_inference_steps) if exact_steps is None else exact_steps
    coefficients, residuals = fit_coefficients(cond, uncond, exact, window)
    policy = LinearAdaptiveGuidance(
        guidance_scale=guidance_scale,
        num_inference_steps=num_inference_steps,
        exact_steps=exact,
        window=window,
        scheduler_class=type(pipe.scheduler).__name__,
        latent_shape=list(cond.shape[2:]),
    )
    policy.coefficients = coefficients
    return policy, residuals


def main(argv: list[str] | None = None) -> int:
    from pipelines.generate import call_defaults, load_pipeline, read_prompts

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="shapes:sd", help="as guided-generate's --model (folder, shapes:sd, ...)")
    parser.add_argument("--prompts-file", required=True, help="calibration prompts, one per line (~200)")
    parser.add_argument("--prompt", action="append", help="extra prompts (repeatable)")
    parser.add_argument("--num-inference-steps", type=int, default=20, help="steps the coefficients are for")
    parser.add_argument("--guidance-scale", type=float, default=7.5, help="CFG scale of the trajectories")
    parser.add_argument("--exact-steps", default=None, help="comma-separated steps keeping the exact pass")
    parser.add_argument("--window", type=int, default=2, help="past steps in the affine combination")
    parser.add_argument("--batch-size", type=int, default=16, help="trajectories per pipeline call")
    parser.add_argument("--seed", type=int, default=0, help="trajectory k uses seed + k")
    parser.add_argument("--output", required=True, help="folder for the config and coefficients")
    args = parser.parse_args(argv)
    try:
        prompts = read_prompts(args)
        exact = None if args.exact_steps is None else [int(s) for s in args.exact_steps.split(",") if s.strip()]
        pipe, family = load_pipeline(args.model)
    except (ValueError, TypeError, FileNotFoundError) as error:
        parser.error(str(error))
    pipe.set_progress_bar_config(disable=True)
    policy, residuals = calibrate(
        pipe, prompts, args.num_inference_steps, args.guidance_scale, exact, args.window, args.batch_size,
        args.seed, **call_defaults(args.model, family),
    )  # fmt: skip
    policy.save_pretrained(args.output)
    print(f"fitted on {len(prompts)} trajectories; exact steps {policy.config.exact_steps}")
    print("relative residual per step: " + " ".join(f"{i}:{r:.3f}" for i, r in enumerate(residuals)))
    print(f"saved to {Path(args.output).resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
