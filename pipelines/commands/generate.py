"""Command line: generate images from prompts with a guided pipeline and a chosen guidance method.

`guided-generate --prompt "a red circle" --output-dir outputs` (or `python -m pipelines.commands.generate`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from guidance import (
    AdaptiveGuidance,
    ClassifierFreeGuidance,
    DynamicGuidance,
    GuidanceScheduler,
    LinearAdaptiveGuidance,
    ScheduledGuidance,
)

from ..loading import DEFAULT_MODEL, SHAPES_MODELS, call_defaults, load_pipeline
from ..schedulers import SCHEDULERS
from .common import check_at_least_one, read_prompt_file

METHODS = ("cfg", "scheduled", "ag", "linear-ag", "dynamic", "none")


def shipped_coefficients(args: argparse.Namespace) -> str | None:
    """The LinearAG coefficients shipped for a shapes-world model at this step count, if there are some."""
    from guidance.shapes.assets import ASSETS

    model, steps = getattr(args, "model", None), getattr(args, "num_inference_steps", None)
    folder = ASSETS / "linear-ag" / f"{SHAPES_MODELS.get(model)}-{steps}"
    return str(folder) if model in SHAPES_MODELS and folder.is_dir() else None


def default_evaluators(args: argparse.Namespace) -> list[str]:
    """The latent heads shipped for shapes:sd (fast: no decode), else the shapes-world CLIP."""
    from guidance.shapes.assets import ASSETS

    if getattr(args, "model", None) != "shapes:sd":
        return ["clip"]
    heads = [ASSETS / f"shapes-sd-latent-{kind}" for kind in ("clip", "fidelity")]
    missing = [str(head) for head in heads if not (head / "config.json").is_file()]
    if missing:
        raise FileNotFoundError(
            f"the latent heads shipped for shapes:sd are missing ({missing}): rebuild them with "
            "`guided-train-evaluator latent`, or name evaluators with `--evaluator`"
        )
    return [str(head) for head in heads]


def make_guidance(args: argparse.Namespace) -> GuidanceScheduler:
    """The guidance scheduler the options name."""
    common = dict(guidance_rescale=args.guidance_rescale, start=args.guidance_start, stop=args.guidance_stop)
    if args.guidance == "none":
        return ClassifierFreeGuidance(guidance_scale=1.0)
    if args.guidance == "ag":
        return AdaptiveGuidance(args.guidance_scale, threshold=args.threshold, compared=args.compared, **common)
    if args.guidance == "linear-ag":
        coefficients = args.coefficients or shipped_coefficients(args)
        if not coefficients:
            raise ValueError(
                "`--guidance linear-ag` needs `--coefficients FOLDER` (written by the calibration command; "
                "shipped in assets/linear-ag for shapes:sd and shapes:sd3 at 20 steps)"
            )
        return LinearAdaptiveGuidance.from_pretrained(coefficients, guidance_scale=args.guidance_scale, **common)
    if args.guidance == "dynamic":
        from guidance.evaluators.load import load_evaluator

        return DynamicGuidance(
            candidates=getattr(args, "candidates", None) or [1.0, 3.0, 7.5, 11.0, 15.0],
            evaluators=[load_evaluator(spec) for spec in getattr(args, "evaluator", None) or default_evaluators(args)],
            weighting=getattr(args, "weighting", "adaptive"),
            lookahead=getattr(args, "lookahead", "auto"),
            **common,
        )
    if args.guidance == "scheduled":
        return ScheduledGuidance(
            args.guidance_scale, final_guidance_scale=args.final_guidance_scale, schedule=args.schedule, **common
        )
    return ClassifierFreeGuidance(guidance_scale=args.guidance_scale, **common)


def read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts_file:
        prompts += read_prompt_file(args.prompts_file)
    if not prompts:
        raise ValueError("no prompts: give `--prompt` (repeatable) or `--prompts-file` (one prompt per line)")
    return prompts


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="guided-generate",
        description="Generate images with a guided diffusers pipeline; prints where the images went and the NFEs.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--prompt", action="append", help="a prompt; repeat the option for several")
    parser.add_argument("--prompts-file", help="a text file with one prompt per line")
    parser.add_argument("--negative-prompt", default=None, help="negative prompt used for every prompt")
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="shapes:sd or shapes:sd3 (the shapes-world models shipped in assets/), a diffusers pipeline folder "
        "(SD 1.x/2.x, SDXL, SD3, Flux) or hub id, or tiny:<sd|sdxl|sd3|flux> for tiny random components "
        "(a smoke test: the images are noise)",
    )
    parser.add_argument("--guidance", choices=METHODS, default="cfg", help="guidance method")
    parser.add_argument("--guidance-scale", type=float, default=7.5, help="CFG scale (first-step scale if scheduled)")
    parser.add_argument("--final-guidance-scale", type=float, default=None, help="scheduled: scale at the last step")
    parser.add_argument("--schedule", choices=("constant", "linear", "cosine"), default="linear", help="scheduled")
    parser.add_argument("--guidance-rescale", type=float, default=0.0, help="std rescale of the guided prediction")
    parser.add_argument("--guidance-start", type=float, default=0.0, help="guidance interval start (progress 0-1)")
    parser.add_argument("--guidance-stop", type=float, default=1.0, help="guidance interval stop (progress 0-1)")
    parser.add_argument("--threshold", type=float, default=0.995, help="ag: cosine similarity that ends CFG")
    parser.add_argument(
        "--compared", choices=("x0", "prediction", "xt_minus_prediction"), default="x0", help="ag: quantity compared"
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
    parser.add_argument("--weighting", choices=["adaptive", "fixed"], default="adaptive", help="dynamic: weights")
    parser.add_argument(
        "--lookahead",
        choices=["auto", "x0", "next_latent"],
        default="auto",
        help="dynamic: what is scored; auto: next_latent when every evaluator is a latent head, else x0",
    )
    parser.add_argument(
        "--coefficients",
        default=None,
        help="linear-ag: folder of fitted coefficients (default for shapes:sd/sd3 at 20 steps: the shipped ones)",
    )
    parser.add_argument(
        "--scheduler",
        choices=sorted(SCHEDULERS),
        default=None,
        help="diffusers scheduler to sample with, built from the model's config (default: the model's own)",
    )
    parser.add_argument("--num-inference-steps", type=int, default=20, help="denoising steps")
    parser.add_argument("--num-images-per-prompt", type=int, default=1, help="images per prompt")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per pipeline call")
    parser.add_argument("--height", type=int, default=None, help="image height in pixels (model default if unset)")
    parser.add_argument("--width", type=int, default=None, help="image width in pixels (model default if unset)")
    parser.add_argument("--seed", type=int, default=0, help="image k of the run uses seed + k")
    parser.add_argument("--output-dir", default="outputs", help="folder for the PNG images and trace.json")
    parser.add_argument(
        "--max-sequence-length",
        type=int,
        default=None,
        help="SD3/Flux text length (pipeline default; 16 for shapes:sd3, which was trained with it)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32", help="weights")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        prompts = read_prompts(args)
        check_at_least_one(args, "num_inference_steps", "num_images_per_prompt", "batch_size")
        guidance = make_guidance(args)
        pipe, family = load_pipeline(args.model, getattr(torch, args.dtype), args.device, args.scheduler)
    except (ValueError, TypeError, FileNotFoundError) as error:
        parser.error(str(error))
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    extra = call_defaults(args.model, family, args.max_sequence_length)
    records, nfes, image_index = [], [], 0
    for start in range(0, len(prompts), args.batch_size):
        batch = prompts[start : start + args.batch_size]
        count = len(batch) * args.num_images_per_prompt
        generators = [torch.Generator(args.device).manual_seed(args.seed + image_index + k) for k in range(count)]
        result = pipe(
            batch,
            negative_prompt=None if args.negative_prompt is None else [args.negative_prompt] * len(batch),
            num_inference_steps=args.num_inference_steps,
            num_images_per_prompt=args.num_images_per_prompt,
            height=args.height,
            width=args.width,
            generator=generators,
            guidance=guidance,
            **extra,
        )
        nfes.append((result.trace.nfe, count))
        for k, image in enumerate(result.images):
            path = out / f"{image_index:05d}.png"
            image.save(path)
            prompt = batch[k // args.num_images_per_prompt]
            scales = [step[k] for step in result.trace.scales]
            records.append({"file": path.name, "prompt": prompt, "seed": args.seed + image_index, "scales": scales})
            image_index += 1
    nfe = sum(value * count for value, count in nfes) / image_index
    summary = {
        "model": args.model,
        "scheduler": type(pipe.scheduler).__name__,
        "guidance": repr(guidance),
        "nfe_per_image": nfe,
        "images": records,
    }
    (out / "trace.json").write_text(json.dumps(summary, indent=1))
    print(f"wrote {image_index} images to {out.resolve()} (trace.json beside them)")
    print(f"guidance: {guidance!r}")
    print(f"NFE per image: {nfe:g} ({args.num_inference_steps} steps)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
