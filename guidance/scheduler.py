"""The one abstraction of this project: a guidance scheduler.

A guidance scheduler is to classifier-free guidance what a diffusers scheduler is to sampling: a small,
configurable, stateful policy that never runs the model. At each denoising step the pipeline asks it which
branches to evaluate for which samples (`branches`), runs exactly those model passes batched together, and hands
the predictions back (`combine`) to get one guided prediction, which the pipeline's diffusers scheduler steps.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from diffusers.configuration_utils import ConfigMixin

BRANCH_NAMES = ("uncond", "cond", "negative")


@dataclass
class GuidanceStep:
    """Everything a policy may look at before and after the model passes of one denoising step."""

    step_index: int
    num_inference_steps: int
    timestep: torch.Tensor
    latents: torch.Tensor
    scheduler: Any
    """The pipeline's diffusers scheduler, to form an x0 prediction or a look-ahead latent."""
    pipeline: Any = None
    prompts: list[str] | None = None
    """The prompt of every batch row (None when the pipeline was given embeddings only)."""

    @property
    def progress(self) -> float:
        """Fraction of sampling done: 0.0 at the first step, 1.0 at the last."""
        return self.step_index / max(self.num_inference_steps - 1, 1)

    @property
    def sigma(self) -> torch.Tensor | None:
        """The noise level of this step for sigma-parameterised schedulers (Euler, flow matching), else None."""
        sigmas = getattr(self.scheduler, "sigmas", None)
        if sigmas is None or self.step_index >= len(sigmas):
            return None
        return sigmas[self.step_index]


@dataclass
class BranchRequest:
    """Which branches to evaluate, as one bool mask of shape (batch,) per branch.

    A sample whose mask is False for a branch gets no forward pass for it: the batch really shrinks.
    "negative" runs the negative-preference model (the unconditional inputs under `branch_context`).
    """

    cond: torch.Tensor
    uncond: torch.Tensor
    negative: torch.Tensor

    @classmethod
    def full(cls, batch_size: int, uncond: bool | torch.Tensor = True, negative: bool = False) -> BranchRequest:
        """Conditional pass for every sample; unconditional where `uncond` says (a bool or a mask)."""
        ones = torch.ones(batch_size, dtype=torch.bool)
        uncond_mask = uncond.to(torch.bool).cpu() if isinstance(uncond, torch.Tensor) else ones & uncond
        return cls(cond=ones, uncond=uncond_mask, negative=ones & negative)

    def as_dict(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in BRANCH_NAMES}


class GuidanceScheduler(ConfigMixin):
    """Base class of every guidance method: subclasses implement `branches` and `combine`.

    The constructor's arguments are the config (decorate `__init__` with `@register_to_config`), so every policy
    has `save_pretrained`, `from_pretrained` and `new(**overrides)`. `reset` is called by the pipeline at the start
    of each generation; afterwards `trace` records what was done, and `history` (when `keeps_history`) holds the
    predictions of past steps as handed to `combine`, one dict per step.
    """

    config_name = "guidance_config.json"
    keeps_history: ClassVar[bool] = False

    def reset(self, batch_size: int, num_inference_steps: int) -> None:
        """Forget the previous generation; called once per pipeline call before the first step."""
        from .trace import GuidanceTrace

        self.batch_size = batch_size
        self.num_inference_steps = num_inference_steps
        self.trace = GuidanceTrace(batch_size=batch_size)
        self.history: list[dict[str, torch.Tensor]] = []
        self._step_extras: dict = {}

    def record_extra(self, **values) -> None:
        """Add method-specific values (similarities, scores, ...) to this step's trace entry."""
        self._step_extras = {**getattr(self, "_step_extras", {}), **values}

    def take_extras(self) -> dict:
        """This step's extra values, handed to the trace by the pipeline after `combine`."""
        extras, self._step_extras = getattr(self, "_step_extras", {}), {}
        return extras

    def branches(self, step: GuidanceStep) -> BranchRequest:
        """Which model branches to evaluate, per sample, at this step."""
        raise NotImplementedError

    def combine(
        self, step: GuidanceStep, request: BranchRequest, predictions: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Combine the branch predictions into (guided prediction, scale applied per sample).

        `predictions[name]` has the full batch size, NaN in the rows of samples for which the branch did not run;
        a branch that ran for no sample is absent.
        """
        raise NotImplementedError

    def branch_context(self, branch: str, pipeline: Any) -> contextlib.AbstractContextManager:
        """A context the pipeline enters around the forward pass of `branch` (an adapter for "negative").

        It must leave the model as it found it on exit.
        """
        return contextlib.nullcontext()

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> None:
        """Write the config (`guidance_config.json`) to `save_directory`, as diffusers schedulers do."""
        self.save_config(save_directory, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, subfolder: str | None = None, **kwargs):
        """Load a scheduler saved with `save_pretrained` (a local folder or a hub id)."""
        config = cls.load_config(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        return cls.from_config(config)

    def new(self, **overrides) -> GuidanceScheduler:
        """A fresh scheduler of the same class with this config, some values replaced (diffusers' `.new`)."""
        config = {key: value for key, value in self.config.items() if not key.startswith("_")}
        unknown = sorted(set(overrides) - set(config))
        if unknown:
            raise ValueError(f"`{type(self).__name__}.new` got unknown config keys {unknown}; valid: {sorted(config)}")
        return type(self).from_config({**config, **overrides})

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config.items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


def check_scale(name: str, value: Any) -> float:
    """A guidance scale: a finite real number >= 0, else an error naming the argument."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"`{name}` must be a real number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"`{name}` must be a finite number >= 0, got {value}")
    return float(value)


def check_fraction(name: str, value: Any) -> float:
    """A fraction of sampling progress in [0, 1], else an error naming the argument."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"`{name}` must be a real number in [0, 1], got {type(value).__name__} {value!r}")
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"`{name}` must be in [0, 1], got {value}")
    return float(value)
