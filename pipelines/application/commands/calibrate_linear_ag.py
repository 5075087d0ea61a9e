"""Calibrate LinearAG: run full-CFG trajectories, fit per-step coefficients, save them for `from_pretrained`.

    guided-calibrate-linear-ag --model shapes:sd --num-inference-steps 20 --guidance-scale 7.5 \\
        --prompts-file assets/shapes-calibration-prompts.txt --output assets/linear-ag/shapes-sd-20

The coefficients hold for the pipeline's scheduler class, this step count (and the timesteps it makes: PNDM and
Heun evaluate the model more often than `--num-inference-steps`) and the latent size of the trajectories.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from guidance.checks import check_scale, check_seed

from ...schedulers import SCHEDULERS
from ...training.linear_ag import calibrate
from ..models import call_defaults, load_pipeline
from ..paths import check_output_dir
from ..runs import check_not_a_run
from ..signals import Interrupted
from .common import check_at_least_one, read_prompt_file, run_command


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


@dataclass
class Calibration:
    """A checked calibration: the pipeline, its family, the prompts and the exact steps."""

    pipe: Any
    family: str
    prompts: list[str]
    exact_steps: list[int] | None


def exact_steps(text: str | None, steps: int) -> list[int] | None:
    """`--exact-steps` as timestep indices in [0, steps)."""
    if text is None:
        return None
    try:
        indices = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"`--exact-steps` must be comma-separated integers, got {text!r}") from None
    if not indices or not all(0 <= index < steps for index in indices):
        raise ValueError(f"`--exact-steps` must name timestep indices in [0, {steps}), got {text!r}")
    return indices


def prepare(args: argparse.Namespace) -> Calibration:
    """Every input checked and the model loaded; nothing written."""
    check_at_least_one(args, "num_inference_steps", "batch_size", "window")
    check_seed("--seed", args.seed)
    check_scale("--guidance-scale", args.guidance_scale)
    check_output_dir(args.output, "--output")
    check_not_a_run(args.output, "--output")
    exact = exact_steps(args.exact_steps, args.num_inference_steps)
    prompts = list(args.prompt or []) + read_prompt_file(args.prompts_file)
    pipe, family = load_pipeline(args.model, scheduler=args.scheduler)
    pipe.set_progress_bar_config(disable=True)
    return Calibration(pipe, family, prompts, exact)


def execute(work: Calibration, args: argparse.Namespace) -> int:
    policy, residuals = calibrate(
        work.pipe,
        work.prompts,
        args.num_inference_steps,
        args.guidance_scale,
        work.exact_steps,
        args.window,
        args.batch_size,
        args.seed,
        **call_defaults(args.model, work.family),
    )
    policy.save_pretrained(args.output)
    described = policy.calibration.describe()
    print(f"fitted on {len(work.prompts)} trajectories of {described}; exact steps {policy.skip.exact_steps}")
    print("relative residual per step: " + " ".join(f"{i}:{r:.3f}" for i, r in enumerate(residuals)))
    print(f"saved to {Path(args.output).resolve()}")
    return 0


def stopped(work: Calibration, stop: Interrupted) -> str:
    return f"interrupted by {stop.signal_name}: nothing was saved (a calibration starts over when run again)"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return run_command(parser, lambda: prepare(args), lambda work: execute(work, args), stopped)


if __name__ == "__main__":
    sys.exit(main())
