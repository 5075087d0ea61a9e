"""A bridge from diffusers' experimental guiders (`diffusers.guiders`) to this project's policies.

A two-prediction guider (CFG, APG, CFG-Zero*, tangential CFG, frequency-decoupled, magnitude-aware guidance)
becomes a scale rule: it decides, with its own `start`/`stop` and scale, whether a step needs the unconditional
prediction, and combines the two predictions with its own formula. Everything else composes with it: per-row
skipping (AG), a guidance interval, another unconditional model, the trace, every pipeline family and scheduler.
Guiders that change the model (perturbed attention, skip-layer, smoothed energy, AutoGuidance) need hooks and
extra branches that this sampler does not run, and are refused.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.configuration_utils import register_to_config

from .scales import GuidanceScale
from .scheduler import GuidanceRun, GuidanceStep

TWO_PREDICTIONS = ["pred_cond", "pred_uncond"]


def guider_from_config(config: dict) -> Any:
    """A diffusers guider rebuilt from `{"class_name": ..., **its config}`."""
    import diffusers.guiders

    name = config.get("class_name")
    if not isinstance(name, str) or not hasattr(diffusers.guiders, name):
        raise ValueError(f"saved diffusers guider {name!r} is not a class of diffusers.guiders")
    return getattr(diffusers.guiders, name).from_config({k: v for k, v in config.items() if k != "class_name"})


class GuiderScale(GuidanceScale):
    """A diffusers guider as a scale rule: `guider` is a `diffusers.guiders` instance with two predictions (or its
    saved config). Its scale is recorded in the trace for the rows it guides; it combines with its own formula, so
    rescaling is the guider's own `guidance_rescale`."""

    uses_combine = False

    @register_to_config
    def __init__(self, guider: Any = None):
        from diffusers.guiders import BaseGuidance

        guider = guider_from_config(guider) if isinstance(guider, dict) else guider
        if not isinstance(guider, BaseGuidance):
            raise TypeError(f"`guider` must be a diffusers.guiders guider, got {type(guider).__name__}")
        if list(guider._input_predictions) != TWO_PREDICTIONS or type(guider).prepare_models is not (
            BaseGuidance.prepare_models
        ):
            raise ValueError(
                f"`guider` {type(guider).__name__} needs predictions {list(guider._input_predictions)} or model "
                "hooks; "
                f"supported: guiders that combine {TWO_PREDICTIONS} alone (ClassifierFreeGuidance, "
                "AdaptiveProjectedGuidance, ClassifierFreeZeroStarGuidance, TangentialClassifierFreeGuidance, ...)"
            )
        self.guider = guider
        config = {k: v for k, v in guider.config.items() if not k.startswith("_")}
        self.register_to_config(guider={"class_name": type(guider).__name__, **config})

    def reset(self, run: GuidanceRun) -> None:
        self.started = False

    def _set_state(self, step: GuidanceStep) -> None:
        self.guider.set_state(step.step_index, step.num_timesteps, step.timestep)
        if not self.started:  # a guider sets up its per-run state (APG's momentum) when preparing step 0
            self.guider.set_state(0, step.num_timesteps, step.timestep)
            self.guider.prepare_inputs({})
            self.guider.set_state(step.step_index, step.num_timesteps, step.timestep)
            self.started = True

    def needs_uncond(self, step: GuidanceStep) -> bool:
        self._set_state(step)
        return self.guider.num_conditions > 1

    def apply(self, step, cond, uncond, rows, combine):
        self._set_state(step)
        rows = torch.ones(step.batch_size, dtype=torch.bool) if rows is None else rows
        mask = rows.to(cond.device).view(-1, *[1] * (cond.ndim - 1))
        uncond = torch.where(mask, uncond, cond)  # rows not guided carry no NaN into the guider's state
        guided = torch.where(mask, self.guider.forward(pred_cond=cond, pred_uncond=uncond).pred, cond)
        return guided, torch.where(rows, float(self.guider.guidance_scale), 1.0), {}

    def __repr__(self) -> str:
        return f"GuiderScale({type(self.guider).__name__}(guidance_scale={self.guider.guidance_scale}))"
