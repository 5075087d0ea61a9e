"""Training the evaluators of dynamic guidance for a pipeline (arXiv 2509.16131, sec. 3.3): a real-vs-generated
fidelity discriminator on pixels, and timestep-aware latent heads distilled from a pixel evaluator, so that guidance
scores candidates without decoding them, on every family (the heads read the VAE's layout: Flux's packed tokens are
unpacked first).

What a head learns from its teacher (`teacher_targets`):
- an image-text model (`EmbeddingEvaluator`: open_clip or transformers CLIP, PickScore, HPSv2): the clean image's
  embedding, kind "clip". The head is scored with the teacher's own text tower and scale, so prompt-dependent rewards
  (PickScore, HPSv2) need no prompt in the network and no prompt at training time;
- any other pixel evaluator (the discriminator, the aesthetic predictor, a `RewardEvaluator` callable): its score of
  the clean image, kind "score". A teacher that reads prompts gets each image's own prompt (`prompts=`), and the head
  learns the score of the image under the prompt it was made for: it cannot tell prompts apart at sampling time, so
  for alignment rewards an embedding teacher is the route.
`distill_latent_head` holds out part of the pool and reports the head's agreement with its teacher there.

Generated images come from the pipeline itself (CFG at several scales); real ones from a tensor of images, or from a
function that draws new ones at every step (the shapes world: no real image is seen twice). Every run is resumable
and reproducible from its seed (`Trainer`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from guidance import ClassifierFreeGuidance
from guidance import vae as vae_latents
from guidance.denoised import add_noise, is_flow_matching, signal_power
from guidance.evaluators.base import Candidates, Evaluator
from guidance.evaluators.discriminator import FidelityDiscriminator
from guidance.evaluators.embedding import EmbeddingEvaluator
from guidance.evaluators.latent import LatentEvaluator
from guidance.evaluators.networks import ConvEncoder
from guidance.evaluators.teachers import TeacherSpec

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
    """The side in pixels of the pipeline's default images (SDXL, SD3 and Flux: `default_sample_size`; SD: the
    UNet's sample size) times the VAE's scale factor."""
    return (getattr(pipe, "default_sample_size", None) or pipe.unet.config.sample_size) * pipe.vae_scale_factor


def generated_prompts(prompts: Sequence[str], count: int, seed: int = 0) -> list[str]:
    """The prompt of each of the `count` images `generated_latents` makes: the prompts in turn, in a fixed shuffle."""
    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(seed)).tolist()
    return [prompts[order[i % len(order)]] for i in range(count)]


def generated_latents(
    pipe,
    prompts: Sequence[str],
    count: int,
    scales: Sequence[float],
    num_inference_steps: int,
    seed: int = 0,
    **call_kwargs,
) -> torch.Tensor:
    """Latents (VAE layout) of `count` images of the pipeline, prompts (`generated_prompts`) and CFG scales taken in
    turn, image `i` from seed `seed * 100003 + i`; at `height` x `width` of `call_kwargs`, else the default size."""
    jobs = [(prompt, scales[i % len(scales)]) for i, prompt in enumerate(generated_prompts(prompts, count, seed))]
    height = call_kwargs.get("height") or image_size(pipe)
    width = call_kwargs.get("width") or image_size(pipe)
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
            unpacked = pipe.unpack_latents(out.images, height, width)
            latents += list(zip([i for i, _ in batch], unpacked, strict=True))
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


def teacher_targets(
    teacher: Evaluator, images: torch.Tensor, prompts: Sequence[str] | None = None
) -> tuple[str, torch.Tensor]:
    """(kind, targets) of clean images in [-1, 1]: an image-text model's unit image embeddings ("clip", (n, dim)),
    or any other pixel evaluator's score ("score", (n, 1)), given each image's prompt when it reads prompts."""
    if not isinstance(teacher, Evaluator) or teacher.space != "pixel":
        got = type(teacher).__name__ if not isinstance(teacher, Evaluator) else f"a {teacher.space} evaluator"
        raise TypeError(f"`teacher` must be a pixel Evaluator (it scores the clean images), got {got}")
    if prompts is not None and len(prompts) != len(images):
        raise ValueError(f"`prompts` must hold one prompt per image ({len(images)}), got {len(prompts)}")
    chunks = range(0, len(images), 128)
    with torch.no_grad():
        if isinstance(teacher, EmbeddingEvaluator):
            return "clip", torch.cat([teacher.image_features(images[k : k + 128]).cpu() for k in chunks])
        scores = [teacher.score(Candidates.from_images(images[k : k + 128], part(prompts, k))) for k in chunks]
    return "score", torch.cat(scores)[:, None]


def part(prompts: Sequence[str] | None, start: int) -> list[str] | None:
    return None if prompts is None else list(prompts[start : start + 128])


def fit_latent_head(pipe, latents: torch.Tensor, kind: str, targets: torch.Tensor, training: EvaluatorTraining):
    """A timestep-aware `ConvEncoder` trained on noisy `latents` (VAE layout) to predict `targets` of the clean ones:
    cosine error for embeddings ("clip"), squared error for scores; weighted by signal power (`noised`)."""
    if latents.shape[-1] != latents.shape[-2]:
        raise ValueError(f"latent heads read square latents; got {tuple(latents.shape[-2:])} (use square images)")
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
    return network.eval()


def latent_head(network, kind: str, teacher: Evaluator, teacher_name: TeacherSpec | None) -> LatentEvaluator:
    """The trained network as a `LatentEvaluator`; a "clip" head keeps the loaded teacher for its text tower."""
    model = teacher if kind == "clip" else None
    return LatentEvaluator(network, kind, teacher_name, teacher_model=model).eval()


@dataclass
class HeadAgreement:
    """How a latent head agrees with its teacher on `held_out` clean latents (t = 0) it was not trained on.

    `cosine`: "clip" heads, the mean cosine of predicted and teacher image embeddings, beside `baseline_cosine`, what
    a head that ignores its input gets (the training targets' mean embedding). `rank_correlation`: Spearman's rho of
    the head's and the teacher's scores (score heads; "clip" heads when prompts were given), 1 for the same order.
    """

    held_out: int
    cosine: float | None = None
    baseline_cosine: float | None = None
    rank_correlation: float | None = None


@dataclass
class DistilledHead:
    """A distilled latent head and its agreement with its teacher."""

    evaluator: LatentEvaluator
    agreement: HeadAgreement


def distill_latent_head(
    pipe,
    images: torch.Tensor,
    latents: torch.Tensor,
    teacher: Evaluator,
    training: EvaluatorTraining,
    teacher_name: TeacherSpec | None = None,
    prompts: Sequence[str] | None = None,
    held_out: float = 0.2,
) -> DistilledHead:
    """A timestep-aware `LatentEvaluator` on noisy `latents` (VAE layout) that predicts what `teacher` says of the
    clean `images` (`teacher_targets`; `prompts`, one per image, for a teacher that reads them), trained on the pool
    but a held-out `held_out` fraction of it (a fixed draw from `training.seed`), and its agreement with `teacher`
    there (`HeadAgreement`). `teacher_name` is saved with it (for a "clip" head: the model whose text tower scores, an
    open_clip name or a teacher spec; None: the teacher's own spec)."""
    if not 0 < held_out < 1:
        raise ValueError(f"`held_out` must be a fraction in (0, 1), got {held_out!r}")
    count = round(len(images) * held_out)
    if count < 2 or len(images) - count < 1:
        raise ValueError(
            f"`held_out` {held_out} of {len(images)} images leaves {count} to measure agreement on and "
            f"{len(images) - count} to train on: needs at least 2 and 1"
        )
    kind, targets = teacher_targets(teacher, images, prompts)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(training.seed))
    held, kept = order[:count], order[count:]
    network = fit_latent_head(pipe, latents[kept], kind, targets[kept], training)
    head = latent_head(network, kind, teacher, teacher_name)
    held_prompts = None if prompts is None else [prompts[i] for i in held.tolist()]
    agreement = head_agreement(head, latents[held], targets[held], held_prompts, targets[kept].mean(0))
    return DistilledHead(head, agreement)


@torch.no_grad()
def head_agreement(
    head: LatentEvaluator,
    latents: torch.Tensor,
    targets: torch.Tensor,
    prompts: Sequence[str] | None = None,
    mean_target: torch.Tensor | None = None,
) -> HeadAgreement:
    """`HeadAgreement` of `head` at t = 0 on clean `latents` with its teacher's `targets` (`teacher_targets`)."""
    predicted = head.predict(latents, torch.zeros(len(latents))).cpu()
    if head.kind == "score":
        return HeadAgreement(len(latents), rank_correlation=rank_correlation(predicted[:, 0], targets[:, 0]))
    cosine = F.cosine_similarity(predicted, targets, dim=-1).mean().item()
    baseline = None if mean_target is None else F.cosine_similarity(mean_target[None], targets, dim=-1).mean().item()
    rho = None
    if prompts is not None:
        rho = rank_correlation(
            head.clip.similarity(predicted, list(prompts)), head.clip.similarity(targets, list(prompts))
        )
    return HeadAgreement(len(latents), cosine, baseline, rho)


def rank_correlation(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman's rho of two score vectors (NaN when either is constant)."""
    ranks = [v.double().argsort().argsort().double() for v in (x.cpu(), y.cpu())]
    a, b = (r - r.mean() for r in ranks)
    denominator = (a.square().sum() * b.square().sum()).sqrt().item()
    return (a * b).sum().item() / denominator if denominator > 0 else math.nan
