"""Classifier-free guidance (Ho & Salimans, arXiv 2207.12598, eq. 6) with a guidance interval."""

from __future__ import annotations

import torch
from diffusers.configuration_utils import register_to_config

from .scheduler import BranchRequest, GuidanceScheduler, GuidanceStep, check_fraction, check_scale


class ClassifierFreeGuidance(GuidanceScheduler):
    """`eps = eps_u + w (eps_c - eps_u)` inside a guidance interval, conditional pass only outside it.

    Args:
        guidance_scale: `w`, a finite number >= 0. At `w == 1` only the conditional branch runs (as in diffusers).
        guidance_rescale: std rescaling of the guided prediction (0 disables it), as diffusers' argument.
        start, stop: the guidance interval, as fractions of sampling progress (0 = first step, 1 = last step),
            in the spirit of Kynkäänniemi et al. (arXiv 2404.07724). Outside it the unconditional pass is not run.
    """

    @register_to_config
    def __init__(
        self, guidance_scale: float = 7.5, guidance_rescale: float = 0.0, start: float = 0.0, stop: float = 1.0
    ):
        check_scale("guidance_scale", guidance_scale)
        check_fraction("guidance_rescale", guidance_rescale)
        check_fraction("start", start)
        check_fraction("stop", stop)
        if start > stop:
            raise ValueError(f"`start` must be <= `stop` (a guidance interval [start, stop]), got {start} > {stop}")

    def scale_at(self, step: GuidanceStep) -> float:
        """The guidance scale `w` at this step; subclasses schedule it."""
        return self.config.guidance_scale

    def guided_at(self, step: GuidanceStep) -> bool:
        """Whether this step lies in the guidance interval and its scale needs the unconditional pass."""
        inside = self.config.start <= step.progress <= self.config.stop
        return inside and self.scale_at(step) != 1.0

    def branches(self, step: GuidanceStep) -> BranchRequest:
        return BranchRequest.full(step.latents.shape[0], uncond=self.guided_at(step))

    def combine(
        self, step: GuidanceStep, request: BranchRequest, predictions: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        pred_cond = predictions["cond"]
        if not request.uncond.any():
            return pred_cond, torch.ones(pred_cond.shape[0])
        w = self.scale_at(step)
        guided = self.guide(pred_cond, predictions["uncond"], w)
        if not request.uncond.all():
            rows = request.uncond.to(guided.device).view(-1, *([1] * (guided.ndim - 1)))
            guided = torch.where(rows, guided, pred_cond)
        return guided, torch.where(request.uncond, w, 1.0)

    def guide(self, pred_cond: torch.Tensor, pred_uncond: torch.Tensor, w: float | torch.Tensor) -> torch.Tensor:
        """`pred_u + w (pred_c - pred_u)` with the configured std rescaling; `w` a number or one per row."""
        guided = pred_uncond + w * (pred_cond - pred_uncond)
        if self.config.guidance_rescale > 0:
            from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

            # std rescaling of Lin et al. (arXiv 2305.08891, sec. 3.4), as diffusers applies it, per row
            guided = rescale_noise_cfg(guided, pred_cond, guidance_rescale=self.config.guidance_rescale)
        return guided
