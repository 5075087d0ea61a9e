"""Command line: generate images from prompts or a manifest with a guided pipeline and a chosen guidance method.

`guided-generate --model shapes:sd --prompt "a red circle" --output-dir outputs` (or
`python -m pipelines.application.commands.generate`); on several devices
`accelerate launch --multi_gpu --num_processes N -m pipelines.application.commands.generate ...`. Wraps
`pipelines.application.generate_batch` (`prepare_batch`, then `BatchRun.execute`).
"""

from __future__ import annotations

import argparse
import sys

from ..batch import BatchRun, BatchSettings, prepare_batch
from ..naming import COMMAND_LINE
from ..options import GUIDANCE_OPTIONS
from .arguments import add_guidance_arguments, add_model_arguments
from .common import read_prompt_file, run_command


def read_rows(args: argparse.Namespace):
    """The manifest path, or the prompts of `--prompt` and `--prompts-file`."""
    prompts = list(args.prompt or [])
    if args.manifest:
        if prompts or args.prompts_file:
            raise ValueError("give either `--manifest` or prompts (`--prompt`, `--prompts-file`), not both")
        return args.manifest
    if args.prompts_file:
        prompts += read_prompt_file(args.prompts_file)
    if not prompts:
        raise ValueError(
            "no prompts: give `--prompt` (repeatable), `--prompts-file` (one prompt per line) or `--manifest`"
        )
    return prompts


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="guided-generate",
        description="Generate images with a guided diffusers pipeline into a folder that a rerun resumes; prints "
        "where the images went and the NFEs. Several devices: accelerate launch --multi_gpu --num_processes N -m "
        "pipelines.application.commands.generate ...",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--prompt", action="append", help="a prompt; repeat the option for several")
    parser.add_argument("--prompts-file", help="a text file with one prompt per line")
    parser.add_argument(
        "--manifest",
        help="a JSONL (one object per line) or CSV (a header row) manifest; a row may set prompt, negative_prompt, "
        "seed, num_images and guidance options (guidance, guidance_scale, threshold, ...: the option names below "
        "with underscores); unset fields take the options given here",
    )
    parser.add_argument("--negative-prompt", default=None, help="negative prompt of rows that set none")
    add_guidance_arguments(parser, guidance_scale=7.5)
    parser.add_argument("--num-inference-steps", type=int, default=20, help="denoising steps")
    parser.add_argument("--num-images-per-prompt", type=int, default=1, help="images per row that sets no num_images")
    parser.add_argument("--batch-size", type=int, default=8, help="images per pipeline call (halved on out-of-memory)")
    parser.add_argument("--height", type=int, default=None, help="image height in pixels (model default if unset)")
    parser.add_argument("--width", type=int, default=None, help="image width in pixels (model default if unset)")
    parser.add_argument(
        "--seed", type=int, default=0, help="image k of the run uses seed + k (a row's own seed: row seed + j)"
    )
    parser.add_argument(
        "--output-dir", default="outputs", help="folder for the PNGs, results.jsonl and run.json; a rerun resumes it"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="start over: remove what an earlier run wrote to --output-dir"
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile the denoiser")
    parser.add_argument(
        "--npo",
        default=None,
        help="a Self-NPO LoRA folder (guided-train-npo; the Diffusion-NPO releases load too): the negative-preference "
        "adapter computes the unconditional branch of every guidance method, in the conditional pass",
    )
    add_model_arguments(parser, accelerate=True)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def settings_of(args: argparse.Namespace) -> BatchSettings:
    """The run's settings the options name."""
    guidance = {name: getattr(args, name) for name in GUIDANCE_OPTIONS}
    return BatchSettings(
        model=args.model,
        scheduler=args.scheduler,
        dtype=args.dtype,
        device=args.device,
        num_inference_steps=args.num_inference_steps,
        height=args.height,
        width=args.width,
        seed=args.seed,
        guidance={name: value for name, value in guidance.items() if value is not None},
        negative_prompt=args.negative_prompt,
        num_images_per_prompt=args.num_images_per_prompt,
        max_sequence_length=args.max_sequence_length,
        npo=args.npo,
        batch_size=args.batch_size,
        compile=args.compile,
    )


def prepare(args: argparse.Namespace) -> BatchRun:
    """Every input checked and the model loaded; nothing written."""
    return prepare_batch(
        read_rows(args), args.output_dir, settings_of(args), overwrite=args.overwrite, name=COMMAND_LINE
    )


def execute(run: BatchRun, args: argparse.Namespace) -> int:
    result = run.execute(progress=not args.no_progress)
    if run.state.is_main_process:
        print(
            f"wrote {result.generated} images to {result.output_dir.resolve()} ({result.resumed} already there; "
            f"results.jsonl beside them)"
        )
        print(f"NFE per image: {result.nfe_per_image:g} ({args.num_inference_steps} steps)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return run_command(parser, lambda: prepare(args), lambda run: execute(run, args))


if __name__ == "__main__":
    sys.exit(main())
