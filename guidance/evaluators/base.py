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

    @classmethod
    def from_images(cls, images: torch.Tensor, prompts: list[str] | None = None) -> Candidates:
        """Candidates that are already images in [-1, 1] (clean, timestep 0): to score a set of pictures with a
        pixel evaluator."""
        return cls(images, torch.zeros(len(images)), prompts, _images=images)

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


@dataclass(frozen=True)
class Preprocess:
    """An image encoder's own preprocessing, applied to tensors: resize, crop or pad, normalise.

    `size` is the (height, width) the encoder reads. `resize_mode` as open_clip names them: "shortest" resizes the
    shorter side to `resize` (default: the crop's side) and center-crops `size` (CLIP's and transformers'
    `CLIPImageProcessor`'s eval transform); "longest" resizes the longer side and pads with `fill` (0-255); "squash"
    resizes to `size`. Resizing is antialiased `interpolation` (torch's antialiased bicubic is PIL's kernel, so
    pixels agree with a PIL pipeline to its uint8 rounding).
    """

    size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize_mode: Literal["shortest", "longest", "squash"] = "shortest"
    resize: int | None = None
    interpolation: Literal["bicubic", "bilinear"] = "bicubic"
    fill: int = 0

    def __post_init__(self):
        if self.resize_mode not in ("shortest", "longest", "squash"):
            raise ValueError(
                f"`resize_mode` must be one of ['shortest', 'longest', 'squash'], got {self.resize_mode!r}"
            )
        if self.interpolation not in ("bicubic", "bilinear"):
            raise ValueError(f"`interpolation` must be 'bicubic' or 'bilinear', got {self.interpolation!r}")

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1], (n, 3, h, w) -> the encoder's normalised input, (n, 3, *size)."""
        pixels = (images.float() + 1) / 2
        height, width = self.size
        if self.resize_mode == "squash":
            pixels = self.resized(pixels, (height, width))
        elif self.resize_mode == "longest":
            pixels = self.padded(self.resized(pixels, self.kept_ratio(pixels, min)))
        else:
            pixels = self.cropped(self.resized(pixels, self.kept_ratio(pixels, max)))
        mean = torch.as_tensor(self.mean, dtype=pixels.dtype, device=pixels.device).view(1, -1, 1, 1)
        std = torch.as_tensor(self.std, dtype=pixels.dtype, device=pixels.device).view(1, -1, 1, 1)
        return (pixels - mean) / std

    def kept_ratio(self, pixels: torch.Tensor, pick) -> tuple[int, int]:
        """The size that keeps the aspect ratio: the scale `pick` (max: cover the crop, min: fit inside it)."""
        h, w = pixels.shape[-2:]
        side = self.resize or (self.size[0] if self.size[0] == self.size[1] else None)
        if pick is max and side is not None:  # torchvision's Resize(int) and transformers' shortest_edge
            return (side, int(side * w / h)) if h <= w else (int(side * h / w), side)
        scale = pick(self.size[0] / h, self.size[1] / w)
        return max(round(h * scale), 1), max(round(w * scale), 1)

    def resized(self, pixels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        if tuple(pixels.shape[-2:]) == tuple(size):
            return pixels
        resized = F.interpolate(pixels, size=size, mode=self.interpolation, antialias=True, align_corners=False)
        return resized.clamp(0, 1)

    def cropped(self, pixels: torch.Tensor) -> torch.Tensor:
        (h, w), (height, width) = pixels.shape[-2:], self.size
        top, left = max((h - height) // 2, 0), max((w - width) // 2, 0)
        return self.padded(pixels[..., top : top + height, left : left + width])

    def padded(self, pixels: torch.Tensor) -> torch.Tensor:
        (h, w), (height, width) = pixels.shape[-2:], self.size
        if (h, w) == (height, width):
            return pixels
        top, left = (height - h) // 2, (width - w) // 2
        return F.pad(pixels, (left, width - w - left, top, height - h - top), value=self.fill / 255)
