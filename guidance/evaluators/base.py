"""One interface for the feedback of dynamic guidance: an evaluator scores a batch of look-ahead candidates."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F


@dataclass
class Candidates:
    """Look-ahead candidates to score, one row per (candidate scale, sample).

    `latents` are in the VAE's layout, scaled as the pipeline denoises them; `timestep` is their noise level in
    the pipeline scheduler's units (0 for a clean x0 estimate). `images` decodes them on first use (in [-1, 1]),
    so that pixel evaluators share one decode and latent evaluators need none.
    """

    latents: torch.Tensor
    timestep: torch.Tensor
    prompts: list[str] | None = None
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None
    _images: torch.Tensor | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return self.latents.shape[0]

    @property
    def images(self) -> torch.Tensor:
        if self._images is None:
            if self.decode is None:
                raise ValueError("these candidates have no decoder, so a pixel evaluator cannot score them")
            self._images = self.decode(self.latents)
        return self._images

    def require_prompts(self, evaluator: str) -> list[str]:
        if self.prompts is None:
            raise ValueError(
                f"evaluator {evaluator!r} scores image-text alignment and needs the prompts; "
                "call the pipeline with `prompt=` rather than `prompt_embeds=`"
            )
        return self.prompts


class Evaluator(torch.nn.Module):
    """Scores candidates: one finite number per row, higher is better.

    `space` says what it reads: "pixel" (decoded images, `candidates.images`) or "latent" (the latents and their
    timestep, no decode). Subclasses implement `forward`; callers use `score`, which checks the output.
    """

    space: ClassVar[Literal["pixel", "latent"]] = "pixel"

    def __init__(self, name: str):
        super().__init__()
        self.name = name

    def forward(self, candidates: Candidates) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def score(self, candidates: Candidates) -> torch.Tensor:
        """`forward`, checked: a float tensor of shape (len(candidates),) with no NaN or infinity."""
        scores = self(candidates)
        if not isinstance(scores, torch.Tensor) or scores.shape != (len(candidates),):
            shape = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
            raise ValueError(
                f"evaluator {self.name!r} must return one score per candidate, shape ({len(candidates)},); got {shape}"
            )
        if not torch.isfinite(scores).all():
            raise ValueError(f"evaluator {self.name!r} returned non-finite scores: {scores.tolist()}")
        return scores.float().cpu()


def prepare_images(images: torch.Tensor, size: tuple[int, int], mean, std) -> torch.Tensor:
    """Images in [-1, 1] resized (bicubic, antialiased) and normalised for an image encoder."""
    pixels = (images.float() + 1) / 2
    if tuple(pixels.shape[-2:]) != tuple(size):
        pixels = F.interpolate(pixels, size=size, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    mean = torch.as_tensor(mean, dtype=pixels.dtype, device=pixels.device).view(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=pixels.dtype, device=pixels.device).view(1, -1, 1, 1)
    return (pixels - mean) / std
