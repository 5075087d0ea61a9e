"""Scheduled classifier-free guidance: the scale as a function of sampling progress.

Monotone schedules after Wang et al., "Analysis of Classifier-Free Guidance Weight Schedulers" (arXiv 2404.13040).
"""

from __future__ import annotations

from typing import Literal

from diffusers.configuration_utils import register_to_config

from .cfg import ComposedGuidance, UnconditionalSkip
from .scales import ScheduledScale
from .unconditional import UnconditionalModel


class ScheduledGuidance(ComposedGuidance):
    """CFG whose scale moves from `guidance_scale` (first step) to `final_guidance_scale` (last step).

    With progress `p` in [0, 1], `w0 = guidance_scale`, `w1 = final_guidance_scale`:
    constant `w = w0`; linear `w = w0 + (w1 - w0) p`; cosine `w = w1 + (w0 - w1) (1 + cos(pi p)) / 2`.
    Shorthand for `ClassifierFreeGuidance(ScheduledScale(...), ...)`; `start`, `stop`, `skip` and `unconditional`
    as there.
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
        skip: UnconditionalSkip | None = None,
        unconditional: UnconditionalModel | None = None,
    ):
        scale = ScheduledScale(
            guidance_scale=guidance_scale, final_guidance_scale=final_guidance_scale, schedule=schedule
        )
        self._compose(scale, guidance_rescale, start, stop, skip, unconditional)
