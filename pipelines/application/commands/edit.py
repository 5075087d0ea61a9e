"""Command line: edit (or invert) images with a flow model: FlowOpt, or the FlowEdit baseline.

`guided-edit --model shapes:sd3 --image in.png --source-prompt "a red circle ..." --target-prompt "a blue circle ..."`
or `guided-edit --model shapes:sd3 --manifest edits.jsonl` (rows `{"image": ..., "source_prompt": ...,
"target_prompt": ...}`; image paths relative to the manifest). Writes a run folder that a rerun resumes (one PNG per
image with its record, results.jsonl, summary.json; `pipelines.application.edit_batch`) and prints residuals and NFEs.
"""

from __future__ import annotations

import argparse
import sys

from ..edit_batch import EditRun, EditSettings, prepare_edits
from ..edit_manifest import EditJob, jobs_from_options, read_edit_manifest
from ..naming import COMMAND_LINE
from ..options import GUIDANCE_OPTIONS
from .arguments import add_guidance_arguments, add_model_arguments
from .common import run_command


def step_size(value: str) -> float | str:
    if value == "auto":
        return value
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a positive number or 'auto', got {value!r}") from None


def read_jobs(args: argparse.Namespace) -> list[EditJob]:
    """The images and prompts of the manifest, or of `--image` and the prompt options."""
    if args.manifest:
        given = [
            flag
            for flag, value in (
                ("--image", args.image),
                ("--source-prompt", args.source_prompt),
                ("--target-prompt", args.target_prompt),
            )
            if value
        ]
        if given:
            raise ValueError(
                f"give either `--manifest` or {given}, not both (a manifest row names its image and prompts)"
            )
        return read_edit_manifest(args.manifest, "--manifest")
    return jobs_from_options(args.image or [], args.source_prompt or [], args.target_prompt or [])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="guided-edit",
        description="Edit images with a flow model (SD3, Flux) by FlowOpt (zero-order optimisation through the "
        "whole flow) or FlowEdit, or invert them (--invert); writes the results and summary.json, prints residuals "
        "and NFEs.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--image", action="append", help="a source image file; repeat the option for several")
    parser.add_argument(
        "--source-prompt",
        action="append",
        help="the prompt describing the source image; once for every image, or once per image",
    )
    parser.add_argument("--target-prompt", action="append", help="the prompt of the edit; once, or once per image")
    parser.add_argument(
        "--manifest",
        help="a JSONL file, one edit per line: {image, source_prompt, target_prompt} (image paths "
        "relative to the manifest); instead of --image and the prompts",
    )
    parser.add_argument(
        "--invert",
        action="store_true",
        help="inversion only: find the noise whose solve with "
        "the source prompt reproduces each image; writes the reconstruction and the noise latents",
    )
    parser.add_argument("--method", choices=("flowopt", "flowedit"), default="flowopt", help="editing method")
    parser.add_argument(
        "--num-inference-steps",
        type=int,
        default=None,
        help="T, the flow schedule's steps "
        "(default: the paper's for the family and task: FlowOpt edit 15, inversion 10; FlowEdit SD3 "
        "50, Flux 28)",
    )
    parser.add_argument(
        "--n-max",
        type=int,
        default=None,
        help="steps of each solve, from grid index T - n_max "
        "(default: FlowOpt SD3 12, Flux 13, inversion 10; FlowEdit SD3 33, Flux 24)",
    )
    parser.add_argument(
        "--iterations",
        type=int,
        default=None,
        help="flowopt: iterations after the first solve "
        "(0: invert, then regenerate; default 8 for edits, 30 for inversion)",
    )
    parser.add_argument(
        "--step-size",
        type=step_size,
        default=None,
        help="flowopt: eta, a positive number or 'auto' "
        "(estimated from the solve, with backtracking); default SD3 0.01, Flux 0.0025",
    )
    parser.add_argument(
        "--tolerance",
        type=float,
        default=0.0,
        help="flowopt: stop an image when the RMS residual per latent element falls to this (0: never)",
    )
    parser.add_argument(
        "--min-improvement",
        type=float,
        default=0.0,
        help="flowopt: stop an image when an iteration lowers its residual by less than this fraction (0: never; "
        "the paper's code runs every iteration)",
    )
    parser.add_argument("--n-avg", type=int, default=1, help="flowedit: noise draws averaged per step")
    parser.add_argument("--negative-prompt", default=None, help="the unconditional prompt of the guided solves")
    add_guidance_arguments(parser, guidance_scale=None)
    parser.add_argument(
        "--source-guidance-scale",
        type=float,
        default=None,
        help="flowedit: CFG of the source velocity (default SD3 3.5; Flux: the embedded source guidance, default 1.5)",
    )
    parser.add_argument(
        "--embedded-guidance-scale",
        type=float,
        default=None,
        help="Flux: the guidance "
        "embedding of the target solves (guidance-distilled models; default 3.5, FlowEdit 5.5; 1 for "
        "inversion)",
    )
    parser.add_argument("--batch-size", type=int, default=8, help="images of one size per pipeline call")
    parser.add_argument("--save-iterates", action="store_true", help="flowopt: also write every iteration's image")
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of 'auto''s probes and FlowEdit's noise (a batch: seed + its first index)",
    )
    parser.add_argument(
        "--output-dir",
        default="edits",
        help="the run's folder: the PNGs, results.jsonl, summary.json and run.json; a rerun resumes it",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="start over: remove what an earlier run wrote to --output-dir"
    )
    add_model_arguments(parser, schedulers=False)
    parser.epilog = (
        "--guidance-scale defaults to the method's target guidance: FlowOpt 3.5 (SD3) and 1 (Flux, whose "
        "embedding carries it), FlowEdit 13.5 (SD3), inversion 1."
    )
    return parser


def settings_of(args: argparse.Namespace) -> EditSettings:
    """The run's settings the options name."""
    guidance = {name: getattr(args, name) for name in GUIDANCE_OPTIONS}
    return EditSettings(
        model=args.model,
        method=args.method,
        invert=args.invert,
        num_inference_steps=args.num_inference_steps,
        n_max=args.n_max,
        iterations=args.iterations,
        step_size=args.step_size,
        tolerance=args.tolerance,
        min_improvement=args.min_improvement,
        n_avg=args.n_avg,
        negative_prompt=args.negative_prompt,
        guidance={name: value for name, value in guidance.items() if value is not None},
        source_guidance_scale=args.source_guidance_scale,
        embedded_guidance_scale=args.embedded_guidance_scale,
        seed=args.seed,
        batch_size=args.batch_size,
        save_iterates=args.save_iterates,
        max_sequence_length=args.max_sequence_length,
        dtype=args.dtype,
        device=args.device,
    )


def prepare(args: argparse.Namespace) -> EditRun:
    """Every input checked and the model loaded; nothing written."""
    settings = settings_of(args)
    settings.check(COMMAND_LINE)  # the options first, then the images they apply to
    return prepare_edits(read_jobs(args), args.output_dir, settings, overwrite=args.overwrite, name=COMMAND_LINE)


def print_image(record: dict) -> None:
    residuals = record["residuals"]
    shown = residuals if len(residuals) <= 6 else residuals[:3] + residuals[-2:]
    trail = " -> ".join(f"{r:.4f}" for r in shown)
    print(
        f"{record['file']}  {record['image']}: residual {trail} ({len(residuals) - 1} iterations), "
        f"NFE {record['nfe']:g}",
        flush=True,
    )


def execute(run: EditRun) -> int:
    result = run.execute(on_image=print_image)
    print(
        f"wrote {result.edited} images to {result.output_dir.resolve()} ({result.resumed} already there; "
        f"results.jsonl and summary.json beside them); guidance {result.guidance!r}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return run_command(parser, lambda: prepare(args), execute)


if __name__ == "__main__":
    sys.exit(main())
