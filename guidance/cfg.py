"""Classifier-free guidance (Ho & Salimans, arXiv 2207.12598, eq. 6), composed of independent parts.

`eps = eps_u + w (eps_c - eps_u)`, where three questions are answered by three parts:
- which rows run the unconditional pass at a step: inside the guidance interval [start, stop] (Kynkäänniemi et al.,
  arXiv 2404.07724), minus what a skipping rule (`skip`) removes: AG's converged rows, LinearAG's synthesised steps;
- which scale `w` each guided row gets (`guidance_scale`): a number, a schedule, or a dynamic per-step choice;
- which weights compute `eps_u` (`unconditional`): the base model, another model, or switched weights (an adapter).
Every shipped method is this class with some parts set; any combination of parts is a policy.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from diffusers.configuration_utils import register_to_config

from .checks import check_fraction
from .scales import GuidanceScale, as_scale
from .scheduler import (
    BranchRequest,
    GuidancePart,
    GuidanceRun,
    GuidanceScheduler,
    GuidanceStep,
    GuidedPrediction,
    coverage,
    is_part_config,
    part_from_config,
)
from .unconditional import BASE_MODEL, UnconditionalModel


class UnconditionalSkip(GuidancePart):
    """A skipping rule: which rows run the unconditional pass, and what stands in for the passes that did not run
    (nothing, so the row goes unguided; or an estimate of `eps_u`)."""

    def check_interval(self, start: float, stop: float) -> None:
        """Raise when the rule cannot work inside the guidance interval [start, stop]."""

    def rows(self, step: GuidanceStep, needed: bool) -> torch.Tensor:
        """Bool mask (batch,) of the rows whose unconditional pass runs; `needed` says whether the step is guided."""
        raise NotImplementedError

    def complete(
        self, step: GuidanceStep, request: BranchRequest, cond: torch.Tensor, uncond: torch.Tensor | None, needed: bool
    ) -> tuple[torch.Tensor | None, torch.Tensor, dict]:
        """(unconditional prediction to use, bool mask of the rows to guide, trace extras) after the passes ran."""
        raise NotImplementedError


def classifier_free(
    pred_cond: torch.Tensor, pred_uncond: torch.Tensor, w: float | torch.Tensor, guidance_rescale: float = 0.0
) -> torch.Tensor:
    """`pred_u + w (pred_c - pred_u)`, as diffusers writes it, then the std rescaling of Lin et al. (arXiv 2305.08891,
    sec. 3.4) per row when `guidance_rescale > 0`; `w` a number or one value per row."""
    guided = pred_uncond + w * (pred_cond - pred_uncond)
    if guidance_rescale > 0:
        from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

        guided = rescale_noise_cfg(guided, pred_cond, guidance_rescale=guidance_rescale)
    return guided


class ComposedGuidance(GuidanceScheduler):
    """The mechanics shared by every CFG policy: interval, scale rule, skipping rule and unconditional model.

    Subclasses call `_compose` from their constructor with the parts their arguments describe. A part given as an
    argument is saved inside the config as its dict and rebuilt from it on load.
    """

    ignore_for_config = ["unconditional"]

    def _compose(
        self,
        scale: float | GuidanceScale | dict,
        guidance_rescale: float = 0.0,
        start: float = 0.0,
        stop: float = 1.0,
        skip: UnconditionalSkip | dict | None = None,
        unconditional: UnconditionalModel | None = None,
    ) -> None:
        self.scale = as_scale(part_from_config(scale) if is_part_config(scale) else scale)
        self.guidance_rescale = check_fraction("guidance_rescale", guidance_rescale)
        if guidance_rescale and not self.scale.uses_combine:
            raise ValueError(
                f"`guidance_rescale` must be 0 with {type(self.scale).__name__}, which combines the predictions with "
                f"its own formula: set the rescaling there (a diffusers guider's own `guidance_rescale`), got "
                f"{guidance_rescale}"
            )
        self.start, self.stop = check_fraction("start", start), check_fraction("stop", stop)
        if start > stop:
            raise ValueError(f"`start` must be <= `stop` (a guidance interval [start, stop]), got {start} > {stop}")
        skip = part_from_config(skip) if is_part_config(skip) else skip
        if skip is not None and not isinstance(skip, UnconditionalSkip):
            raise TypeError(
                f"`skip` must be an UnconditionalSkip (e.g. AdaptiveSkip) or None, got {type(skip).__name__}"
            )
        self.skip = skip
        if skip is not None:
            skip.check_interval(self.start, self.stop)
        if unconditional is not None and not isinstance(unconditional, UnconditionalModel):
            raise TypeError(
                f"`unconditional` must be an UnconditionalModel (e.g. SeparateModel) or None, got "
                f"{type(unconditional).__name__}"
            )
        self.unconditional = unconditional or BASE_MODEL
        self.part_arguments = {"guidance_scale": self.scale, "skip": self.skip}
        given = {
            key: part.to_dict()
            for key, part in self.part_arguments.items()
            if isinstance(self.config.get(key), GuidancePart)
        }
        if given:
            self.register_to_config(**given)

    @property
    def parts(self) -> list[GuidancePart]:
        return [self.scale] if self.skip is None else [self.scale, self.skip]

    def runtime_objects(self) -> dict[str, Any]:
        """The runtime objects, and a fresh copy of every part the config holds as a dict (with its own objects)."""
        parts = {key: part.new() for key, part in self.part_arguments.items() if is_part_config(self.config.get(key))}
        return {**super().runtime_objects(), **parts}

    def reset(self, run: GuidanceRun) -> None:
        for part in self.parts:
            part.reset(run)

    def save_objects(self, folder: str | os.PathLike) -> None:
        for part in self.parts:
            part.save_objects(folder)

    @classmethod
    def load_objects(cls, folder: str | os.PathLike, config: dict) -> dict[str, Any]:
        """Every part the config holds as a dict, rebuilt with the objects it saved in `folder`."""
        return {key: part_from_config(value, folder) for key, value in config.items() if is_part_config(value)}

    def inside(self, step: GuidanceStep) -> bool:
        """Whether this step lies in the guidance interval."""
        return self.start <= step.progress <= self.stop

    def needs_uncond(self, step: GuidanceStep) -> bool:
        """Whether the step is guided: inside the interval, at a scale that needs the unconditional prediction."""
        return self.inside(step) and self.scale.needs_uncond(step)

    def branches(self, step: GuidanceStep) -> BranchRequest:
        needed = self.needs_uncond(step)
        rows = needed if self.skip is None else self.skip.rows(step, needed)
        return BranchRequest.full(step.batch_size, uncond=rows)

    def combine(self, step, request, predictions) -> GuidedPrediction:
        cond, uncond = predictions["cond"], predictions.get("uncond")
        if self.skip is None:
            rows, extras = request.uncond, {}
        else:
            uncond, rows, extras = self.skip.complete(step, request, cond, uncond, self.needs_uncond(step))
        covered = request.coverage("uncond") if rows is request.uncond else coverage(rows)
        if uncond is None or covered == "none":
            return GuidedPrediction(cond, torch.ones(step.batch_size), extras)
        rows = None if covered == "all" else rows
        guided, scales, scale_extras = self.scale.apply(step, cond, uncond, rows, self.classifier_free)
        return GuidedPrediction(guided, scales, {**extras, **scale_extras})

    def classifier_free(self, pred_cond, pred_uncond, w) -> torch.Tensor:
        """This policy's combination of the two predictions at scale `w` (with its `guidance_rescale`)."""
        return classifier_free(pred_cond, pred_uncond, w, self.guidance_rescale)

    def __repr__(self) -> str:
        text = super().__repr__()
        if self.unconditional is not BASE_MODEL:
            text = f"{text[:-1]}, unconditional={self.unconditional!r})"
        return text


class ClassifierFreeGuidance(ComposedGuidance):
    """`eps = eps_u + w (eps_c - eps_u)` inside a guidance interval, conditional pass only outside it.

    Args:
        guidance_scale: `w`, a finite number >= 0 (at `w == 1` only the conditional branch runs, as in diffusers),
            or a scale rule: `ScheduledScale`, `DynamicScale`.
        guidance_rescale: std rescaling of the guided prediction (0 disables it), as diffusers' argument.
        start, stop: the guidance interval, as fractions of the run's timesteps (0 = first evaluation, 1 = last).
            Outside it the unconditional pass is not run.
        skip: a skipping rule (`AdaptiveSkip`, `LinearAGSkip`) or None (every guided step runs the pass).
        unconditional: the model of the unconditional branch (`SeparateModel`, `SwitchedModel`); None: the base.
    """

    @register_to_config
    def __init__(
        self,
        guidance_scale: float | GuidanceScale = 7.5,
        guidance_rescale: float = 0.0,
        start: float = 0.0,
        stop: float = 1.0,
        skip: UnconditionalSkip | None = None,
        unconditional: UnconditionalModel | None = None,
    ):
        self._compose(guidance_scale, guidance_rescale, start, stop, skip, unconditional)
