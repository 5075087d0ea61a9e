"""Train the evaluators of dynamic guidance for a given model (resumable, reproducible from `--seed`):

  discriminator  real vs generated images -> FidelityDiscriminator (pixel space)
  latent         a timestep-aware head on noisy latents, distilled from a pixel evaluator (`--teacher`):
                 "clip:<open_clip model or local-dir:folder>", "discriminator:<folder>", or for a shapes model
                 "clip" (the shapes-world CLIP)

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
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from guidance.evaluators.clip import ClipEvaluator
from guidance.evaluators.discriminator import FidelityDiscriminator
from guidance.shapes.assets import load_world, shapes_clip

from ...training.evaluators import (
    EvaluatorTraining,
    encode,
    generated_latents,
    image_size,
    train_discriminator,
    train_latent_head,
)
from ..models import SHAPES_MODELS, call_defaults, load_pipeline
from .common import check_at_least_one, read_prompt_file

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
DEFAULT_STEPS = {"discriminator": 600, "latent": 1500}
DEFAULT_WIDTHS = {"discriminator": 32, "latent": 16}  # latent heads run on every candidate: kept small


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="guided-train-evaluator", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("command", choices=["discriminator", "latent"], help="what to train")
    parser.add_argument("--model", required=True, help="the generator: shapes:sd, shapes:sd3 or a diffusers folder")
    parser.add_argument("--output", required=True, help="folder the trained evaluator is saved to")
    parser.add_argument("--teacher", default=None, help="latent: the pixel evaluator distilled (see above)")
    parser.add_argument(
        "--real", default=None, help="real images: a folder of images (default for shapes models: the generator)"
    )
    parser.add_argument(
        "--prompts-file", default=None, help="prompts for generation (default for shapes models: the training captions)"
    )
    parser.add_argument("--num-generated", type=int, default=320, help="generated images in the training pool")
    parser.add_argument("--num-real", type=int, default=512, help="real images in the training pool")
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
    arrays = [np.asarray(Image.open(p).convert("RGB").resize((size, size)), dtype=np.float32) for p in files]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1


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


def teacher_of(args: argparse.Namespace) -> tuple[ClipEvaluator | FidelityDiscriminator, str]:
    """The pixel evaluator `--teacher` names, and the name saved with the head."""
    spec = args.teacher
    if spec is None:
        raise ValueError("`--teacher` is required for `latent`: 'clip:<model>', 'discriminator:<folder>' or 'clip'")
    if spec == "clip":
        if args.model not in SHAPES_MODELS:
            raise ValueError(f"`--teacher clip` is the shapes-world CLIP, for shapes models; for {args.model!r} name a "
                             "CLIP: 'clip:<open_clip model or local-dir:folder>'")  # fmt: skip
        folder = shapes_clip().removeprefix("local-dir:")  # saved relative: found from the head's folder
        return ClipEvaluator(shapes_clip()), f"local-dir:{os.path.relpath(folder, args.output)}"
    if spec.startswith("clip:"):
        return ClipEvaluator(spec.removeprefix("clip:")), spec.removeprefix("clip:")
    if spec.startswith("discriminator:"):
        return FidelityDiscriminator.from_pretrained(spec.removeprefix("discriminator:")), spec
    raise ValueError(f"`--teacher` must be 'clip', 'clip:<model>' or 'discriminator:<folder>', got {spec!r}")


def run(args: argparse.Namespace) -> str:
    """Train what the arguments name; returns what to print."""
    steps = DEFAULT_STEPS[args.command] if args.steps is None else args.steps
    width = DEFAULT_WIDTHS[args.command] if args.width is None else args.width
    args.steps, args.width = steps, width
    check_at_least_one(args, "num_generated", "num_real", "num_inference_steps", "steps", "batch_size", "width")
    teacher = teacher_of(args) if args.command == "latent" else None
    prompts = prompts_of(args)
    pipe, family = load_pipeline(args.model)
    if family == "flux":
        raise ValueError("`--model`: evaluators can be trained for SD, SDXL and SD3 models (Flux packs its latents)")
    pipe.set_progress_bar_config(disable=True)
    size = image_size(pipe)
    real = real_images(args, size, fresh=args.command == "discriminator")
    training = EvaluatorTraining(f"{args.command}-{Path(args.output).name}", steps, Path(args.checkpoints),
                                 args.batch_size, args.lr, width, args.seed)  # fmt: skip
    print(f"generating {args.num_generated} images with {args.model} ...", flush=True)
    with torch.no_grad():
        latents = generated_latents(pipe, prompts, args.num_generated, args.scales, args.num_inference_steps,
                                    args.seed, **call_defaults(args.model, family))  # fmt: skip
        generated = torch.cat([pipe.decode_for_guidance(chunk) for chunk in latents.split(64)])
    torch.manual_seed(args.seed)
    if args.command == "discriminator":
        evaluator, accuracy = train_discriminator(real, generated, training)
        report = f"discriminator accuracy on its pool (real vs generated): {accuracy:.3f}"
    else:
        with torch.no_grad():
            images, pool = torch.cat([real, generated]), torch.cat([encode(pipe, real), latents])
        evaluator = train_latent_head(pipe, images, pool, *teacher, training)
        report = f"latent head ({evaluator.kind}) distilled from {teacher[1]}"
    evaluator.save_pretrained(args.output)
    return f"{report}\nsaved {args.output}"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        print(run(args))
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    return 0


if __name__ == "__main__":
    sys.exit(main())
