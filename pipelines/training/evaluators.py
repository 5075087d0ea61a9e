"""Training the evaluators of dynamic guidance for a pipeline (arXiv 2509.16131, sec. 3.3): a real-vs-generated
fidelity discriminator on pixels, and timestep-aware latent heads distilled from a pixel evaluator (a CLIP's image
embedding or a discriminator's logit), so that guidance scores candidates without decoding them.

Generated images come from the pipeline itself (CFG at several scales); real ones from a tensor of images, or from a
function that draws new ones at every step (the shapes world: no real image is seen twice). Every run is resumable
and reproducible from its seed (`Trainer`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from guidance import ClassifierFreeGuidance
from guidance import vae as vae_latents
from guidance.denoised import add_noise, is_flow_matching, signal_power
from guidance.evaluators.clip import ClipEvaluator
from guidance.evaluators.discriminator import FidelityDiscriminator
from guidance.evaluators.latent import LatentEvaluator
from guidance.evaluators.networks import ConvEncoder

from .trainer import Trainer

RealImages = torch.Tensor | Callable[[torch.Generator, int], torch.Tensor]
"""Real images in [-1, 1] at the model's size: a pool, or `draw(generator, n)` giving new ones."""


@dataclass
class EvaluatorTraining:
    """The optimisation of one evaluator: `name` keys its checkpoint in `checkpoints` (runs of other names never
    mix); `width` is the network's first-stage channels."""

    name: str
    steps: int
    checkpoints: Path
    batch_size: int = 64
    learning_rate: float = 1e-3
    width: int = 16
    seed: int = 0


def image_size(pipe) -> int:
    """The side in pixels of the pipeline's default images."""
    return (getattr(pipe, "default_sample_size", None) or pipe.unet.config.sample_size) * pipe.vae_scale_factor


def generated_latents(
    pipe,
    prompts: Sequence[str],
    count: int,
    scales: Sequence[float],
    num_inference_steps: int,
    seed: int = 0,
    **call_kwargs,
) -> torch.Tensor:
    """Latents (VAE layout) of `count` images of the pipeline, prompts and CFG scales taken in turn (a fixed shuffle
    of the prompts), image `i` from seed `seed * 100003 + i`."""
    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(seed)).tolist()
    jobs = [(prompts[order[i % len(order)]], scales[i % len(scales)]) for i in range(count)]
    size = image_size(pipe)
    latents = []
    for scale in scales:
        chosen = [(i, p) for i, (p, s) in enumerate(jobs) if s == scale]
        for batch in (chosen[k : k + 32] for k in range(0, len(chosen), 32)):
            generators = [torch.Generator().manual_seed(seed * 100_003 + i) for i, _ in batch]
            out = pipe(
                [p for _, p in batch],
                num_inference_steps=num_inference_steps,
                generator=generators,
                output_type="latent",
                guidance=ClassifierFreeGuidance(scale),
                **call_kwargs,
            )
            latents += list(zip([i for i, _ in batch], pipe.unpack_latents(out.images, size, size), strict=True))
    return torch.stack([latent for _, latent in sorted(latents, key=lambda item: item[0])])


def encode(pipe, images: torch.Tensor) -> torch.Tensor:
    """Images -> latents scaled as the pipeline denoises them (the posterior's mode), in chunks."""
    return torch.cat([vae_latents.encode(pipe.vae, chunk) for chunk in images.split(64)])


def noised(scheduler, z0: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """(z_t, timestep, loss weight) for clean latents: a quarter clean (t = 0, the x0 look-ahead), the rest at a
    uniform training noise level; the weight (signal power) is near zero at high noise, as in the paper."""
    n = len(z0)
    noise = torch.randn(z0.shape, generator=generator)
    clean = torch.rand(n, generator=generator) < 0.25
    steps = scheduler.config.num_train_timesteps
    if is_flow_matching(scheduler):  # a continuous noise level, in the scheduler's timestep units
        t = torch.where(clean, 0.0, torch.rand(n, generator=generator) * steps)
    else:
        t = torch.where(clean, 0, torch.randint(0, steps, (n,), generator=generator)).float()
    z_t = torch.where(clean.view(-1, 1, 1, 1), z0, add_noise(scheduler, z0, noise, t))
    return z_t, t, torch.where(clean, 1.0, signal_power(scheduler, t))


def rows(pool: torch.Tensor, generator: torch.Generator, n: int) -> torch.Tensor:
    return torch.randint(len(pool), (n,), generator=generator)


def train_discriminator(
    real: RealImages, generated: torch.Tensor, training: EvaluatorTraining
) -> tuple[FidelityDiscriminator, float]:
    """A `FidelityDiscriminator` at the generated images' size, and its accuracy on its pool (real vs generated)."""
    size, half = generated.shape[-1], max(training.batch_size // 2, 1)
    discriminator = FidelityDiscriminator(image_size=size, width=training.width)

    def loss_fn(generator, step):
        real_half = real(generator, half) if callable(real) else real[rows(real, generator, half)]
        images = torch.cat([real_half, generated[rows(generated, generator, half)]])
        labels = torch.cat([torch.ones(half), torch.zeros(half)])
        return F.binary_cross_entropy_with_logits(discriminator.logits(images), labels)

    Trainer(
        training.name,
        discriminator.network,
        training.checkpoints,
        training.steps,
        training.learning_rate,
        training.seed,
    ).run(loss_fn)
    with torch.no_grad():
        held = real(torch.Generator().manual_seed(training.seed + 1), 256) if callable(real) else real[:256]
        hits = (discriminator.logits(held) > 0).float().mean() + (
            discriminator.logits(generated[:256]) < 0
        ).float().mean()
    return discriminator.eval(), hits.item() / 2


def teacher_targets(teacher: ClipEvaluator | FidelityDiscriminator, images: torch.Tensor) -> tuple[str, torch.Tensor]:
    """(kind, targets) of clean images: a CLIP's image embeddings ("clip") or a discriminator's logits ("score")."""
    with torch.no_grad():
        if isinstance(teacher, ClipEvaluator):
            return "clip", torch.cat([teacher.image_features(chunk) for chunk in images.split(128)])
        if isinstance(teacher, FidelityDiscriminator):
            return "score", torch.cat([teacher.logits(chunk) for chunk in images.split(128)])[:, None]
    raise TypeError(f"`teacher` must be a ClipEvaluator or a FidelityDiscriminator, got {type(teacher).__name__}")


def train_latent_head(
    pipe,
    images: torch.Tensor,
    latents: torch.Tensor,
    teacher: ClipEvaluator | FidelityDiscriminator,
    teacher_name: str | None,
    training: EvaluatorTraining,
) -> LatentEvaluator:
    """A timestep-aware `LatentEvaluator` on noisy `latents` (VAE layout) that predicts what `teacher` says of the
    clean `images`; `teacher_name` is saved with it (for a "clip" head: the CLIP whose text tower scores, an
    open_clip name or "local-dir:<folder>")."""
    kind, targets = teacher_targets(teacher, images)
    network = ConvEncoder(
        latents.shape[1], latents.shape[-1], targets.shape[1], width=training.width, timestep_aware=True
    )

    def loss_fn(generator, step):
        picked = rows(latents, generator, training.batch_size)
        z_t, timestep, weight = noised(pipe.scheduler, latents[picked], generator)
        output = network(z_t, timestep)
        if kind == "clip":
            error = 1 - F.cosine_similarity(output, targets[picked], dim=-1)
        else:
            error = (output - targets[picked]).pow(2).mean(-1)
        return (weight * error).sum() / weight.sum()

    Trainer(training.name, network, training.checkpoints, training.steps, training.learning_rate, training.seed).run(
        loss_fn
    )
    return LatentEvaluator(network, kind, teacher_name).eval()
