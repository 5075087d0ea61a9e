"""Train a Self-NPO negative-preference LoRA adapter (arXiv 2505.11777), data-free by default, into a diffusers-format
LoRA folder that `pipe.load_lora_weights(folder, adapter_name="npo")` loads.

    guided-train-npo --model shapes:sd --prompts-file assets/shapes-calibration-prompts.txt --output-dir npo
    accelerate launch --multi_gpu --num_processes 2 -m pipelines.application.commands.train_npo ...   # several devices

A killed run started again with the same command resumes from its last checkpoint (`<output-dir>/checkpoint`).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path

import torch

from ...training.self_npo import SelfNPOConfig, train_self_npo
from ..models import call_defaults, load_pipeline
from .common import read_prompt_file


def read_images(folder: str) -> tuple[list, list[str]]:
    """Images of a folder with their captions: `name.png|jpg` and `name.txt` beside it."""
    import PIL.Image

    paths = sorted(p for p in Path(folder).glob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
    if not paths:
        raise ValueError(f"`--images` {folder!r} holds no .png/.jpg/.webp images")
    missing = [p.name for p in paths if not p.with_suffix(".txt").is_file()]
    if missing:
        raise ValueError(f"`--images`: every image needs a caption file beside it; missing for {missing[:3]}")
    return [PIL.Image.open(p).convert("RGB") for p in paths], [
        p.with_suffix(".txt").read_text().strip() for p in paths
    ]


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
    defaults = SelfNPOConfig()
    helps = {
        "steps": "optimisation steps",
        "batch_size": "samples per step (split between processes)",
        "learning_rate": "AdamW learning rate",
        "weight_decay": "AdamW weight decay",
        "rank": "LoRA rank",
        "lora_alpha": "LoRA alpha",
        "target_modules": "modules that get a LoRA",
        "ema_decay": "decay of the teacher's EMA of the adapter",
        "teacher_weight": "w of the teacher's x0_c + w (x0_c - x0_u) (default: -5 for SDXL, else -1)",
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
    for spec in fields(SelfNPOConfig):
        default = getattr(defaults, spec.name)
        option = "--" + spec.name.replace("_", "-")
        if spec.name == "teacher_weight":
            parser.add_argument(option, type=float, default=None, help=helps[spec.name])
        elif isinstance(default, bool):
            parser.add_argument(option, action="store_true", help=helps[spec.name])
        elif isinstance(default, list):
            parser.add_argument(option, nargs="+", default=default, help=helps[spec.name])
        else:
            parser.add_argument(option, type=type(default), default=default, help=helps[spec.name])
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32", help="weights")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = {spec.name: getattr(args, spec.name) for spec in fields(SelfNPOConfig)}
        settings["teacher_weight"] = -1.0  # set below for SDXL when not given
        SelfNPOConfig(**settings)  # the settings' checks, before the model loads
        if bool(args.prompts_file) == bool(args.images):
            raise ValueError("give `--prompts-file` (data-free) or `--images` (a captioned image folder), one of them")
        images, prompts = read_images(args.images) if args.images else (None, read_prompt_file(args.prompts_file))
        from accelerate import PartialState

        device = str(PartialState(cpu=not torch.cuda.is_available()).device)
        pipe, family = load_pipeline(args.model, getattr(torch, args.dtype), device)
        if family not in ("sd", "sdxl", "sd3"):
            raise ValueError(
                f"`--model` {args.model!r} is a {family} model; Self-NPO training takes SD 1.x/2.x, SDXL and SD3"
            )
        default_weight = -5.0 if family == "sdxl" else -1.0  # the public code's
        settings["teacher_weight"] = default_weight if args.teacher_weight is None else args.teacher_weight
        config = SelfNPOConfig(**settings)
    except (ValueError, TypeError, FileNotFoundError) as error:
        parser.error(str(error))
    pipe.set_progress_bar_config(disable=True)
    extra = call_defaults(args.model, family, args.max_sequence_length)
    losses = train_self_npo(pipe, prompts, args.output_dir, config, images=images, progress=not args.no_progress,
                            **extra)  # fmt: skip
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


if __name__ == "__main__":
    sys.exit(main())
