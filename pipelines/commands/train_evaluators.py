"""Train the evaluators of dynamic guidance for a given model (resumable, reproducible from `--seed`):

  discriminator  real vs generated images -> FidelityDiscriminator (pixel space)
  latent         a timestep-aware head on noisy latents, distilled from a pixel evaluator (`--teacher`):
                 "clip" (the shapes-world CLIP), "clip:<open_clip model or local-dir:folder>", or
                 "discriminator:<folder>"

    guided-train-evaluator discriminator --model shapes:sd --output assets/shapes-sd-fidelity
    guided-train-evaluator latent --model shapes:sd --teacher clip --output assets/shapes-sd-latent-clip

Generated images come from the model itself (CFG at every scale of `--scales`, `--num-inference-steps` steps);
real ones from the shapes-world generator (`--real shapes-world`; new ones at every discriminator step) or a
folder of images.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from guidance import vae as vae_latents
from guidance.denoised import add_noise, signal_power
from guidance.evaluators.clip import SHAPES_CLIP, ClipEvaluator
from guidance.evaluators.discriminator import FidelityDiscriminator
from guidance.evaluators.latent import LatentEvaluator
from guidance.evaluators.networks import ConvEncoder
from guidance.shapes.assets import load_world
from guidance.shapes.training import Trainer

from ..loading import call_defaults, load_pipeline
from .common import check_at_least_one, read_prompt_file

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
DEFAULT_STEPS = {"discriminator": 600, "latent": 1500}
DEFAULT_WIDTHS = {"discriminator": 32, "latent": 16}  # latent heads run on every candidate: kept small


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="guided-train-evaluator", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("command", choices=["discriminator", "latent"], help="what to train")
    parser.add_argument("--model", default="shapes:sd", help="the generator: shapes:sd, shapes:sd3 or a folder")
    parser.add_argument("--output", required=True, help="folder the trained evaluator is saved to")
    parser.add_argument("--teacher", default="clip", help="latent: the pixel evaluator distilled (see above)")
    parser.add_argument("--real", default="shapes-world", help="real images: 'shapes-world' or a folder of images")
    parser.add_argument(
        "--prompts-file", default=None, help="prompts for generation (default: the shapes-world training captions)"
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


def read_prompts(args, world) -> list[str]:
    if args.prompts_file:
        return read_prompt_file(args.prompts_file)
    return [world.caption(scene) for scene in world.training_scenes()]


def generated_pool(args, pipe, prompts: list[str], extra: dict) -> torch.Tensor:
    """Latents of `--num-generated` images, prompts and scales taken in turn (a fixed shuffle of the prompts)."""
    from guidance import ClassifierFreeGuidance

    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(args.seed)).tolist()
    jobs = [(prompts[order[i % len(order)]], args.scales[i % len(args.scales)]) for i in range(args.num_generated)]
    latents = []
    for scale in args.scales:
        chosen = [(i, p) for i, (p, s) in enumerate(jobs) if s == scale]
        for batch in (chosen[k : k + 32] for k in range(0, len(chosen), 32)):
            generators = [torch.Generator().manual_seed(args.seed * 100_003 + i) for i, _ in batch]
            out = pipe(
                [p for _, p in batch],
                num_inference_steps=args.num_inference_steps,
                generator=generators,
                output_type="latent",
                guidance=ClassifierFreeGuidance(scale),
                **extra,
            )
            unpacked = pipe.unpack_latents(out.images, *image_size(pipe))
            latents += list(zip([i for i, _ in batch], unpacked, strict=True))
    return torch.stack([latent for _, latent in sorted(latents, key=lambda item: item[0])])


def real_images(args, size: int) -> torch.Tensor:
    """`--num-real` real images in [-1, 1] at the model's size."""
    if args.real == "shapes-world":
        return fresh_world_images(load_world(), torch.Generator().manual_seed(args.seed + 1), args.num_real, size)
    import numpy as np
    from PIL import Image

    folder = Path(args.real)
    files = sorted(p for p in folder.glob("*") if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
    if not files:
        raise ValueError(f"`--real` must be 'shapes-world' or a folder of {IMAGE_SUFFIXES} images, got {args.real!r}")
    arrays = [np.asarray(Image.open(p).convert("RGB").resize((size, size)), dtype=np.float32) for p in files]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1


def fresh_world_images(world, generator: torch.Generator, n: int, size: int) -> torch.Tensor:
    """`n` newly drawn shapes-world images in [-1, 1] at `size`."""
    images = world.render(world.sample(n, generator), generator)
    if images.shape[-1] != size:
        images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return images


def image_size(pipe) -> tuple[int, int]:
    size = (getattr(pipe, "default_sample_size", None) or pipe.unet.config.sample_size) * pipe.vae_scale_factor
    return size, size


def encode(pipe, images: torch.Tensor) -> torch.Tensor:
    """Images -> latents scaled as the pipeline denoises them (the posterior's mode), in chunks."""
    return torch.cat([vae_latents.encode(pipe.vae, chunk) for chunk in images.split(64)])


def noised(pipe, z0: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(z_t, timestep, loss weight) for clean latents: a quarter clean (t = 0, the x0 look-ahead), the rest at a
    uniform training noise level; the weight (signal power) is near zero at high noise, as in the paper."""
    n, scheduler = len(z0), pipe.scheduler
    noise = torch.randn(z0.shape, generator=generator)
    clean = torch.rand(n, generator=generator) < 0.25
    steps = scheduler.config.num_train_timesteps
    if "FlowMatch" in type(scheduler).__name__:  # a continuous noise level, in the scheduler's timestep units
        t = torch.where(clean, 0.0, torch.rand(n, generator=generator) * steps)
    else:
        t = torch.where(clean, 0, torch.randint(0, steps, (n,), generator=generator)).float()
    z_t = torch.where(clean.view(-1, 1, 1, 1), z0, add_noise(scheduler, z0, noise, t))
    return z_t, t, torch.where(clean, 1.0, signal_power(scheduler, t))


def teacher_targets(args, images: torch.Tensor) -> tuple[str, str | None, torch.Tensor]:
    """(kind, teacher name, targets): CLIP image embeddings or a discriminator's logits of the clean images."""
    with torch.no_grad():
        if args.teacher == "clip" or args.teacher.startswith("clip:"):
            teacher = SHAPES_CLIP if args.teacher == "clip" else args.teacher.removeprefix("clip:")
            clip = ClipEvaluator(teacher)
            return "clip", teacher, torch.cat([clip.image_features(chunk) for chunk in images.split(128)])
        if args.teacher.startswith("discriminator:"):
            discriminator = FidelityDiscriminator.from_pretrained(args.teacher.removeprefix("discriminator:"))
            logits = torch.cat([discriminator.logits(chunk) for chunk in images.split(128)])
            return "score", args.teacher, logits[:, None]
    raise ValueError(f"`--teacher` must be 'clip', 'clip:<model>' or 'discriminator:<folder>', got {args.teacher!r}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.steps = DEFAULT_STEPS[args.command] if args.steps is None else args.steps
    args.width = DEFAULT_WIDTHS[args.command] if args.width is None else args.width
    if args.threads:
        torch.set_num_threads(args.threads)
    check_at_least_one(args, "num_generated", "num_real", "num_inference_steps", "steps", "batch_size", "width")
    pipe, family = load_pipeline(args.model)
    if family == "flux":
        raise ValueError("`--model`: evaluators can be trained for SD, SDXL and SD3 models (Flux packs its latents)")
    pipe.set_progress_bar_config(disable=True)
    size, _ = image_size(pipe)
    prompts = read_prompts(args, load_world())
    with torch.no_grad():
        print(f"generating {args.num_generated} images with {args.model} ...", flush=True)
        fake_latents = generated_pool(args, pipe, prompts, call_defaults(args.model, family))
        fake = torch.cat([pipe.decode_for_guidance(chunk) for chunk in fake_latents.split(64)])
        real = real_images(args, size)
    torch.manual_seed(args.seed)
    half = args.batch_size // 2 or 1
    run_name = f"{args.command}-{Path(args.output).name}"  # checkpoints of different outputs never mix

    def pick(pool: torch.Tensor, generator: torch.Generator, n: int) -> torch.Tensor:
        return torch.randint(len(pool), (n,), generator=generator)

    if args.command == "discriminator":
        evaluator = FidelityDiscriminator(image_size=size, width=args.width)
        world = load_world() if args.real == "shapes-world" else None

        def loss_fn(generator, step):  # the world draws new real images every step: no real image is memorised
            if world is not None:
                real_half = fresh_world_images(world, generator, half, size)
            else:
                real_half = real[pick(real, generator, half)]
            images = torch.cat([real_half, fake[pick(fake, generator, half)]])
            labels = torch.cat([torch.ones(half), torch.zeros(half)])
            return F.binary_cross_entropy_with_logits(evaluator.logits(images), labels)

        Trainer(run_name, evaluator.network, args.checkpoints, args.steps, args.lr, args.seed).run(loss_fn)
        with torch.no_grad():
            hits = (evaluator.logits(real[:256]) > 0).float().mean() + (
                evaluator.logits(fake[:256]) < 0
            ).float().mean()
            accuracy = hits.item() / 2
        print(f"discriminator accuracy on its pool (real vs generated): {accuracy:.3f}")
    else:
        with torch.no_grad():
            images = torch.cat([real, fake])
            latents = torch.cat([encode(pipe, real), fake_latents])
            kind, teacher, targets = teacher_targets(args, images)
        channels, latent_size = latents.shape[1], latents.shape[-1]
        network = ConvEncoder(channels, latent_size, targets.shape[1], width=args.width, timestep_aware=True)

        def loss_fn(generator, step):
            rows = pick(latents, generator, args.batch_size)
            z_t, timestep, weight = noised(pipe, latents[rows], generator)
            output = network(z_t, timestep)
            if kind == "clip":
                error = 1 - F.cosine_similarity(output, targets[rows], dim=-1)
            else:
                error = (output - targets[rows]).pow(2).mean(-1)
            return (weight * error).sum() / weight.sum()

        Trainer(run_name, network, args.checkpoints, args.steps, args.lr, args.seed).run(loss_fn)
        evaluator = LatentEvaluator(network, kind, teacher)
    evaluator.save_pretrained(args.output)
    print(f"saved {args.output}")
    return 0


def cli() -> int:
    """The console entry point: bad input is printed as an error (exit status 2), not as a traceback."""
    try:
        return main()
    except (ValueError, FileNotFoundError) as error:
        tqdm.write(f"error: {error}")
        return 2


if __name__ == "__main__":
    raise SystemExit(cli())
