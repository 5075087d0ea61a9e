"""Which guidance scale each row gets: a constant, a schedule over sampling progress (Wang et al., "Analysis of
Classifier-Free Guidance Weight Schedulers", arXiv 2404.13040), or a per-step choice (`guidance.dynamic`)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import torch
from diffusers.configuration_utils import register_to_config

from .checks import check_choice, check_scale, is_number
from .scheduler import GuidancePart, GuidanceStep

SCHEDULES = ("constant", "linear", "cosine")
Combine = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]
"""`combine(pred_cond, pred_uncond, w)`: the policy's CFG formula, `w` a number or one value per row."""


class GuidanceScale(GuidancePart):
    """A scale rule: whether a step needs the unconditional prediction, and the guided prediction of the rows."""

    uses_combine = True
    """Whether `apply` combines through the policy's formula (and so applies its `guidance_rescale`)."""

    def needs_uncond(self, step: GuidanceStep) -> bool:
        """False where the rule applies scale 1 to every row (the unconditional pass would be wasted)."""
        return True

    def apply(
        self, step: GuidanceStep, cond: torch.Tensor, uncond: torch.Tensor, rows: torch.Tensor | None, combine: Combine
    ) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """(guided prediction, scale per row, trace extras) for the guided `rows` (a bool mask; None: every row);
        the other rows keep `cond`."""
        raise NotImplementedError


class StepScale(GuidanceScale):
    """A scale that depends on the step only: `value(step)` for every guided row."""

    def value(self, step: GuidanceStep) -> float:
        raise NotImplementedError

    def needs_uncond(self, step: GuidanceStep) -> bool:
        return self.value(step) != 1.0

    def apply(self, step, cond, uncond, rows, combine):
        w = self.value(step)
        guided = combine(cond, uncond, w)
        if rows is None:
            return guided, torch.full((step.batch_size,), w), {}
        guided = torch.where(rows.to(guided.device).view(-1, *[1] * (guided.ndim - 1)), guided, cond)
        return guided, torch.where(rows, w, 1.0), {}


class ConstantScale(StepScale):
    """The same `guidance_scale` at every step (a plain number given as a policy's scale means this)."""

    @register_to_config
    def __init__(self, guidance_scale: float = 7.5):
        check_scale("guidance_scale", guidance_scale)

    def value(self, step: GuidanceStep) -> float:
        return self.config.guidance_scale


class ScheduledScale(StepScale):
    """A scale moving from `guidance_scale` (first evaluation) to `final_guidance_scale` (last) with progress `p`:
    constant `w0`; linear `w0 + (w1 - w0) p`; cosine `w1 + (w0 - w1) (1 + cos(pi p)) / 2`."""

    @register_to_config
    def __init__(
        self,
        guidance_scale: float = 7.5,
        final_guidance_scale: float | None = None,
        schedule: Literal["constant", "linear", "cosine"] = "linear",
    ):
        check_scale("guidance_scale", guidance_scale)
        check_choice("schedule", schedule, SCHEDULES)
        if final_guidance_scale is not None:
            check_scale("final_guidance_scale", final_guidance_scale)
        if schedule == "constant" and final_guidance_scale not in (None, guidance_scale):
            raise ValueError(
                f"`final_guidance_scale` must be None for schedule='constant', got {final_guidance_scale}"
            )

    def value(self, step: GuidanceStep) -> float:
        w0 = self.config.guidance_scale
        w1 = w0 if self.config.final_guidance_scale is None else self.config.final_guidance_scale
        p = step.progress
        if self.config.schedule == "linear":
            return w0 + (w1 - w0) * p
        if self.config.schedule == "cosine":
            return w1 + (w0 - w1) * (1 + math.cos(math.pi * p)) / 2
        return w0


def as_scale(value: Any, name: str = "guidance_scale") -> GuidanceScale:
    """A scale rule from a number (constant) or a `GuidanceScale`, else an error naming the argument."""
    if isinstance(value, GuidanceScale):
        return value
    if not is_number(value):
        raise TypeError(f"`{name}` must be a number or a GuidanceScale, got {type(value).__name__} {value!r}")
    return ConstantScale(check_scale(name, value))
