"""Scheduled classifier-free guidance: the scale as a function of sampling progress.

Monotone schedules after Wang et al., "Analysis of Classifier-Free Guidance Weight Schedulers" (arXiv 2404.13040).
"""

from __future__ import annotations

import math
from typing import Literal

from diffusers.configuration_utils import register_to_config

from .cfg import ClassifierFreeGuidance
from .scheduler import GuidanceStep, check_scale

SCHEDULES = ("constant", "linear", "cosine")


class ScheduledGuidance(ClassifierFreeGuidance):
    """CFG whose scale moves from `guidance_scale` (first step) to `final_guidance_scale` (last step).

    With progress `p` in [0, 1], `w0 = guidance_scale`, `w1 = final_guidance_scale`:
    constant `w = w0`; linear `w = w0 + (w1 - w0) p`; cosine `w = w1 + (w0 - w1) (1 + cos(pi p)) / 2`.
    `start`/`stop` bound the guidance interval as in `ClassifierFreeGuidance`.
    """

    @register_to_config
    def __init__(
        self,
        guidance_scale: float = 7.5,
        final_guidance_scale: float | None = None,
        schedule: Literal["constant", "linear", "cosine"] = "linear",
        guidance_rescale: float = 0.0,
        start: float = 0.0,
        stop: float = 1.0,
    ):
        super().__init__(guidance_scale=guidance_scale, guidance_rescale=guidance_rescale, start=start, stop=stop)
        if schedule not in SCHEDULES:
            raise ValueError(f"`schedule` must be one of {list(SCHEDULES)}, got {schedule!r}")
        if final_guidance_scale is not None:
            check_scale("final_guidance_scale", final_guidance_scale)
        if schedule == "constant" and final_guidance_scale not in (None, guidance_scale):
            raise ValueError(
                f"`final_guidance_scale` must be None for schedule='constant', got {final_guidance_scale}"
            )

    def scale_at(self, step: GuidanceStep) -> float:
        w0 = self.config.guidance_scale
        w1 = w0 if self.config.final_guidance_scale is None else self.config.final_guidance_scale
        p = step.progress
        if self.config.schedule == "linear":
            return w0 + (w1 - w0) * p
        if self.config.schedule == "cosine":
            return w1 + (w0 - w1) * (1 + math.cos(math.pi * p)) / 2
        return w0
