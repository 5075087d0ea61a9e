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

from ...schedulers import SCHEDULERS
from ...training.linear_ag import calibrate
from ..models import call_defaults, load_pipeline
from .common import check_at_least_one, read_prompt_file


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="guided-calibrate-linear-ag", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="as guided-generate's --model (folder, shapes:sd, ...)")
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
        f"fitted on {len(prompts)} trajectories of {policy.calibration.describe()}; exact steps {policy.skip.exact_steps}"
    )
    print("relative residual per step: " + " ".join(f"{i}:{r:.3f}" for i, r in enumerate(residuals)))
    print(f"saved to {Path(args.output).resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
