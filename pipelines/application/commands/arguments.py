"""What the generating and editing commands (and the demo) share: the model options and the guidance options,
and the guidance scheduler those name."""

from __future__ import annotations

import argparse

import torch

from guidance import GuidanceScheduler

from ...schedulers import SCHEDULERS
from ..options import GUIDANCE_OPTIONS, METHODS, policy_from_options

MODEL_HELP = (
    "shapes:sd or shapes:sd3 (the shapes-world models shipped in assets/), a diffusers pipeline folder "
    "(SD 1.x/2.x, SDXL, SD3, Flux) or hub id, or tiny:<sd|sdxl|sd3|flux> for tiny random components "
    "(a smoke test: the images are noise)"
)


def make_guidance(args: argparse.Namespace) -> GuidanceScheduler:
    """The guidance scheduler the options name."""
    options = {name: getattr(args, name) for name in GUIDANCE_OPTIONS if hasattr(args, name)}
    return policy_from_options(options, getattr(args, "model", None), getattr(args, "num_inference_steps", None))


def add_guidance_arguments(parser: argparse.ArgumentParser, guidance_scale: float) -> None:
    """`--guidance` and the options of every method (read by `make_guidance`)."""
    parser.add_argument("--guidance", choices=METHODS, default="cfg", help="guidance method")
    parser.add_argument(
        "--guidance-scale", type=float, default=guidance_scale, help="CFG scale (first-step scale if scheduled)"
    )
    parser.add_argument("--final-guidance-scale", type=float, default=None, help="scheduled: scale at the last step")
    parser.add_argument("--schedule", choices=GUIDANCE_OPTIONS["schedule"][1], default="linear", help="scheduled")
    parser.add_argument("--guidance-rescale", type=float, default=0.0, help="std rescale of the guided prediction")
    parser.add_argument("--guidance-start", type=float, default=0.0, help="guidance interval start (progress 0-1)")
    parser.add_argument("--guidance-stop", type=float, default=1.0, help="guidance interval stop (progress 0-1)")
    parser.add_argument("--threshold", type=float, default=0.995, help="ag: cosine similarity that ends CFG")
    parser.add_argument(
        "--compared", choices=GUIDANCE_OPTIONS["compared"][1], default="x0", help="ag: quantity compared"
    )
    parser.add_argument(
        "--candidates", type=float, nargs="+", default=None, help="dynamic: candidate scales (default 1 3 7.5 11 15)"
    )
    parser.add_argument(
        "--evaluator",
        action="append",
        help="dynamic: an evaluator, repeatable: 'clip' (the shapes-world CLIP), 'clip:<open_clip model>' or the "
        "folder of a trained discriminator or latent evaluator (default: the shipped latent heads for shapes:sd, "
        "else clip)",
    )
    parser.add_argument(
        "--weighting", choices=GUIDANCE_OPTIONS["weighting"][1], default="adaptive", help="dynamic: weights"
    )
    parser.add_argument(
        "--lookahead",
        choices=GUIDANCE_OPTIONS["lookahead"][1],
        default="auto",
        help="dynamic: what is scored; auto: next_latent when every evaluator is a latent head, else x0",
    )
    parser.add_argument(
        "--coefficients",
        default=None,
        help="linear-ag: folder of fitted coefficients (default for shapes:sd/sd3 at 20 steps: the shipped ones)",
    )


def add_model_arguments(parser: argparse.ArgumentParser, schedulers: bool = True, accelerate: bool = False) -> None:
    """`--model`, `--scheduler` (when the command samples with any), `--max-sequence-length`, `--device` (with
    `accelerate`: the process's device by default), `--dtype`."""
    parser.add_argument("--model", required=True, help=MODEL_HELP)
    if schedulers:
        parser.add_argument(
            "--scheduler",
            choices=sorted(SCHEDULERS),
            default=None,
            help="diffusers scheduler to sample with, built from the model's config (default: the model's own)",
        )
    parser.add_argument(
        "--max-sequence-length",
        type=int,
        default=None,
        help="SD3/Flux text length (pipeline default; 16 for shapes:sd3, which was trained with it)",
    )
    if accelerate:
        parser.add_argument(
            "--device",
            default=None,
            help="torch device (default: the process's under accelerate launch, else cuda when available, else cpu)",
        )
    else:
        parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32", help="weights")
