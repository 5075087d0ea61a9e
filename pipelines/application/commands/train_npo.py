"""Train a Self-NPO negative-preference LoRA adapter (arXiv 2505.11777), data-free by default, into a diffusers-format
LoRA folder that `pipe.load_lora_weights(folder, adapter_name="npo")` loads.

    guided-train-npo --model shapes:sd --prompts-file assets/shapes-calibration-prompts.txt --output-dir npo
    accelerate launch --multi_gpu --num_processes 2 -m pipelines.application.commands.train_npo ...   # several devices

A killed run started again with the same command resumes from its last checkpoint (`<output-dir>/checkpoint`); a
folder holding another run's checkpoint (other settings, model, prompts or images) is refused before the pool of
samples is generated, unless `--overwrite`. SIGINT and SIGTERM stop it with one line saying where it stopped.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path

import torch

from guidance.checks import check_int

from ...training.self_npo import CheckpointMismatch, SelfNPOConfig, SelfNPORun, prepare_self_npo
from ..models import call_defaults, load_pipeline, model_family
from ..naming import COMMAND_LINE
from ..paths import check_output_dir, read_text_file
from ..runs import check_not_a_run
from ..signals import Interrupted
from .common import read_prompt_file, run_command

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def read_images(folder: str) -> tuple[list, list[str]]:
    """Images of a folder with their captions: `name.png|jpg|webp` and `name.txt` beside it, each checked."""
    import PIL.Image

    path = Path(folder)
    if not path.is_dir():
        raise ValueError(
            f"`--images` {folder!r} {'is a file' if path.exists() else 'does not exist'}, expected a folder"
        )
    paths = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise ValueError(f"`--images` {folder!r} holds no {list(IMAGE_SUFFIXES)} images")
    missing = [p.name for p in paths if not p.with_suffix(".txt").is_file()]
    if missing:
        raise ValueError(
            f"`--images` {folder!r}: every image needs a caption file beside it; missing for {missing[:3]}"
        )
    images = []
    for image in paths:
        try:
            with PIL.Image.open(image) as opened:
                images.append(opened.convert("RGB"))
        except (OSError, SyntaxError, ValueError) as error:
            raise ValueError(
                f"`--images`: {str(image)!r} cannot be read ({error}): expected a whole image file"
            ) from None
    return images, [read_text_file(p.with_suffix(".txt"), "--images").strip() for p in paths]


HELPS = {
    "steps": "optimisation steps",
    "batch_size": "samples per step (split between processes)",
    "learning_rate": "AdamW learning rate (default: the public code's, 1e-4 for a LoRA, 1e-6 with --full)",
    "weight_decay": "AdamW weight decay (default: the public code's, 0 for SDXL, else 1e-3)",
    "rank": "LoRA rank",
    "lora_alpha": "LoRA alpha",
    "target_modules": "modules that get a LoRA",
    "ema_decay": "decay of the teacher's EMA of the adapter",
    "teacher_weight": "w of the teacher's x0_c + w (x0_c - x0_u) (default: the public code's, -5 for SDXL, else -1)",
    "grid_steps": "the DDIM grid of start points",
    "rollout_steps": "K, the teacher's DDIM steps",
    "huber_c": "c of the pseudo-Huber loss",
    "grad_clip": "gradient norm clip",
    "pool_size": "data-free: model samples generated as start latents",
    "pool_guidance_scale": "data-free: CFG of those samples",
    "pool_steps": "data-free: sampling steps of those samples",
    "seed": "seed of every random draw (per step: seed and step)",
    "gradient_accumulation_steps": "accelerate's gradient accumulation",
    "mixed_precision": "accelerate's mixed precision: no, fp16, bf16",
    "checkpoint_every": "steps between checkpoints",
    "full": "full fine-tuning of the denoiser instead of a LoRA (the public code's form; writes "
    "<output-dir>/unet, used with guidance.SeparateModel, a second model copy)",
}
FAMILY_DEFAULTS = ("learning_rate", "weight_decay", "teacher_weight")  # None: the public code's for the model


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One option per `SelfNPOConfig` field, with its default."""
    defaults = SelfNPOConfig()
    for spec in fields(SelfNPOConfig):
        default, option = getattr(defaults, spec.name), "--" + spec.name.replace("_", "-")
        if spec.name in FAMILY_DEFAULTS:
            parser.add_argument(option, type=float, default=None, help=HELPS[spec.name])
        elif isinstance(default, bool):
            parser.add_argument(option, action="store_true", help=HELPS[spec.name])
        elif isinstance(default, list):
            parser.add_argument(option, nargs="+", default=default, help=HELPS[spec.name])
        else:
            parser.add_argument(option, type=type(default), default=default, help=HELPS[spec.name])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="guided-train-npo",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--model",
        required=True,
        help="shapes:sd, shapes:sd3, tiny:sd|sdxl|sd3, or an SD/SDXL/SD3 diffusers folder",
    )
    parser.add_argument("--max-sequence-length", type=int, default=None, help="SD3 text length (16 for shapes:sd3)")
    parser.add_argument("--prompts-file", help="prompts of the data-free trajectories, one per line")
    parser.add_argument("--images", help="instead: a folder of images with captions (name.png + name.txt)")
    parser.add_argument("--output-dir", required=True, help="the LoRA folder (and checkpoint/, losses.jsonl)")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="start over: remove the checkpoint, losses and weights an earlier run wrote to --output-dir",
    )
    add_config_arguments(parser)
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32", help="weights")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def prepare(args: argparse.Namespace) -> SelfNPORun:
    """Every input checked (the settings, the folder, the prompts or images, the model, a checkpoint there being this
    run's) before the pool is generated or anything written."""
    names = [spec.name for spec in fields(SelfNPOConfig)]
    try:
        config = SelfNPOConfig(**{name: getattr(args, name) for name in names})
    except (ValueError, TypeError) as error:
        raise COMMAND_LINE.reworded(error, names) from None
    check_output_dir(args.output_dir, "--output-dir")
    check_not_a_run(args.output_dir, "--output-dir")
    if args.max_sequence_length is not None:
        check_int("--max-sequence-length", args.max_sequence_length, minimum=1)
    if bool(args.prompts_file) == bool(args.images):
        raise ValueError("give `--prompts-file` (data-free) or `--images` (a captioned image folder), one of them")
    images, prompts = read_images(args.images) if args.images else (None, read_prompt_file(args.prompts_file))
    from accelerate import PartialState

    device = str(PartialState(cpu=not torch.cuda.is_available()).device)
    family = model_family(args.model)
    if family not in ("sd", "sdxl", "sd3"):
        raise ValueError(
            f"`--model` {args.model!r} is a {family} model; Self-NPO training takes SD 1.x/2.x, SDXL and SD3"
        )
    pipe, family = load_pipeline(args.model, getattr(torch, args.dtype), device)
    pipe.set_progress_bar_config(disable=True)
    extra = call_defaults(args.model, family, args.max_sequence_length)
    run = {"model": args.model, "dtype": args.dtype, "max_sequence_length": extra.get("max_sequence_length")}
    try:
        return prepare_self_npo(
            pipe, prompts, args.output_dir, config, images, run=run, overwrite=args.overwrite, **extra
        )
    except CheckpointMismatch as error:
        resume = "resume it with the command that started it, " if error.resumable else ""
        raise ValueError(
            f"`--output-dir` {args.output_dir!r} {error.found}: {resume}start over with `--overwrite`, "
            "or use another `--output-dir`"
        ) from None


def execute(run: SelfNPORun, args: argparse.Namespace) -> int:
    config = run.trainer.config
    losses = run.train(progress=not args.no_progress)
    if losses:
        recent = losses[-10:]
        print(
            f"steps {config.steps}: mean loss of this run's last {len(recent)} steps {sum(recent) / len(recent):.4f}"
        )
    if config.full:
        print(f"negative model: {Path(args.output_dir).resolve()} (a full denoiser for guidance.SeparateModel)")
    else:
        print(f"adapter: {Path(args.output_dir).resolve()} (pipe.load_lora_weights(folder, adapter_name='npo'))")
    return 0


def stopped(run: SelfNPORun, stop: Interrupted) -> str:
    """Where a signal stopped the training."""
    checkpoint = str(run.output_dir / "checkpoint")
    return (
        f"interrupted by {stop.signal_name} at step {run.trainer.step} of {run.trainer.config.steps}; the checkpoint "
        f"{checkpoint!r} holds step {run.saved_step()}: run the same command again to resume from it"
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return run_command(parser, lambda: prepare(args), lambda run: execute(run, args), stopped)


if __name__ == "__main__":
    sys.exit(main())
