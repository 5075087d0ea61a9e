"""Train the evaluators of dynamic guidance for a given model (resumable, reproducible from `--seed`):

  discriminator  real vs generated images -> FidelityDiscriminator (pixel space)
  latent         a timestep-aware head on noisy latents, distilled from a pixel evaluator (`--teacher`): any
                 evaluator `guided-generate --evaluator` takes ("clip:ViT-L-14@openai", "pickscore",
                 "hpsv2:<file>", "aesthetic:<file>", "transformers-clip:<folder>", the folder of a discriminator,
                 ...; for a shapes model "clip", the shapes-world CLIP); it reports its agreement with the teacher
                 on a held-out fifth of the pool

    guided-train-evaluator discriminator --model shapes:sd --output assets/shapes-sd-fidelity
    guided-train-evaluator latent --model shapes:sd --teacher clip --output assets/shapes-sd-latent-clip

Generated images come from the model itself (CFG at every scale of `--scales`, `--num-inference-steps` steps);
real ones from a folder of images (`--real`), or for a shapes model from the shapes-world generator (the default
there: new ones at every discriminator step).
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from guidance.checks import check_image_side, check_int, check_number, check_scale, check_seed
from guidance.evaluators.base import Evaluator
from guidance.evaluators.clip import ClipEvaluator
from guidance.evaluators.embedding import EmbeddingEvaluator
from guidance.evaluators.teachers import TeacherSpec
from guidance.shapes.assets import load_world, shapes_clip

from ...training.evaluators import (
    EvaluatorTraining,
    HeadAgreement,
    distill_latent_head,
    encode,
    generated_latents,
    image_size,
    train_discriminator,
)
from ..models import SHAPES_MODELS, call_defaults, load_pipeline, model_family
from ..options import EVALUATOR_SPECS, evaluator_from_spec
from ..paths import check_output_dir
from ..runs import check_not_a_run
from .common import check_at_least_one, checkpoints_kept, read_prompt_file, run_command

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
DEFAULT_STEPS = {"discriminator": 600, "latent": 1500}
DEFAULT_WIDTHS = {"discriminator": 32, "latent": 16}  # latent heads run on every candidate: kept small


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="guided-train-evaluator", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("command", choices=["discriminator", "latent"], help="what to train")
    parser.add_argument(
        "--model",
        required=True,
        help="the generator: shapes:sd, shapes:sd3 or a diffusers folder (SD, SDXL, SD3, Flux)",
    )
    parser.add_argument("--output", required=True, help="folder the trained evaluator is saved to")
    parser.add_argument("--teacher", default=None, help="latent: the pixel evaluator distilled (see above)")
    parser.add_argument(
        "--real", default=None, help="real images: a folder of images (default for shapes models: the generator)"
    )
    parser.add_argument(
        "--prompts-file",
        default=None,
        help="prompts for generation (default for shapes models: the training captions)",
    )
    parser.add_argument("--num-generated", type=int, default=320, help="generated images in the training pool")
    parser.add_argument("--num-real", type=int, default=512, help="real images in the training pool")
    parser.add_argument(
        "--resolution", type=int, default=None, help="side of the square images, in pixels (default: the model's)"
    )
    parser.add_argument("--num-inference-steps", type=int, default=20, help="steps of each generation")
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0, 3.0, 7.5, 11.0, 15.0], help="CFG scales")
    parser.add_argument("--steps", type=int, default=None, help=f"training steps (defaults: {DEFAULT_STEPS})")
    parser.add_argument("--batch-size", type=int, default=64, help="training batch size")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    parser.add_argument(
        "--width", type=int, default=None, help="channels of the first stage (defaults: discriminator 32, latent 16)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of every random draw")
    parser.add_argument("--checkpoints", default="checkpoints", help="resumable checkpoints (safetensors)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    return parser


def prompts_of(args: argparse.Namespace) -> list[str]:
    if args.prompts_file:
        return read_prompt_file(args.prompts_file)
    if args.model not in SHAPES_MODELS:
        raise ValueError(f"`--prompts-file` is required for {args.model!r} (the prompts of the generated images)")
    world = load_world()
    return [world.caption(scene) for scene in world.training_scenes()]


def folder_images(folder: str, size: int) -> torch.Tensor:
    """The images of a folder in [-1, 1], resized to `size` x `size`."""
    path = Path(folder)
    files = sorted(p for p in path.glob("*") if p.suffix.lower() in IMAGE_SUFFIXES) if path.is_dir() else []
    if not files:
        raise ValueError(f"`--real` must be a folder of {list(IMAGE_SUFFIXES)} images, got {folder!r}")
    return torch.from_numpy(np.stack([pixels(p, size) for p in files])).permute(0, 3, 1, 2) / 127.5 - 1


def pixels(path: Path, size: int) -> np.ndarray:
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB").resize((size, size)), dtype=np.float32)
    except (OSError, SyntaxError, ValueError) as error:
        raise ValueError(f"`--real`: {str(path)!r} cannot be read ({error}): expected a whole image file") from None


def real_images(args: argparse.Namespace, size: int, fresh: bool):
    """A pool of `--num-real` real images, or (`fresh`, the shapes world) a function drawing new ones."""
    if args.real is not None:
        return folder_images(args.real, size)
    if args.model not in SHAPES_MODELS:
        raise ValueError(f"`--real` is required for {args.model!r}: a folder of real images")
    world = load_world()
    if fresh:
        return lambda generator, n: world.random_images(n, generator, size)
    return world.random_images(args.num_real, torch.Generator().manual_seed(args.seed + 1), size)


def teacher_of(args: argparse.Namespace) -> tuple[Evaluator, TeacherSpec | None]:
    """The pixel evaluator `--teacher` names (an evaluator of `EVALUATOR_SPECS`, or 'discriminator:<folder>'), and
    what is saved with the head to name it (None: an image-text teacher's own spec)."""
    spec = args.teacher
    if spec is None:
        raise ValueError(f"`--teacher` is required for `latent`: one of {EVALUATOR_SPECS}")
    if spec == "clip" and args.model in SHAPES_MODELS:
        folder = shapes_clip().removeprefix("local-dir:")  # saved relative: found from the head's folder
        return ClipEvaluator(shapes_clip()), f"local-dir:{os.path.relpath(folder, args.output)}"
    try:
        teacher = evaluator_from_spec(spec.removeprefix("discriminator:"), args.model)
    except ValueError as error:
        raise ValueError(f"`--teacher`: {error}") from None
    if teacher.space != "pixel":
        raise ValueError(f"`--teacher` {spec!r} is a latent head: a head is distilled from a pixel evaluator")
    return teacher, None if isinstance(teacher, EmbeddingEvaluator) else spec


@dataclass
class EvaluatorJob:
    """A checked training: the pipeline and its family, the teacher (latent heads), the prompts, the real images (or
    a function drawing them) and the optimisation's settings."""

    pipe: Any
    family: str
    teacher: tuple | None
    prompts: list[str]
    real: Any
    training: EvaluatorTraining


def check_options(args: argparse.Namespace) -> None:
    """The numeric options and the folders, by their flags."""
    args.steps = DEFAULT_STEPS[args.command] if args.steps is None else args.steps
    args.width = DEFAULT_WIDTHS[args.command] if args.width is None else args.width
    check_at_least_one(args, "num_generated", "num_real", "num_inference_steps", "steps", "batch_size", "width")
    if args.threads is not None:
        check_int("--threads", args.threads, minimum=1)
    check_seed("--seed", args.seed)
    check_number("--lr", args.lr, above=0)
    for scale in args.scales:
        check_scale("--scales", scale)
    check_output_dir(args.output, "--output")
    check_not_a_run(args.output, "--output")
    check_output_dir(args.checkpoints, "--checkpoints")


def prepare(args: argparse.Namespace) -> EvaluatorJob:
    """Every input checked and the model loaded; nothing written."""
    check_options(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    teacher = teacher_of(args) if args.command == "latent" else None
    prompts = prompts_of(args)
    model_family(args.model)
    pipe, family = load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    multiple = pipe.vae_scale_factor * (2 if family == "flux" else 1)  # Flux packs 2x2 latent patches
    size = check_image_side("--resolution", args.resolution, multiple) or image_size(pipe)
    args.resolution = size
    real = real_images(args, size, fresh=args.command == "discriminator")
    name = f"{args.command}-{Path(args.output).name}"
    training = EvaluatorTraining(
        name, args.steps, Path(args.checkpoints), args.batch_size, args.lr, args.width, args.seed
    )
    return EvaluatorJob(pipe, family, teacher, prompts, real, training)


def execute(job: EvaluatorJob, args: argparse.Namespace) -> int:
    """Generate the pool, train, save; prints what was trained."""
    pipe = job.pipe
    print(f"generating {args.num_generated} images with {args.model} ...", flush=True)
    with torch.no_grad():
        latents = generated_latents(
            pipe,
            job.prompts,
            args.num_generated,
            args.scales,
            args.num_inference_steps,
            args.seed,
            height=args.resolution,
            width=args.resolution,
            **call_defaults(args.model, job.family),
        )
        generated = torch.cat([pipe.decode_for_guidance(chunk) for chunk in latents.split(64)])
    torch.manual_seed(args.seed)
    if args.command == "discriminator":
        evaluator, accuracy = train_discriminator(job.real, generated, job.training)
        report = f"discriminator accuracy on its pool (real vs generated): {accuracy:.3f}"
    else:
        with torch.no_grad():
            images, pool = torch.cat([job.real, generated]), torch.cat([encode(pipe, job.real), latents])
        teacher, teacher_name = job.teacher
        distilled = distill_latent_head(pipe, images, pool, teacher, job.training, teacher_name)
        evaluator = distilled.evaluator
        report = f"latent head ({evaluator.kind}) distilled from {args.teacher}; {agreement_line(distilled.agreement)}"
    evaluator.save_pretrained(args.output)
    print(f"{report}\nsaved {args.output}")
    return 0


def agreement_line(agreement: HeadAgreement) -> str:
    """The head's agreement with its teacher on the held-out part of the pool, in words."""
    if agreement.cosine is not None:
        return (
            f"on {agreement.held_out} held-out images its image embeddings have cosine {agreement.cosine:.3f} with "
            f"the teacher's (a constant embedding: {agreement.baseline_cosine:.3f})"
        )
    return (
        f"on {agreement.held_out} held-out images its scores rank like the teacher's with Spearman's rho "
        f"{agreement.rank_correlation:.3f}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return run_command(
        parser,
        lambda: prepare(args),
        lambda job: execute(job, args),
        lambda job, stop: checkpoints_kept(job.training.checkpoints, stop),
    )


if __name__ == "__main__":
    sys.exit(main())
